"""``predict``: a trained model over a whole sample, as a dask graph of spatially contiguous chunks.

The caller's process checks the inputs (checkpoint panel, device), tiles the sample once, writes
the tile table and token raster into the partial store, then hands one task per unfinished chunk
to the scheduler: threads (default), processes, or a dask.distributed cluster. Tasks write their
rows straight into the store; the caller only watches the done-mask for progress and
cancellation, and finalises the store when every chunk is done.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import numbers
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import dask
import numpy as np

from napari_morphomol._atomic import atomic_output, guard_output, os_error_message
from napari_morphomol.errors import InputError
from napari_morphomol.inference.devices import DeviceFallbackWarning, auto_dtype, check_dtype, resolve_device
from napari_morphomol.inference.store import (
    ATTRS_KEY,
    CANCEL_MARKER,
    RESULTS_STORE,
    chunk_order,
    create_partial_store,
    finalise_store,
    is_unstarted_store,
    partial_path,
    read_done_mask,
    remove_abandoned_starts,
    run_lock,
)
from napari_morphomol.inference.worker import (
    PREFETCH_BATCHES,
    InferenceCancelled,
    RunSpec,
    calibrate,
    forget_run,
    load_model,
    run_chunk,
)

POLL_SECONDS = 0.2
MIN_FUSION_TRANSCRIPT_SHARE = 0.05
"""A model that reads transcripts is not run when fewer of the sample's panel transcripts than this
share fall on its tissue tiles: the registration does not place the H&E on the Xenium run."""

ProgressCallback = Callable[[int, int], None]


def default_checkpoint_path() -> Path:
    """The model shipped with napari-morphomol (``napari_morphomol.models.shipped``)."""
    from napari_morphomol.models.shipped import shipped_model_path

    return shipped_model_path()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def predict(
    sample,
    checkpoint: str | Path | None = None,
    *,
    store: str | Path,
    region_he_px: np.ndarray | None = None,
    he_to_global=None,
    batch_size: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    scheduler=None,
    num_workers: int | None = None,
    tiles_per_chunk: int = 64,
    min_transcripts: int = 0,
    max_background: float = 0.3,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """Predict the model's add-on panel for every tissue tile of ``sample``; returns the store path.

    ``sample``: a SpatialData from :func:`napari_morphomol.io.load_sample` or a path for
    :func:`~napari_morphomol.io.sample.open_sample`. ``checkpoint``: a .safetensors model (None: the
    shipped model). ``scheduler``: None/"threads", "synchronous", "processes", a dask.distributed
    scheduler address or ``Client``. ``dtype``: "auto" (bf16 autocast on CUDA, fp32 on the CPU and
    MPS: fixed per device kind, so runs repeat), "float32" or "bfloat16". ``progress(done, total)``
    is called per finished chunk; ``cancel()`` returning True stops the run within one batch and
    raises :class:`InferenceCancelled`, leaving a store that the same call resumes. An existing
    complete store for the same inputs is returned as it is.

    Every check comes before anything is written: the options, the checkpoint (card, panel,
    weights), the device, the memory the tile geometry and batch imply, the output path
    (:func:`~napari_morphomol._atomic.guard_output`: never into a Xenium bundle or an input; with
    ``overwrite`` only a results store of ours is replaced), and, for a model that reads
    transcripts, that the sample's transcripts fall on its tiles. One run at a time writes a
    store (``RESULTS.zarr.lock``). Failures to write (full disk, read-only folder) are InputErrors.
    """
    _check_options(batch_size=batch_size, tiles_per_chunk=tiles_per_chunk, num_workers=num_workers,
                   min_transcripts=min_transcripts, max_background=max_background)
    check_dtype(dtype)
    from napari_morphomol.io.sample import HE_IMAGE, TRANSCRIPTS, open_sample, sample_info
    from napari_morphomol.models import match_gene_panel, read_model_card
    from napari_morphomol.tiling import feature_names

    timings: dict[str, float] = {}
    started = time.perf_counter()
    checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint_path()
    card = read_model_card(checkpoint)
    sdata = open_sample(sample) if isinstance(sample, (str, Path)) else sample
    info = sample_info(sdata)
    if HE_IMAGE not in sdata.images or TRANSCRIPTS not in sdata.points or info.he_path is None:
        raise InputError("prediction needs a sample with an H&E image file and Xenium transcripts")
    sample_genes = feature_names(sdata.points[TRANSCRIPTS])
    panel_match = match_gene_panel(card, sample_genes)  # raises before any work
    raised: list[dict] = []  # the warnings of this call, for the store's metadata
    local = _is_local(scheduler)
    if local:
        _, note = resolve_device(device)  # an absent explicit device fails here, before any work
        if note:
            _warn(raised, note, DeviceFallbackWarning)
    _check_memory(_sample_geometry(sdata, info, card), card, batch_size, tiles_per_chunk)

    final = Path(store)
    partial = partial_path(final)
    sha = file_sha256(checkpoint)
    fingerprint = {
        "checkpoint_sha256": sha,
        "he_path": str(Path(info.he_path).resolve()),
        "xenium_dir": str(Path(info.xenium_dir).resolve()) if info.xenium_dir else None,
        "he_to_global": _registration_record(info, he_to_global),
        "region_he_px": None if region_he_px is None else np.asarray(region_he_px, float).tolist(),
        "tiles_per_chunk": int(tiles_per_chunk),
        "min_transcripts": int(min_transcripts),
        "max_background": float(max_background),
    }
    if not overwrite:
        existing = _complete_run_attrs(final)
        if existing is not None and existing.get("fingerprint") == fingerprint:
            if progress is not None:
                progress(existing["n_chunks"], existing["n_chunks"])
            return final
    inputs = (*info.input_paths, checkpoint)
    guard_output(final, RESULTS_STORE, inputs=inputs, overwrite=overwrite)
    _check_weights(checkpoint, sha, device, scheduler)  # a damaged checkpoint fails before any store exists

    with ExitStack() as stack:  # the scheduler (pool, client) is set up before any work, so it fails fast
        run_scheduler, description = _scheduler(scheduler, num_workers, stack)
        stack.enter_context(run_lock(final))
        try:
            remove_abandoned_starts(partial)
            if is_unstarted_store(partial):  # a start killed before its attributes were written
                shutil.rmtree(partial)
            attrs = _read_attrs(partial) if RESULTS_STORE.is_ours(partial) else None
            resume = attrs is not None and not overwrite and attrs.get("fingerprint") == fingerprint
            if attrs is not None and not resume and not overwrite:
                raise InputError(
                    f"{partial} holds an unfinished run with other inputs (checkpoint, sample, region or chunking); "
                    "pass --overwrite to discard it, or resume it with its original inputs"
                )
            if resume:
                (partial / CANCEL_MARKER).unlink(missing_ok=True)
                started_dtype = attrs.get("precision", {}).get("dtype")
                if dtype != "auto" and started_dtype not in (None, dtype):
                    raise InputError(f"{partial} was started in {started_dtype}; resume it with dtype auto or "
                                     f"{started_dtype}, or pass --overwrite to start again in another dtype")
            else:
                tick = time.perf_counter()
                attrs = _start_store(partial, sdata, info, card, checkpoint, sha, panel_match, he_to_global,
                                     region_he_px, tiles_per_chunk, min_transcripts, max_background, fingerprint,
                                     inputs=inputs, overwrite=overwrite, raised=raised)
                timings["tiling_s"] = time.perf_counter() - tick
            return _run(partial, final, attrs, card, checkpoint, sha, device, dtype, batch_size, local,
                        run_scheduler, description, raised, timings, started, progress, cancel)
        except OSError as exc:
            kept = f"; the finished chunks are kept in {partial}: run the same command again to resume" \
                if partial.exists() else ""
            raise InputError(os_error_message(final, exc) + kept) from exc


def _run(partial: Path, final: Path, attrs: dict, card, checkpoint: Path, sha: str, device: str, dtype: str,
         batch_size: int, local: bool, run_scheduler, description: str, raised: list[dict],
         timings: dict[str, float], started: float, progress, cancel) -> Path:
    """Calibrate (once per store), run the unfinished chunks and finalise the store."""
    spec = RunSpec(store=str(partial), run_id=attrs["run_id"], checkpoint=str(checkpoint.resolve()),
                   checkpoint_sha256=sha, he_path=attrs["fingerprint"]["he_path"], geometry=attrs["geometry_args"],
                   device=device, dtype=attrs.get("precision", {}).get("dtype") or "float32",
                   batch_size=int(batch_size))
    n_chunks = int(attrs["n_chunks"])
    if "precision" not in attrs:
        tick = time.perf_counter()
        precision = _choose_precision(spec, dtype, run_scheduler)
        timings["calibration_s"] = time.perf_counter() - tick
        spec = RunSpec(**{**asdict(spec), "dtype": precision["dtype"]})
        attrs = _update_attrs(partial, {"precision": precision})
        if precision["fallback_note"] and not local:
            _warn(raised, f"workers: {precision['fallback_note']}", DeviceFallbackWarning)
    run_warnings = _merged_warnings(attrs.get("warnings", []), raised)
    done = read_done_mask(_open(partial))
    pending = [int(k) for k in np.flatnonzero(~done)]
    segment = {"scheduler": description, "device_requested": device, "batch_size": int(batch_size)}
    tick = time.perf_counter()
    try:
        records = _run_chunks(spec, pending, run_scheduler, partial, n_chunks, progress, cancel)
    except InferenceCancelled:
        finished = int(read_done_mask(_open(partial)).sum())
        segment.update(status="cancelled", finished_at=_now(), chunks_done_in_store=finished,
                       timings={**timings, "total_s": time.perf_counter() - started})
        _update_attrs(partial, {"segments": [*attrs.get("segments", []), segment], "warnings": run_warnings})
        raise
    timings["inference_s"] = time.perf_counter() - tick

    segment.update(
        status="complete", finished_at=_now(), chunks_run=len(pending),
        tiles_run=int(sum(r["tiles"] for r in records)), devices=sorted({r["device"] for r in records}),
        batch_limit_after_oom=min((r["batch_limit"] for r in records if r["batch_limit"]), default=None),
        timings={**timings, "total_s": time.perf_counter() - started},
    )
    forget_run(str(partial))
    return finalise_store(partial, final, {"segments": [*attrs.get("segments", []), segment],
                                           "finished_at": segment["finished_at"], "warnings": run_warnings})


def _check_options(**options) -> None:
    """The numeric options of :func:`predict`, refused with what to give (a Python caller's CLI checks)."""
    minimum = {"batch_size": 1, "tiles_per_chunk": 1, "num_workers": 1, "min_transcripts": 0}
    for name, least in minimum.items():
        value = options[name]
        if name == "num_workers" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise InputError(f"{name} must be a whole number of {least} or more, got {value!r}")
    share = options["max_background"]
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0.0 <= share <= 1.0:
        raise InputError(f"max_background is the largest background fraction of a tile, from 0 to 1; got {share!r}")


def _sample_geometry(sdata, info, card):
    """The model's tile geometry over the sample's H&E image (checks the memory it implies)."""
    from napari_morphomol.io.sample import HE_IMAGE
    from napari_morphomol.tiling import TileGeometry, he_levels_yxc

    height, width = he_levels_yxc(sdata.images[HE_IMAGE])[0].shape[:2]
    g = card.tile_geometry
    return TileGeometry(he_mpp=info.he_pixel_size_um, he_height_px=int(height), he_width_px=int(width),
                        tile_mpp=g.mpp, tile_px=g.tile_px, stride_px=g.stride_px)


def _check_memory(geometry, card, batch_size: int, tiles_per_chunk: int) -> None:
    """Refuse a batch or chunk size whose tensors cannot be held (capped at the tiles there can be)."""
    from napari_morphomol.tiling.geometry import check_batch_memory, check_fits_in_memory

    rows, cols = geometry.grid_shape
    grid_tiles = max(1, rows * cols)
    check_batch_memory(geometry, min(batch_size, tiles_per_chunk, grid_tiles), card.model.n_core_genes,
                       held_batches=PREFETCH_BATCHES + 1)
    chunk = min(tiles_per_chunk, grid_tiles)
    per_tile = (len(card.addon_genes) + _embedding_dim(card)) * 4 * 2  # float32 rows, in the task and in zarr
    check_fits_in_memory(chunk * per_tile, f"a chunk of {chunk} tiles (--tiles-per-chunk) with its predictions and "
                         "embeddings", "give a smaller --tiles-per-chunk (default 64)")


def _check_weights(checkpoint: Path, sha: str, device: str, scheduler) -> None:
    """Load the weights (refused when they do not match the card) before anything is written; on
    threads the tasks of this process reuse the loaded model."""
    if scheduler is None or scheduler in ("threads", "synchronous"):
        load_model(str(checkpoint.resolve()), sha, device)
    else:
        from napari_morphomol.models import load_checkpoint

        load_checkpoint(checkpoint, "cpu")


def _complete_run_attrs(final: Path) -> dict | None:
    """The metadata of a complete results store of ours at ``final``, else None."""
    if not RESULTS_STORE.is_ours(final):
        return None
    attrs = _read_attrs(final)
    return attrs if attrs.get("status") == "complete" else None


def _warn(raised: list[dict], message: str, category: type[Warning]) -> None:
    """Warn (a warning class of ours: the CLI prints one ``warning:`` line) and keep it for the metadata."""
    warnings.warn(message, category, stacklevel=3)
    raised.append({"source": "predict", "category": category.__name__, "message": str(message)})


def _sample_warnings(sdata) -> list[dict]:
    """The warnings the sample recorded when it was loaded (``attrs['morphomol']['warnings']``)."""
    from napari_morphomol.io.sample import ATTRS_KEY as SAMPLE_ATTRS_KEY

    recorded = (sdata.attrs.get(SAMPLE_ATTRS_KEY) or {}).get("warnings", []) or []
    return [{"source": "sample", **(w if isinstance(w, dict) else {"message": str(w)})} for w in recorded]


def _merged_warnings(*lists: list[dict]) -> list[dict]:
    """The entries of ``lists`` in order, each once."""
    merged: list[dict] = []
    for entry in (e for entries in lists for e in entries):
        if entry not in merged:
            merged.append(entry)
    return merged


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _open(path: Path):
    import zarr

    return zarr.open_group(path, mode="r+")


def _read_attrs(path: Path) -> dict:
    import zarr

    try:
        return dict(zarr.open_group(path, mode="r").attrs.get(ATTRS_KEY, {}))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{path} exists but is not a results store ({exc}); move it away or pass --overwrite") from exc


def _update_attrs(path: Path, update: dict) -> dict:
    root = _open(path)
    attrs = {**dict(root.attrs[ATTRS_KEY]), **update}
    root.attrs[ATTRS_KEY] = attrs
    return attrs


def _registration_record(info, he_to_global) -> dict:
    """The H&E -> ``global`` map as JSON: the sample's alignment matrix, or the given registration."""
    if he_to_global is None:
        return {"model": "affine", "matrix": info.he_to_global, "source": info.alignment_csv}
    if isinstance(he_to_global, np.ndarray):
        return {"model": "affine", "matrix": np.asarray(he_to_global, float).tolist(), "source": "given matrix"}
    from napari_morphomol.registration import FittedTransform, registration_record

    if isinstance(he_to_global, FittedTransform):
        return registration_record(he_to_global)
    raise InputError(f"he_to_global must be a 3 x 3 matrix or a fitted registration, got {type(he_to_global).__name__}")


def _start_store(partial, sdata, info, card, checkpoint, sha, panel_match, he_to_global, region_he_px,
                 tiles_per_chunk, min_transcripts, max_background, fingerprint, *, inputs, overwrite,
                 raised: list[dict]) -> dict:
    """Tile the sample and write the partial store: tile table (chunk order), tokens, measured counts.

    The store is written under a temporary name and renamed to ``partial`` when complete; a model
    that reads transcripts is refused first when the sample's transcripts miss its tiles."""
    from napari_morphomol.tiling import GenePanel, tile_sample
    from napari_morphomol.tiling.pipeline import REGISTRATION_HINT, transcripts_on_tissue_text

    g = card.tile_geometry
    addon_measured = panel_match.addon_measured
    if card.model.uses_transcripts:
        core = card.core_genes
    else:  # tokens are not read; bin one present gene so the tiling has a core panel
        core = tuple(gene for gene in card.core_genes if gene not in addon_measured)[:1] or ()
        if not core:
            from napari_morphomol.tiling import feature_names, is_control_feature

            core = tuple(g_ for g_ in feature_names(sdata.points["transcripts"])
                         if not is_control_feature(g_) and g_ not in addon_measured)[:1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiling = tile_sample(sdata, panel=GenePanel(core=core, addon=addon_measured), he_to_global=he_to_global,
                             tile_px=g.tile_px, stride_px=g.stride_px, tile_mpp=g.mpp,
                             min_transcripts=min_transcripts, max_background=max_background,
                             region_he_px=region_he_px)
    on_tissue = tiling.report["transcripts_on_tissue_tiles"]
    if card.model.uses_transcripts and on_tissue["share"] < MIN_FUSION_TRANSCRIPT_SHARE:
        raise InputError(
            f"the sample's transcripts do not meet its tiles: {transcripts_on_tissue_text(tiling.report)}. The "
            "registration probably does not place the H&E on the Xenium run, and this model reads the "
            f"transcripts of each tile; {REGISTRATION_HINT}"
        )
    for w in caught:  # shown now, after the refusal above made them moot
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if w.category.__module__.startswith("napari_morphomol"):
            raised.append({"source": "tiling", "category": w.category.__name__, "message": str(w.message)})
    order = chunk_order(tiling.tiles["row"].to_numpy(), tiling.tiles["col"].to_numpy(), tiles_per_chunk)
    tiles = tiling.tiles.iloc[order].reset_index(drop=True)
    tiles["chunk"] = np.arange(len(tiles)) // tiles_per_chunk
    measured = None
    if addon_measured:
        measured = tiling.bins.tile_addon_counts(tiles["row"].to_numpy(), tiles["col"].to_numpy())
    geometry = tiling.geometry
    embedding_dim = _embedding_dim(card)
    attrs = {
        "fingerprint": fingerprint,
        "run_id": uuid.uuid4().hex,
        "started_at": _now(),
        "tile_columns": list(tiles.columns),
        "addon_genes": list(card.addon_genes),
        "core_genes": list(card.core_genes),
        "measured_genes": list(addon_measured),
        "embedding_dim": embedding_dim,
        "model_card": json.loads(card.to_json()),
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": sha,
                       "size_bytes": Path(checkpoint).stat().st_size},
        "sample": {"xenium_dir": info.xenium_dir, "he_path": info.he_path, "alignment_csv": info.alignment_csv,
                   "xenium_pixel_size_um": info.xenium_pixel_size_um, "he_pixel_size_um": info.he_pixel_size_um,
                   "analysis_sw_version": info.analysis_sw_version},
        "registration": fingerprint["he_to_global"],
        "geometry": geometry.to_dict(),
        "geometry_args": {"he_mpp": geometry.he_mpp, "he_height_px": geometry.he_height_px,
                          "he_width_px": geometry.he_width_px, "tile_mpp": geometry.tile_mpp,
                          "tile_px": geometry.tile_px, "stride_px": geometry.stride_px,
                          "tokens_per_side": geometry.tokens_per_side, "image_px": geometry.image_px},
        "tiling_report": tiling.report,
        "warnings": _merged_warnings(_sample_warnings(sdata), raised),
        "segments": [],
    }
    with atomic_output(partial, RESULTS_STORE, inputs=inputs, overwrite=overwrite) as tmp:
        create_partial_store(tmp, tiles=tiles, tiles_per_chunk=tiles_per_chunk, n_addon=len(card.addon_genes),
                             embedding_dim=embedding_dim, measured_counts=measured, token_raster=tiling.bins.tokens,
                             attrs=attrs)
    return _read_attrs(partial)


def _embedding_dim(card) -> int:
    """Width of ``ModelOutput.embeddings`` for the card's architecture (see docs/models.md)."""
    import torch

    from napari_morphomol.models import build_model

    config = card.model
    with torch.device("meta"):
        model = build_model(config)
        tokens = torch.zeros(1, (config.img_size // config.patch_px) ** 2, config.n_core_genes)
        images = torch.zeros(1, 3, config.img_size, config.img_size, dtype=torch.uint8)
        output = model(images if config.uses_image else None, tokens if config.uses_transcripts else None)
    return int(output.embeddings.shape[1])


def _is_local(scheduler) -> bool:
    return scheduler is None or scheduler in ("threads", "synchronous", "processes")


def _scheduler(scheduler, num_workers: int | None, stack: ExitStack):
    """(what dask.compute / client.compute should use, a description for the metadata)."""
    if scheduler is None or scheduler == "threads":
        workers = 2 if num_workers is None else num_workers
        return ("threads", workers), f"threads ({workers})"
    if scheduler == "synchronous":
        return ("synchronous", None), "synchronous"
    if scheduler == "processes":
        import multiprocessing

        workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
        pool = stack.enter_context(ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_limit_torch_threads, initargs=(max(1, (os.cpu_count() or 1) // workers),)))
        return ("processes", pool), f"processes ({workers})"
    from distributed import Client

    if isinstance(scheduler, Client):
        return ("distributed", scheduler), f"distributed ({scheduler.scheduler.address})"
    if isinstance(scheduler, str) and ":" in scheduler:
        try:
            client = stack.enter_context(Client(scheduler, timeout="20s", set_as_default=False))
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}); is the cluster running?"
            ) from exc
        return ("distributed", client), f"distributed ({scheduler})"
    raise InputError(f"unknown scheduler {scheduler!r}: use threads, processes, synchronous, a dask scheduler "
                     "address (tcp://host:8786) or a distributed.Client")


def _limit_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _compute(run_scheduler, tasks: list):
    kind, handle = run_scheduler
    if kind == "threads":
        return dask.compute(*tasks, scheduler="threads", num_workers=handle)
    if kind == "processes":
        return dask.compute(*tasks, scheduler="processes", pool=handle)
    if kind == "synchronous":
        return dask.compute(*tasks, scheduler="synchronous")
    return handle.gather(handle.compute(list(tasks)))


def _choose_precision(spec: RunSpec, dtype: str, run_scheduler) -> dict:
    """The reference batch where the chunks will run (device, bf16 vs fp32 differences); the dtype
    asked for, or for ``auto`` the one fixed for that device kind (:func:`~.devices.auto_dtype`)."""
    (measured,) = _compute(run_scheduler, [dask.delayed(calibrate, pure=False)(spec)])
    chosen, reason = (dtype, "requested") if dtype != "auto" else auto_dtype(measured["device"])
    return {"dtype": chosen, "reason": reason, **measured}


def _run_chunks(spec: RunSpec, pending: list[int], run_scheduler, partial: Path, n_chunks: int,
                progress: ProgressCallback | None, cancel: Callable[[], bool] | None) -> list[dict]:
    """Compute the chunk tasks in a helper thread; here, report progress and watch for cancel."""
    tasks = [dask.delayed(run_chunk, pure=False)(spec, k) for k in pending]
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["records"] = list(_compute(run_scheduler, tasks))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=work, name="morphomol-predict", daemon=True)
    thread.start()
    reported = -1
    root = _open(partial)
    cancelled = False
    while thread.is_alive():
        try:
            thread.join(POLL_SECONDS)
            stop = not cancelled and cancel is not None and cancel()
        except KeyboardInterrupt:
            stop = True
        if stop:  # tasks see the marker before their next batch
            (partial / CANCEL_MARKER).touch()
            cancelled = True
        if progress is not None:
            count = int(read_done_mask(root).sum())
            if count != reported:
                reported = count
                progress(count, n_chunks)
    if cancelled or isinstance(outcome.get("error"), InferenceCancelled):
        raise InferenceCancelled(
            f"prediction cancelled with {int(read_done_mask(root).sum())} of {n_chunks} chunks done; "
            f"run it again with the same store to resume ({partial})"
        )
    if "error" in outcome:
        raise outcome["error"]
    if progress is not None and reported != n_chunks:
        progress(n_chunks, n_chunks)
    return outcome["records"]
