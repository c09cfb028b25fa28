"""``predict``: a trained model over a whole sample, as a dask graph of spatially contiguous chunks.

A call goes in three steps, after every check of :mod:`.checks` (nothing is written before them):

1. *fingerprint* (:func:`run_fingerprint`): the inputs that decide the results (checkpoint hash,
   H&E and Xenium paths, registration, region, tile filters, chunking). A complete store with the
   same fingerprint is returned as it is; a ``.partial`` with it is resumed, any other is refused
   unless ``overwrite``.
2. *open or resume* (:func:`_open_or_resume`), under the run's lock: the ``.partial`` of the same
   fingerprint as it is (no re-tiling), or the sample tiled once and a new partial store written
   (tile table in chunk order, token raster, measured counts, one empty array per output the
   model declares).
3. *run* (:func:`_run`): a calibration task once per store fixes the dtype, then one task per
   unfinished chunk on the scheduler (:mod:`.scheduling`): threads (default), processes or a
   dask.distributed cluster. Tasks write their rows straight into the store; the caller only
   watches the done-mask for progress and cancellation, and finalises the store when every chunk
   is done, after writing the stitched token maps (:mod:`.token_maps`) of a token-head model and
   the interval bounds and out-of-distribution flags of a calibrated model (:mod:`.trust`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import zarr

from napari_morphomol._atomic import atomic_output, guard_output, os_error_message
from napari_morphomol.errors import InputError
from napari_morphomol.inference.checks import (
    check_memory,
    check_options,
    check_transcripts_meet_tiles,
    check_weights,
    sample_geometry,
    sample_route,
)
from napari_morphomol.inference.devices import DeviceFallbackWarning, auto_dtype, resolve_device
from napari_morphomol.inference.scheduling import (
    ProgressCallback,
    Scheduler,
    compute,
    is_local,
    open_scheduler,
    run_chunks,
)
from napari_morphomol.inference.store import (
    CANCEL_MARKER,
    FORMAT_VERSION,
    RESULTS_STORE,
    chunk_order,
    create_partial_store,
    finalise_store,
    is_unstarted_store,
    output_records,
    partial_path,
    read_attrs,
    read_done_mask,
    remove_abandoned_starts,
    run_lock,
    update_attrs,
)
from napari_morphomol.inference.token_maps import write_token_maps
from napari_morphomol.inference.trust import write_trust
from napari_morphomol.inference.worker import InferenceCancelled, RunSpec, calibrate, card_output_specs, forget_run
from napari_morphomol.models.trust import DEFAULT_LEVEL, level_index


@dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict` runs: where it writes, which model, and how it computes. Checked when made
    (an out-of-range number or an unknown dtype is an InputError naming the option)."""

    store: Path
    """The results store to write (``RESULTS.zarr``); its ``.partial`` and ``.lock`` lie beside it."""
    checkpoint: Path | None = None
    """A .safetensors model with its card; None: the model shipped with napari-morphomol."""
    batch_size: int = 32
    """Tiles per forward pass."""
    device: str = "auto"
    """auto (CUDA, then MPS, then the CPU), cpu, cuda or mps."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on the CPU and MPS: fixed per device kind, so runs repeat),
    float32 or bfloat16."""
    scheduler: object = None
    """None/"threads", "synchronous", "processes", a dask.distributed scheduler address or ``Client``."""
    num_workers: int | None = None
    """Threads or processes of the local schedulers (None: 2)."""
    tiles_per_chunk: int = 64
    """Tiles per dask task, a spatially contiguous block."""
    min_transcripts: int = 0
    """Tiles with fewer core + add-on transcripts are skipped."""
    max_background: float = 0.3
    """Largest background fraction of a predicted tile, 0 to 1."""
    region_he_px: tuple[tuple[float, float], ...] | None = None
    """A polygon of (x, y) H&E px: only tiles inside it are predicted (None: the whole sample)."""
    he_to_global: object = None
    """The H&E -> ``global`` registration: None (the sample's alignment), a 3 x 3 matrix or a
    fitted registration."""
    overwrite: bool = False
    """Replace ``store`` if it is a results store of ours, and discard a partial run."""
    interval_level: float = DEFAULT_LEVEL
    """Nominal coverage of the interval bounds written beside the predictions (one of the levels
    the model is calibrated at: 0.5, 0.8, 0.9, 0.95, 0.99)."""
    jpeg_device: str | None = None
    """Decode the H&E's YCbCr JPEG tiles with ``torchvision.io.decode_jpeg`` on this torch device
    (``"cuda"``: nvJPEG, or ``"cpu"``; see :class:`~.worker.TiffLevel`); None: tifffile's decoders on the CPU."""

    def __post_init__(self) -> None:
        check_options(self)
        level_index(self.interval_level)
        object.__setattr__(self, "store", Path(self.store))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if self.region_he_px is not None:
            polygon = np.asarray(self.region_he_px, dtype=float).tolist()
            object.__setattr__(self, "region_he_px", tuple(tuple(point) for point in polygon))


@dataclass(frozen=True)
class _Inputs:
    """What predict checked before any work, and the fingerprint they make."""

    sdata: object
    info: object
    card: object
    checkpoint: Path
    sha256: str
    panel_match: object
    output_specs: tuple
    fingerprint: dict
    route: str
    """Which inputs the model is given (``models.config.ROUTES``): ``image`` for an H&E alone."""

    @property
    def paths(self) -> tuple:
        """The files the run reads: no output may touch them."""
        return (*self.info.input_paths, self.checkpoint)


@dataclass
class _CallRecord:
    """What one predict call records in the store's metadata: the warnings it raised and its timings."""

    started: float = field(default_factory=time.perf_counter)
    raised: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def warn(self, message: str, category: type[Warning]) -> None:
        """Warn (a warning class of ours: the CLI prints one ``warning:`` line) and keep it for the metadata."""
        warnings.warn(message, category, stacklevel=4)
        self.raised.append({"source": "predict", "category": category.__name__, "message": str(message)})

    def total_timings(self) -> dict[str, float]:
        return {**self.timings, "total_s": time.perf_counter() - self.started}


HE_FRAME_SOURCE = "no Xenium run: tiles lie in the H&E's own frame, in um (H&E px x pixel size)"
"""The registration an image-only run of an H&E alone records."""


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


def predict(sample, options: PredictOptions, *, progress: ProgressCallback | None = None,
            cancel: Callable[[], bool] | None = None) -> Path:
    """Predict the model's outputs (add-on panel, embeddings) for every tissue tile of ``sample``.

    Parameters
    ----------
    sample
        A SpatialData from :func:`napari_morphomol.io.load_sample` (it must name its H&E file:
        workers reopen it) or a path for :func:`~napari_morphomol.io.sample.open_sample`.
    options
        :class:`PredictOptions`: the store, the checkpoint, batch and chunk sizes, device, dtype,
        scheduler, tile filters, region, registration and ``overwrite``.
    progress
        Called as ``progress(done, total)`` chunks whenever the count changes.
    cancel
        Polled five times a second; returning True stops the run within one batch and raises
        :class:`~napari_morphomol.inference.InferenceCancelled`, leaving a store that the same
        call resumes.

    Returns
    -------
    Path
        The complete results store, ``options.store``. An existing complete store for the same
        inputs is returned as it is.

    Notes
    -----
    Every check comes before anything is written: the options, the checkpoint (card, panel,
    weights), the device, the memory the tile geometry and batch imply, the output path
    (:func:`~napari_morphomol._atomic.guard_output`: never into a Xenium bundle or an input; with
    ``overwrite`` only a results store of ours is replaced), and, for a model that reads
    transcripts, that the sample's transcripts fall on its tiles. One run at a time writes a
    store (``RESULTS.zarr.lock``). Failures to write (full disk, read-only folder) are InputErrors.
    """
    record = _CallRecord()
    inputs = _checked_inputs(sample, options, record)
    final = options.store
    if not options.overwrite and (n_chunks := _complete_store_chunks(final, inputs.fingerprint)) is not None:
        if progress is not None:
            progress(n_chunks, n_chunks)
        return final
    guard_output(final, RESULTS_STORE, inputs=inputs.paths, overwrite=options.overwrite)
    check_weights(inputs.checkpoint, inputs.sha256, options.device, options.scheduler)  # before any store exists
    partial = partial_path(final)
    with ExitStack() as stack:  # the scheduler (pool, client) is set up before any work, so it fails fast
        scheduler = open_scheduler(options.scheduler, options.num_workers, stack)
        stack.enter_context(run_lock(final))
        try:
            attrs = _open_or_resume(partial, inputs, options, record)
            return _run(partial, final, attrs, inputs, options, scheduler, record, progress, cancel)
        except OSError as exc:
            kept = f"; the finished chunks are kept in {partial}: run the same command again to resume" \
                if partial.exists() else ""
            raise InputError(os_error_message(final, exc) + kept) from exc


def _checked_inputs(sample, options: PredictOptions, record: _CallRecord) -> _Inputs:
    """Open and check the checkpoint, the sample, the device and the memory; fingerprint them."""
    from napari_morphomol.elements import TRANSCRIPTS, sample_info
    from napari_morphomol.io.sample import open_sample
    from napari_morphomol.models import PanelMatch, match_gene_panel, read_model_card
    from napari_morphomol.tiling import feature_names

    checkpoint = options.checkpoint if options.checkpoint is not None else default_checkpoint_path()
    card = read_model_card(checkpoint)
    sdata = open_sample(sample) if isinstance(sample, (str, Path)) else sample
    info = sample_info(sdata)
    route = sample_route(sdata, info, card)  # a model that cannot run on an H&E alone is refused here
    if TRANSCRIPTS in sdata.points:
        panel_match = match_gene_panel(card, feature_names(sdata.points[TRANSCRIPTS]))  # raises before any work
    else:
        panel_match = PanelMatch(np.zeros(0, dtype=np.int64), (), ())
        if options.he_to_global is not None:
            raise InputError("a registration maps the H&E onto a Xenium run, and this sample is an H&E alone: "
                             "predict without one, or load the Xenium run with the H&E")
    if is_local(options.scheduler):
        _, note = resolve_device(options.device)  # an absent explicit device fails here, before any work
        if note:
            record.warn(note, DeviceFallbackWarning)
    output_specs = card_output_specs(card)
    check_memory(sample_geometry(sdata, info, card), card, output_specs, options.batch_size, options.tiles_per_chunk)
    sha = file_sha256(checkpoint)
    from napari_morphomol.registration import REGISTRATION_ATTRS_KEY

    fingerprint = run_fingerprint(options, info, sha, sdata.attrs.get(REGISTRATION_ATTRS_KEY), route)
    return _Inputs(sdata, info, card, checkpoint, sha, panel_match, output_specs, fingerprint, route)


def run_fingerprint(options: PredictOptions, info, checkpoint_sha256: str, applied: dict | None = None,
                    route: str = "both") -> dict:
    """What must match for a store to be reused or resumed (recorded as ``fingerprint``);
    ``applied``: the record of a registration applied to the sample (the Register dock's);
    ``route``: the inputs the model is given."""
    region = options.region_he_px
    return {
        "route": route,
        "checkpoint_sha256": checkpoint_sha256,
        "he_path": str(Path(info.he_path).resolve()),
        "xenium_dir": str(Path(info.xenium_dir).resolve()) if info.xenium_dir else None,
        "he_to_global": _registration_record(info, options.he_to_global, applied),
        "region_he_px": None if region is None else [list(point) for point in region],
        "tiles_per_chunk": int(options.tiles_per_chunk),
        "min_transcripts": int(options.min_transcripts),
        "max_background": float(options.max_background),
        "interval_level": float(options.interval_level),
    }


def _registration_record(info, he_to_global, applied: dict | None = None) -> dict:
    """The H&E -> ``global`` map the tiles are cut with, as JSON: the given registration, else the
    one applied to the sample (``sdata.attrs``, as the tiling reads it), else its alignment matrix."""
    if he_to_global is None and applied is not None:
        return applied
    if he_to_global is None and info.xenium_dir is None:
        p = float(info.he_pixel_size_um)
        return {"model": "none", "matrix": np.diag([p, p, 1.0]).tolist(), "source": HE_FRAME_SOURCE}
    if he_to_global is None:
        return {"model": "affine", "matrix": info.he_to_global, "source": info.alignment_csv}
    if isinstance(he_to_global, np.ndarray):
        return {"model": "affine", "matrix": np.asarray(he_to_global, float).tolist(), "source": "given matrix"}
    from napari_morphomol.registration import FittedTransform, registration_record

    if isinstance(he_to_global, FittedTransform):
        return registration_record(he_to_global)
    raise InputError(f"he_to_global must be a 3 x 3 matrix or a fitted registration, got {type(he_to_global).__name__}")


def _complete_store_chunks(final: Path, fingerprint: dict) -> int | None:
    """The chunk count of a complete results store of ours at ``final`` made from the same inputs, else None."""
    if not RESULTS_STORE.is_ours(final):
        return None
    attrs = read_attrs(final)
    same = (attrs.get("status") == "complete" and attrs.get("format_version") == FORMAT_VERSION
            and attrs.get("fingerprint") == fingerprint)
    return int(attrs["n_chunks"]) if same else None


# -- open or resume -------------------------------------------------------------------------------


def _open_or_resume(partial: Path, inputs: _Inputs, options: PredictOptions, record: _CallRecord) -> dict:
    """The attributes of the ``.partial`` this call runs: the unfinished run of the same inputs, or a
    new one (call with the run's lock held)."""
    remove_abandoned_starts(partial)
    if is_unstarted_store(partial):  # a start killed before its attributes were written
        shutil.rmtree(partial)
    attrs = read_attrs(partial) if RESULTS_STORE.is_ours(partial) else None
    if attrs is not None and not options.overwrite:
        _check_resumable(partial, attrs, inputs.fingerprint, options.dtype)
        (partial / CANCEL_MARKER).unlink(missing_ok=True)
        return attrs
    tick = time.perf_counter()
    attrs = _start_store(partial, inputs, options, record)
    record.timings["tiling_s"] = time.perf_counter() - tick
    return attrs


def _check_resumable(partial: Path, attrs: dict, fingerprint: dict, dtype: str) -> None:
    """Refuse to resume an unfinished run of another format, other inputs or another dtype."""
    if attrs.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{partial} holds an unfinished run written by an older napari-morphomol (format "
                         f"{attrs.get('format_version')}); pass --overwrite to discard it and run predict again")
    if attrs.get("fingerprint") != fingerprint:
        raise InputError(
            f"{partial} holds an unfinished run with other inputs (checkpoint, sample, region or chunking); "
            "pass --overwrite to discard it, or resume it with its original inputs"
        )
    started_dtype = attrs.get("precision", {}).get("dtype")
    if dtype != "auto" and started_dtype not in (None, dtype):
        raise InputError(f"{partial} was started in {started_dtype}; resume it with dtype auto or "
                         f"{started_dtype}, or pass --overwrite to start again in another dtype")


def _start_store(partial: Path, inputs: _Inputs, options: PredictOptions, record: _CallRecord) -> dict:
    """Tile the sample and write the partial store: tile table (chunk order), tokens, measured counts.

    The store is written under a temporary name and renamed to ``partial`` when complete."""
    tiling = _tile(inputs, options, record)
    k = options.tiles_per_chunk
    order = chunk_order(tiling.tiles["row"].to_numpy(), tiling.tiles["col"].to_numpy(), k)
    tiles = tiling.tiles.iloc[order].reset_index(drop=True)
    tiles["chunk"] = np.arange(len(tiles)) // k
    measured = None
    if inputs.panel_match.addon_measured:
        measured = tiling.bins.tile_addon_counts(tiles["row"].to_numpy(), tiles["col"].to_numpy())
    attrs = _store_attrs(inputs, tiling, list(tiles.columns), record)
    with atomic_output(partial, RESULTS_STORE, inputs=inputs.paths, overwrite=options.overwrite) as tmp:
        create_partial_store(tmp, tiles=tiles, tiles_per_chunk=k, measured_counts=measured,
                             token_raster=None if tiling.bins is None else tiling.bins.tokens, attrs=attrs,
                             measured_token_raster=tiling.bins.addon_tokens if measured is not None else None)
    return read_attrs(partial)


def _tile(inputs: _Inputs, options: PredictOptions, record: _CallRecord):
    """The sample tiled with the card's tile geometry; a model whose transcripts miss the tiles is
    refused before the tiling's warnings are shown (they are moot then)."""
    from napari_morphomol.elements import TRANSCRIPTS
    from napari_morphomol.tiling import GenePanel, TilingOptions, tile_he_sample, tile_sample

    tiling_options = TilingOptions(spec=inputs.card.tile_geometry, min_transcripts=options.min_transcripts,
                                   max_background=options.max_background, region_he_px=options.region_he_px)
    if TRANSCRIPTS not in inputs.sdata.points:
        return tile_he_sample(inputs.sdata, options=tiling_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiling = tile_sample(inputs.sdata, panel=GenePanel(core=_core_genes(inputs),
                                                           addon=inputs.panel_match.addon_measured),
                             he_to_global=options.he_to_global, options=tiling_options)
    check_transcripts_meet_tiles(inputs.card, tiling, inputs.route)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if w.category.__module__.startswith("napari_morphomol"):
            record.raised.append({"source": "tiling", "category": w.category.__name__, "message": str(w.message)})
    return tiling


def _core_genes(inputs: _Inputs) -> tuple[str, ...]:
    """The core panel to bin: the card's, or for a model that reads no tokens one present gene (so
    the tiling has a core panel)."""
    from napari_morphomol.elements import TRANSCRIPTS
    from napari_morphomol.tiling import feature_names, is_control_feature

    card, addon_measured = inputs.card, inputs.panel_match.addon_measured
    if card.model.uses_transcripts:
        return card.core_genes
    core = tuple(gene for gene in card.core_genes if gene not in addon_measured)[:1]
    if not core:
        core = tuple(gene for gene in feature_names(inputs.sdata.points[TRANSCRIPTS])
                     if not is_control_feature(gene) and gene not in addon_measured)[:1]
    return core


def _store_attrs(inputs: _Inputs, tiling, tile_columns: list[str], record: _CallRecord) -> dict:
    """The metadata a new partial store starts with (see docs/inference.md)."""
    card, info, geometry, checkpoint = inputs.card, inputs.info, tiling.geometry, inputs.checkpoint
    return {
        "fingerprint": inputs.fingerprint,
        "route": inputs.route,
        "run_id": uuid.uuid4().hex,
        "started_at": _now(),
        "tile_columns": tile_columns,
        "addon_genes": list(card.addon_genes),
        "core_genes": list(card.core_genes),
        "measured_genes": list(inputs.panel_match.addon_measured),
        "outputs": output_records(inputs.output_specs),
        "tokens_per_tile": geometry.tokens_per_side ** 2,
        "model_card": json.loads(card.to_json()),
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": inputs.sha256,
                       "size_bytes": checkpoint.stat().st_size},
        "sample": {"xenium_dir": _absolute(info.xenium_dir), "he_path": _absolute(info.he_path),
                   "alignment_csv": _absolute(info.alignment_csv),
                   "xenium_pixel_size_um": info.xenium_pixel_size_um, "he_pixel_size_um": info.he_pixel_size_um,
                   "analysis_sw_version": info.analysis_sw_version},
        "registration": inputs.fingerprint["he_to_global"],
        "geometry": geometry.to_dict(),
        "geometry_args": {f.name: getattr(geometry, f.name) for f in dataclasses.fields(geometry)},
        "tiling_report": tiling.report,
        "warnings": _merged_warnings(_sample_warnings(inputs.sdata), record.raised),
        "segments": [],
    }


def _absolute(path) -> str | None:
    """A recorded sample path as an absolute one, so the run finds its sample from any folder."""
    return None if path is None else str(Path(path).absolute())


def _sample_warnings(sdata) -> list[dict]:
    """The warnings the sample recorded when it was loaded (``attrs['morphomol']['warnings']``)."""
    from napari_morphomol.elements import SAMPLE_ATTRS_KEY

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


# -- run --------------------------------------------------------------------------------------------


def _run(partial: Path, final: Path, attrs: dict, inputs: _Inputs, options: PredictOptions, scheduler: Scheduler,
         record: _CallRecord, progress: ProgressCallback | None, cancel: Callable[[], bool] | None) -> Path:
    """Calibrate (once per store), run the unfinished chunks and finalise the store."""
    spec = RunSpec(store=str(partial), run_id=attrs["run_id"], checkpoint=str(inputs.checkpoint.resolve()),
                   checkpoint_sha256=inputs.sha256, he_path=attrs["fingerprint"]["he_path"],
                   geometry=attrs["geometry_args"], device=options.device,
                   dtype=attrs.get("precision", {}).get("dtype") or "float32", batch_size=int(options.batch_size),
                   route=inputs.route, jpeg_device=options.jpeg_device)
    if "precision" not in attrs:
        spec, attrs = _calibrate(partial, spec, options, scheduler, record)
    run_warnings = _merged_warnings(attrs.get("warnings", []), record.raised)
    segments = attrs.get("segments", [])
    pending = [int(k) for k in np.flatnonzero(~read_done_mask(zarr.open_group(partial, mode="r")))]
    segment = {"scheduler": scheduler.description, "device_requested": options.device,
               "batch_size": int(options.batch_size)}
    tick = time.perf_counter()
    try:
        records = run_chunks(spec, pending, scheduler, partial, int(attrs["n_chunks"]), progress, cancel)
    except InferenceCancelled:
        finished = int(read_done_mask(zarr.open_group(partial, mode="r")).sum())
        segment.update(status="cancelled", finished_at=_now(), chunks_done_in_store=finished,
                       timings=record.total_timings())
        update_attrs(partial, {"segments": [*segments, segment], "warnings": run_warnings})
        raise
    record.timings["inference_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    token_maps = write_token_maps(zarr.open_group(partial, mode="r+"), attrs)
    record.timings["token_maps_s"] = time.perf_counter() - tick
    trust = write_trust(zarr.open_group(partial, mode="r+"), inputs.card, options.interval_level, inputs.route)
    segment.update(
        status="complete", finished_at=_now(), chunks_run=len(pending),
        tiles_run=int(sum(r["tiles"] for r in records)), devices=sorted({r["device"] for r in records}),
        batch_limit_after_oom=min((r["batch_limit"] for r in records if r["batch_limit"]), default=None),
        timings=record.total_timings(),
    )
    forget_run(str(partial))
    return finalise_store(partial, final, {"segments": [*segments, segment], "finished_at": segment["finished_at"],
                                           "warnings": run_warnings, "token_maps": token_maps, "trust": trust})


def _calibrate(partial: Path, spec: RunSpec, options: PredictOptions, scheduler: Scheduler,
               record: _CallRecord) -> tuple[RunSpec, dict]:
    """Choose the run's precision where its chunks run and record it; returns the spec in that dtype
    and the store's attributes."""
    tick = time.perf_counter()
    precision = _choose_precision(spec, options.dtype, scheduler)
    record.timings["calibration_s"] = time.perf_counter() - tick
    attrs = update_attrs(partial, {"precision": precision})
    if precision["fallback_note"] and not is_local(options.scheduler):
        record.warn(f"workers: {precision['fallback_note']}", DeviceFallbackWarning)
    return dataclasses.replace(spec, dtype=precision["dtype"]), attrs


def _choose_precision(spec: RunSpec, dtype: str, scheduler: Scheduler) -> dict:
    """The reference batch where the chunks will run (device, bf16 vs fp32 differences); the dtype
    asked for, or for ``auto`` the one fixed for that device kind (:func:`~.devices.auto_dtype`)."""
    (measured,) = compute(scheduler, [dask.delayed(calibrate, pure=False)(spec)])
    chosen, reason = (dtype, "requested") if dtype != "auto" else auto_dtype(measured["device"])
    return {"dtype": chosen, "reason": reason, **measured}
