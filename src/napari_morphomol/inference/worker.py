"""What runs inside a dask task: one chunk of tiles from H&E pixels and token counts to stored rows.

A task carries only a small :class:`RunSpec` and a chunk number. Everything heavy is opened on
the worker and cached per process: the model (once per checkpoint and device, whatever the
store), and per run the results store, the token raster and the H&E levels, read straight from
the file's own tiles (no dask inside a task, so nothing nests on a distributed worker).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from napari_morphomol.errors import InputError
from napari_morphomol.inference.devices import autocast, is_out_of_memory, resolve_device
from napari_morphomol.inference.store import CANCEL_MARKER, tile_groups
from napari_morphomol.tiling import LevelSampler, TileGeometry

PREFETCH_BATCHES = 2
_CACHE_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], LoadedModel] = {}
_RUNS: OrderedDict[tuple[str, str], RunContext] = OrderedDict()
_MAX_OPEN_RUNS = 4
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


class InferenceCancelled(Exception):
    """The run was cancelled; its store keeps every finished chunk and can be resumed."""


@dataclass(frozen=True)
class RunSpec:
    """Everything a task needs, by path: cheap to pickle, the same for every chunk of a run."""

    store: str
    run_id: str
    checkpoint: str
    checkpoint_sha256: str
    he_path: str
    geometry: dict
    device: str
    dtype: str
    batch_size: int
    torch_threads: int | None = None
    route: str | None = None
    """Which inputs the model is given (``models.config.ROUTES``); None: every input it reads."""
    jpeg_device: str | None = None
    """Decode the H&E's JPEG tiles on this torch device (``"cuda"``; see :class:`TiffLevel`); None: on the CPU."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    card: object
    device: torch.device
    fallback_note: str | None
    lock: threading.Lock
    batch_limit: int | None = None
    """Largest batch this device managed after running out of memory (None: no limit yet)."""
    _output_specs: tuple | None = field(default=None, init=False, repr=False)

    @property
    def output_specs(self) -> tuple:
        """What the card's architecture emits (:func:`card_output_specs`), in its declared order."""
        if self._output_specs is None:
            self._output_specs = card_output_specs(self.card)
        return self._output_specs


def card_output_specs(card) -> tuple:
    """``model.output_specs()`` of the card's architecture, built on the meta device (no weights)."""
    from napari_morphomol.models import build_model

    with torch.device("meta"):
        model = build_model(card.model)
        return tuple(model.output_specs())


class StoredLevel:
    """One H&E pyramid level as ``(y, x, 3)`` uint8, read from the TIFF's own tiles via zarr (the
    layouts :class:`TiffLevel` does not read: planes per channel, several pages per level).

    ``chunks`` are the stored tiles (dask-style tuples), so :class:`LevelSampler` decodes each
    stored tile of a task's area exactly once.
    """

    def __init__(self, array: zarr.Array) -> None:
        lead = 0
        while array.ndim - lead > 3 and array.shape[lead] == 1:
            lead += 1
        rest = array.shape[lead:]
        if len(rest) != 3 or not (rest[-1] in (3, 4) or rest[0] in (3, 4)):
            raise InputError(f"the H&E level has shape {array.shape}; expected height x width x 3 RGB")
        self.channels_last = rest[-1] in (3, 4)
        self._array = array
        self._lead = (0,) * lead
        y_axis = lead if self.channels_last else lead + 1
        height, width = array.shape[y_axis], array.shape[y_axis + 1]
        chunk_y, chunk_x = array.chunks[y_axis], array.chunks[y_axis + 1]
        self.shape = (height, width, 3)
        self.ndim = 3
        self.dtype = array.dtype
        self.chunks = (_regular(height, chunk_y), _regular(width, chunk_x), (3,))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        if self.channels_last:
            return np.asarray(self._array[(*self._lead, ys, xs, slice(0, 3))])
        return np.moveaxis(np.asarray(self._array[(*self._lead, slice(0, 3), ys, xs)]), 0, -1)


class TiffLevel:
    """One H&E pyramid level as ``(y, x, 3)`` uint8, decoded straight from the TIFF's tiles (or
    strips) with tifffile's own decoder for the page, read with ``os.pread`` (thread-safe, no seek).

    The same pixels as :class:`StoredLevel` at about 0.75 of its CPU time per stored tile (zarr's
    asynchronous store adds a third to a JPEG tile's decode). ``chunks`` are the stored tiles.

    With ``jpeg_device`` (a torch device, e.g. ``"cuda"``) the JPEG tiles of a YCbCr JPEG level are
    decoded by ``torchvision.io.decode_jpeg`` on that device instead, :data:`JPEG_BATCH` tiles of a
    row per call (nvJPEG on CUDA), and come back to host memory; the pixels can differ from
    libjpeg-turbo's by a few levels (another IDCT and chroma upsampling).
    """

    def __init__(self, page, he_path: str, jpeg_device: str | None = None) -> None:
        self._decode = page.decode
        self._decode_args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        height, width = int(page.imagelength), int(page.imagewidth)
        self._tile = (int(page.chunks[0]), int(page.chunks[1]))
        self._tiles_x = -(-width // self._tile[1])
        self.shape = (height, width, 3)
        self.ndim = 3
        self.dtype = page.dtype
        self.chunks = (_regular(height, self._tile[0]), _regular(width, self._tile[1]), (3,))
        self.jpeg_device = jpeg_device if jpeg_device is not None and _torch_decodes(page) else None
        self._jpeg_tables = page.jpegtables
        self._decoded = threading.local()  # per thread: {(ty, tx): tile} of its last JPEG batch
        # the level's own handle, opened last (nothing above leaves it open when it raises);
        # closed by close(), or with the level when the run context holding it is dropped
        self._file = open(he_path, "rb")  # noqa: SIM115

    def close(self) -> None:
        """Close the level's file handle."""
        self._file.close()

    @staticmethod
    def reads(page, n_pages: int) -> bool:
        """Whether a level of ``n_pages`` pages with this first page is one this class reads.

        Parameters
        ----------
        page
            The level's first (key) tifffile page.
        n_pages
            How many pages the level has.

        Returns
        -------
        bool
            True for one interleaved RGB(A) page of 2-D tiles or strips.
        """
        return (n_pages == 1 and page.planarconfig == 1 and page.samplesperpixel in (3, 4)
                and page.imagedepth == 1 and len(page.chunks) == 3)

    def _read(self, index: int) -> bytes | None:
        count = int(self._counts[index])
        return os.pread(self._file.fileno(), count, int(self._offsets[index])) if count else None

    def stored_tile(self, ty: int, tx: int) -> np.ndarray | None:
        """One stored tile, decoded.

        Parameters
        ----------
        ty, tx
            The tile's row and column in the level's grid of stored tiles.

        Returns
        -------
        numpy.ndarray or None
            The tile as (rows, cols, samples) (edge tiles may be padded), or None if it is not stored.
        """
        if self.jpeg_device is not None:
            return self._torch_decoded(ty, tx)
        index = ty * self._tiles_x + tx
        decoded = self._decode(self._read(index), index, **self._decode_args)[0]
        return None if decoded is None else decoded[0]

    def _torch_decoded(self, ty: int, tx: int) -> np.ndarray | None:
        """Tile ``(ty, tx)`` from this thread's last batch, decoding the row's next tiles from it on a miss."""
        batch = getattr(self._decoded, "tiles", {})
        if (ty, tx) not in batch:
            from torchvision.io import ImageReadMode, decode_jpeg

            keys = [(ty, x) for x in range(tx, min(tx + JPEG_BATCH, self._tiles_x))]
            streams = {key: self._read(key[0] * self._tiles_x + key[1]) for key in keys}
            present = [key for key in keys if streams[key] is not None]
            data = [torch.frombuffer(bytearray(_with_tables(streams[key], self._jpeg_tables)), dtype=torch.uint8)
                    for key in present]
            batch = {key: None for key in keys}
            if data:  # one copy back for the batch, (tiles, y, x, 3) made contiguous on the device
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.jpeg_device)
                host = torch.stack(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()
                batch.update(zip(present, host, strict=True))
            self._decoded.tiles = batch
        return batch[(ty, tx)]

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        (y0, y1, _), (x0, x1, _) = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        (th, tw) = self._tile
        out = None
        for ty in range(y0 // th, -(-y1 // th)):
            for tx in range(x0 // tw, -(-x1 // tw)):
                tile = self.stored_tile(ty, tx)
                ya, yb = max(y0, ty * th), min(y1, (ty + 1) * th)
                xa, xb = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                part = None if tile is None else tile[ya - ty * th:yb - ty * th, xa - tx * tw:xb - tx * tw, :3]
                if out is None and part is not None and (ya, yb, xa, xb) == (y0, y1, x0, x1):
                    return part  # the window is one stored tile's part: no copy
                if out is None:
                    out = np.zeros((y1 - y0, x1 - x0, 3), dtype=self.dtype)
                if part is not None:
                    out[ya - y0:yb - y0, xa - x0:xb - x0] = part
        return out if out is not None else np.zeros((y1 - y0, x1 - x0, 3), dtype=self.dtype)


JPEG_BATCH = 8
"""Stored tiles of a row that :class:`TiffLevel` decodes per ``decode_jpeg`` call on a torch device."""


def _torch_decodes(page) -> bool:
    """Whether torchvision's JPEG decoder reads this level: tiled JPEG in YCbCr (the scanners' kind)."""
    return page.compression == 7 and page.photometric == 6 and page.is_tiled


def _with_tables(stream: bytes, tables: bytes | None) -> bytes:
    """A TIFF JPEG tile as a whole JPEG stream: the shared JPEGTables spliced in after its SOI marker."""
    return stream if not tables else tables[:-2] + stream[2:]


def _regular(size: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, size - start) for start in range(0, size, step))


def open_he_levels(he_path: str, jpeg_device: str | None = None) -> list[StoredLevel | TiffLevel]:
    """The H&E pyramid's levels, finest first: :class:`TiffLevel` where the layout allows, else
    :class:`StoredLevel`.

    Parameters
    ----------
    he_path
        The H&E TIFF (OME-TIFF, SVS, pyramidal TIFF).
    jpeg_device
        Decode YCbCr JPEG tiles with torchvision on this torch device (``"cuda"``); None: tifffile's
        decoders (libjpeg-turbo, zlib, ...) on the CPU.

    Returns
    -------
    list
        One ``(y, x, 3)`` uint8 level per pyramid level, each with ``chunks`` = its stored tiles.
    """
    import tifffile

    tif = None
    try:
        tif = tifffile.TiffFile(he_path)
        series = tif.series[0]
        levels = series.levels
        if all(TiffLevel.reads(level.keyframe, len(level.pages)) for level in levels):
            with tif:  # each level reads with its own handle
                opened: list[TiffLevel] = []
                try:
                    for level in levels:
                        opened.append(TiffLevel(level.keyframe, he_path, jpeg_device))
                except BaseException:
                    for done in opened:
                        done.close()
                    raise
                return opened
        group = zarr.open(series.aszarr(), mode="r")  # the store reads through the open TiffFile
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
        if tif is not None:
            tif.close()
        raise InputError(
            f"the worker cannot read the H&E image {he_path} ({exc}); is it on a filesystem the workers share?"
        ) from exc
    arrays = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(levels))]
    return [StoredLevel(a) for a in arrays]


@dataclass
class RunContext:
    """One run's open store arrays, tile positions and H&E reader on this worker."""

    root: zarr.Group
    rows: np.ndarray
    cols: np.ndarray
    tiles_per_chunk: int
    geometry: TileGeometry
    sampler: LevelSampler | None
    tokens: zarr.Array | None

    @classmethod
    def open(cls, spec: RunSpec, uses_image: bool, uses_transcripts: bool) -> RunContext:
        from napari_morphomol.inference.store import ATTRS_KEY

        root = zarr.open_group(spec.store, mode="r+")
        attrs = root.attrs[ATTRS_KEY]
        geometry = TileGeometry(**spec.geometry)
        sampler = LevelSampler(geometry, open_he_levels(spec.he_path, spec.jpeg_device)) if uses_image else None
        return cls(root, root["tiles/row"][:], root["tiles/col"][:], int(attrs["tiles_per_chunk"]), geometry, sampler,
                   root["inputs/tokens"] if uses_transcripts else None)


def loaded_model(spec: RunSpec) -> LoadedModel:
    """The run's checkpoint on this process's device (see :func:`load_model`)."""
    return load_model(spec.checkpoint, spec.checkpoint_sha256, spec.device, spec.torch_threads)


def load_model(checkpoint: str, checkpoint_sha256: str, device: str, torch_threads: int | None = None) -> LoadedModel:
    """The checkpoint on ``device``, loaded once per process and shared by every task and run.

    Parameters
    ----------
    checkpoint
        Path of the .safetensors checkpoint.
    checkpoint_sha256
        Its hash (the cache key, with ``device``).
    device
        As given to :func:`~.devices.resolve_device`.
    torch_threads
        Torch's thread count for this process, set before the first load (None: leave it).

    Returns
    -------
    LoadedModel
        Raises InputError when the weights do not match the card's architecture.
    """
    key = (checkpoint_sha256, device)
    with _CACHE_LOCK:
        if key not in _MODELS:
            from napari_morphomol.models import load_checkpoint

            if torch_threads:
                torch.set_num_threads(torch_threads)
            resolved, note = resolve_device(device)
            model, card = load_checkpoint(checkpoint, resolved)
            _MODELS[key] = LoadedModel(model, card, resolved, note, threading.Lock())
        return _MODELS[key]


def run_context(spec: RunSpec, loaded: LoadedModel) -> RunContext:
    key = (spec.store, spec.run_id)
    with _CACHE_LOCK:
        if key not in _RUNS:
            _RUNS[key] = RunContext.open(spec, *loaded.card.model.route_reads(spec.route))
            while len(_RUNS) > _MAX_OPEN_RUNS:
                _RUNS.popitem(last=False)
        _RUNS.move_to_end(key)
        return _RUNS[key]


def forget_run(store: str) -> None:
    """Drop a run's open handles (after it was finalised and moved)."""
    with _CACHE_LOCK:
        for key in [k for k in _RUNS if k[0] == store]:
            del _RUNS[key]


def is_cancelled(spec: RunSpec) -> bool:
    return (Path(spec.store) / CANCEL_MARKER).exists()


Batch = tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]


def chunk_batches(ctx: RunContext, rows: np.ndarray, cols: np.ndarray, batch_size: int, pin: bool) -> Iterator[Batch]:
    """``(positions, images (B, 3, 224, 224) uint8, tokens (B, 196, G) float32)`` of a chunk's tiles.

    Per group (one band's run of neighbouring columns) the H&E area is decoded once
    (LevelSampler) and the token raster is read as one window.
    """
    s, t = ctx.geometry.stride_tokens, ctx.geometry.tokens_per_side
    for group in tile_groups(rows, cols, ctx.tiles_per_chunk):
        g_rows, g_cols = rows[group], cols[group]
        window = None
        if ctx.tokens is not None:
            r0, c0 = s * int(g_rows.min()), s * int(g_cols.min())
            window = np.asarray(ctx.tokens[r0:s * int(g_rows.max()) + t, c0:s * int(g_cols.max()) + t])

        def tokens_of(local: np.ndarray) -> torch.Tensor | None:
            if window is None:
                return None
            stack = np.stack([window[s * int(i) - r0:s * int(i) - r0 + t, s * int(j) - c0:s * int(j) - c0 + t]
                              for i, j in zip(g_rows[local], g_cols[local], strict=True)], dtype=np.float32)
            tensor = torch.from_numpy(stack.reshape(len(local), t * t, -1))
            return tensor.pin_memory() if pin else tensor

        if ctx.sampler is None:
            for start in range(0, len(group), batch_size):
                local = np.arange(start, min(start + batch_size, len(group)))
                yield group[local], None, tokens_of(local)
            continue
        for local, images in ctx.sampler.iter_tiles(g_rows, g_cols, batch_size=batch_size):
            tensor = torch.from_numpy(images)
            if pin:
                tensor = tensor.pin_memory()
            yield group[local], tensor.permute(0, 3, 1, 2), tokens_of(local)


def prefetched(batches: Iterator[Batch], depth: int = PREFETCH_BATCHES) -> Iterator[Batch]:
    """Decode the next ``depth`` batches in a thread while the current one is computed."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def offer(item) -> bool:
        """Queue ``item`` unless the consumer has stopped listening."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
            offer(finished)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            offer(error)

    thread = threading.Thread(target=produce, name="morphomol-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def forward(loaded: LoadedModel, images: torch.Tensor | None, tokens: torch.Tensor | None, dtype: str
            ) -> tuple[np.ndarray, ...]:
    """One float32 numpy array per output the model declares (``loaded.output_specs``, in that
    order), in sub-batches no larger than the device's limit; running out of memory halves the
    limit for good and retries."""
    n = len(images) if images is not None else len(tokens)
    parts: list[tuple[np.ndarray, ...]] = []
    start = 0
    while start < n:
        size = min(n - start, loaded.batch_limit or n)
        part = slice(start, start + size)
        try:
            with loaded.lock:
                arrays = _forward_once(loaded, None if images is None else images[part],
                                       None if tokens is None else tokens[part], dtype)
        except Exception as error:
            if not is_out_of_memory(error) or size == 1:
                raise
            loaded.batch_limit = max(1, size // 2)
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        parts.append(arrays)
        start += size
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _forward_once(loaded: LoadedModel, images, tokens, dtype: str) -> tuple[np.ndarray, ...]:
    device = loaded.device
    non_blocking = device.type == "cuda"
    if images is not None:
        images = images.to(device, non_blocking=non_blocking)
    if tokens is not None:
        tokens = tokens.to(device, non_blocking=non_blocking)
    with torch.inference_mode(), autocast(device, dtype):
        output = loaded.model(images, tokens)
    return tuple(output_tensor(output, spec).float().cpu().numpy() for spec in loaded.output_specs)


def output_tensor(output, spec) -> torch.Tensor:
    """The tensor of ``spec`` in a ``ModelOutput``: a tile-level field, or one of its ``token_outputs``."""
    return output.token_outputs[spec.name] if spec.level == "token" else getattr(output, spec.name)


def release_freed_memory() -> None:
    """Hand memory freed by the chunk back to the OS (glibc keeps it in its arenas otherwise, and a
    long run's resident size creeps up chunk by chunk). No-op where there is no ``malloc_trim``."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def run_chunk(spec: RunSpec, chunk: int) -> dict:
    """Predict chunk ``chunk`` and write its rows, then its done flag. Returns a timing record."""
    started = time.perf_counter()
    loaded = loaded_model(spec)
    ctx = run_context(spec, loaded)
    if is_cancelled(spec):
        raise InferenceCancelled(f"cancelled before chunk {chunk}")
    k = ctx.tiles_per_chunk
    a, b = chunk * k, min(len(ctx.rows), (chunk + 1) * k)
    rows, cols = ctx.rows[a:b], ctx.cols[a:b]
    names = [output.name for output in loaded.output_specs]
    rows_of = {name: np.full((b - a, *ctx.root[name].shape[1:]), np.nan, dtype=np.float32) for name in names}
    pin = loaded.device.type == "cuda"
    compute_seconds = 0.0
    for positions, images, tokens in prefetched(chunk_batches(ctx, rows, cols, spec.batch_size, pin)):
        if is_cancelled(spec):
            raise InferenceCancelled(f"cancelled during chunk {chunk}")
        tick = time.perf_counter()
        for name, values in zip(names, forward(loaded, images, tokens, spec.dtype), strict=True):
            rows_of[name][positions] = values
        compute_seconds += time.perf_counter() - tick
    if any(np.isnan(values).any() for values in rows_of.values()):
        raise RuntimeError(f"chunk {chunk}: some tiles were not predicted (internal error)")
    for name, values in rows_of.items():
        ctx.root[name][a:b] = values
    seconds = time.perf_counter() - started
    ctx.root["chunk_seconds"][chunk] = seconds
    ctx.root["done"][chunk] = True
    release_freed_memory()
    return {"chunk": chunk, "tiles": b - a, "seconds": seconds, "compute_seconds": compute_seconds,
            "batch_limit": loaded.batch_limit, "device": str(loaded.device)}


def calibrate(spec: RunSpec, max_tiles: int = 8) -> dict:
    """Where this worker runs, and how far bf16 autocast is from fp32 on a reference batch of the
    run's first tiles (recorded beside the dtype, which :func:`~.devices.auto_dtype` fixes per device kind)."""
    loaded = loaded_model(spec)
    ctx = run_context(spec, loaded)
    n = min(max_tiles, spec.batch_size, len(ctx.rows))
    _, images, tokens = next(chunk_batches(ctx, ctx.rows[:n], ctx.cols[:n], n, pin=False))
    with loaded.lock:
        outputs = {dtype: _forward_once(loaded, images, tokens, dtype) for dtype in ("float32", "bfloat16")}
    diffs = {}
    for i, output in enumerate(loaded.output_specs):
        diff = float(np.max(np.abs(outputs["bfloat16"][i] - outputs["float32"][i]), initial=0.0))
        diffs[f"max_abs_diff_{output.name}"] = diff if math.isfinite(diff) else None
    return {
        "device": str(loaded.device),
        "device_name": (torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda"
                        else loaded.device.type),
        "fallback_note": loaded.fallback_note,
        "reference_tiles": len(images if images is not None else tokens),
        **diffs,
    }
