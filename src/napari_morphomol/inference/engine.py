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
import os
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

from napari_morphomol.errors import InputError
from napari_morphomol.inference.devices import CPU_BF16_MIN_SPEEDUP, DeviceFallbackWarning, check_dtype, resolve_device
from napari_morphomol.inference.store import (
    ATTRS_KEY,
    CANCEL_MARKER,
    chunk_order,
    create_partial_store,
    finalise_store,
    partial_path,
    read_done_mask,
)
from napari_morphomol.inference.worker import InferenceCancelled, RunSpec, calibrate, forget_run, run_chunk

POLL_SECONDS = 0.2

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
    scheduler address or ``Client``. ``dtype``: "auto" (bf16 autocast on CUDA; on other devices
    when a reference batch runs faster in it), "float32" or "bfloat16". ``progress(done, total)``
    is called per finished chunk; ``cancel()`` returning True stops the run within one batch and
    raises :class:`InferenceCancelled`, leaving a store that the same call resumes. An existing
    complete store for the same inputs is returned as it is.
    """
    if batch_size < 1 or tiles_per_chunk < 1:
        raise InputError(f"batch size ({batch_size}) and tiles per chunk ({tiles_per_chunk}) must be at least 1")
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
    local = _is_local(scheduler)
    if local:
        _, note = resolve_device(device)  # an absent explicit device fails here, before any work
        if note:
            warnings.warn(note, DeviceFallbackWarning, stacklevel=2)

    with ExitStack() as stack:  # the scheduler (pool, client) is set up before any work, so it fails fast
        run_scheduler, description = _scheduler(scheduler, num_workers, stack)
        final = Path(store)
        partial = partial_path(final)
        if not final.parent.is_dir():
            raise InputError(f"the folder of {final} does not exist; create it first")
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
        if final.exists():
            existing = _read_attrs(final)
            if not overwrite and existing.get("status") == "complete" and existing.get("fingerprint") == fingerprint:
                if progress is not None:
                    progress(existing["n_chunks"], existing["n_chunks"])
                return final
            if not overwrite:
                raise InputError(
                    f"{final} already exists and holds another run; choose another --out or pass --overwrite"
                )
        resume = partial.exists() and not overwrite and _read_attrs(partial).get("fingerprint") == fingerprint
        if partial.exists() and not resume and not overwrite:
            raise InputError(
                f"{partial} holds an unfinished run with other inputs (checkpoint, sample, region or chunking); "
                "pass --overwrite to discard it, or resume it with its original inputs"
            )

        if resume:
            attrs = _read_attrs(partial)
            (partial / CANCEL_MARKER).unlink(missing_ok=True)
            started_dtype = attrs.get("precision", {}).get("dtype")
            if dtype != "auto" and started_dtype not in (None, dtype):
                raise InputError(f"{partial} was started in {started_dtype}; resume it with dtype auto or "
                                 f"{started_dtype}, or pass --overwrite to start again in another dtype")
        else:
            tick = time.perf_counter()
            attrs = _start_store(partial, sdata, info, card, checkpoint, sha, panel_match, he_to_global, region_he_px,
                                 tiles_per_chunk, min_transcripts, max_background, fingerprint)
            timings["tiling_s"] = time.perf_counter() - tick
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
                warnings.warn(f"workers: {precision['fallback_note']}", DeviceFallbackWarning, stacklevel=2)
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
            _update_attrs(partial, {"segments": [*attrs.get("segments", []), segment]})
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
                                               "finished_at": segment["finished_at"]})


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
                 tiles_per_chunk, min_transcripts, max_background, fingerprint) -> dict:
    """Tile the sample and write the partial store: tile table (chunk order), tokens, measured counts."""
    from napari_morphomol.tiling import GenePanel, tile_sample

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
    tiling = tile_sample(sdata, panel=GenePanel(core=core, addon=addon_measured), he_to_global=he_to_global,
                         tile_px=g.tile_px, stride_px=g.stride_px, tile_mpp=g.mpp, min_transcripts=min_transcripts,
                         max_background=max_background, region_he_px=region_he_px)
    if len(tiling.tiles) == 0:
        raise InputError(f"no tile of the sample passes the filters ({tiling.report}); check the registration, "
                         "the region and min_transcripts")
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
        "segments": [],
    }
    create_partial_store(partial, tiles=tiles, tiles_per_chunk=tiles_per_chunk, n_addon=len(card.addon_genes),
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
        workers = num_workers or 2
        return ("threads", workers), f"threads ({workers})"
    if scheduler == "synchronous":
        return ("synchronous", None), "synchronous"
    if scheduler == "processes":
        import multiprocessing

        workers = num_workers or min(2, os.cpu_count() or 1)
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
    """Run the reference batch where the chunks will run; bf16 on CUDA, elsewhere only if faster."""
    (measured,) = _compute(run_scheduler, [dask.delayed(calibrate, pure=False)(spec)])
    if dtype != "auto":
        chosen, reason = dtype, "requested"
    elif measured["device"].startswith("cuda"):
        chosen, reason = "bfloat16", "CUDA: bf16 autocast"
    elif measured["bfloat16_speedup"] >= CPU_BF16_MIN_SPEEDUP:
        chosen, reason = "bfloat16", f"bf16 autocast ran {measured['bfloat16_speedup']:.2f}x faster than fp32 here"
    else:
        chosen, reason = "float32", f"bf16 autocast ran only {measured['bfloat16_speedup']:.2f}x the speed of fp32 here"
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
