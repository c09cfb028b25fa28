"""The results store (``RESULTS.zarr``) of one prediction run, and its reader.

Layout (zarr v3 group; ``K`` = tiles per chunk):

- attrs ``morphomol_results``: format version, status, counts, genes, the outputs (below), model
  card, checkpoint, sample, registration, geometry, tiling report, precision, device, scheduler,
  timings (see docs/inference.md).
- ``tiles/<column>``: the tile table, one 1-D array per column, rows in *chunk order*: chunk ``k``
  is rows ``[k*K, (k+1)*K)``, a spatially contiguous group of tiles (column ``chunk``).
- ``<output name>``: one float32 array per output the model declares (``model.output_specs()``,
  recorded as ``outputs`` in the attrs, in that order): a tile-level output is (tiles, width), a
  token-level one (tiles, tokens, width). Today's models declare ``predictions`` (tiles, add-on
  genes; log1p expression) and ``embeddings`` (tiles, d). Zarr chunks are ``(K, ...)``: each task
  writes exactly one zarr chunk per output, so tasks never write the same file and a killed task
  leaves either the old or the new file (zarr writes files atomically).
- ``measured_counts`` (tiles, measured add-on genes) uint32, when the sample measured add-on genes;
  then also ``measured_token_counts`` (token rows, token cols, measured add-on genes) uint32, the
  sample's add-on counts per token of the token raster (a tile's window sums to its row of
  ``measured_counts``; absent from runs made before it existed).
- ``token_maps/{predicted,measured}/<level>`` (genes, token rows, token cols) float32: the
  stitched token maps of a model with the add-on token head, written when every chunk is done
  (see :mod:`.token_maps`).
- ``done`` (chunks,) bool, one zarr chunk per element: set after the chunk's rows are written.
- ``chunk_seconds`` (chunks,) float64: wall time of each chunk's task.

While running, the store is ``RESULTS.zarr.partial`` beside the final path and also holds
``inputs/tokens`` (the core-gene token raster the tasks read). It is written under a temporary
name and renamed to ``.partial`` once its tile table, token raster and attributes are complete,
so a ``.partial`` always carries its run's fingerprint. Finalising removes ``inputs`` and renames
the folder to ``RESULTS.zarr`` in one ``os.replace``: a store under the final name is always
complete. ``RESULTS.zarr.lock`` beside them is held (``flock``) by the one run writing them.

Format 2 (this one) names its arrays by output; a store of format 1 (a fixed predictions +
embeddings pair, cell-named geometry) is refused with "run `morphomol predict` again".
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from napari_morphomol._atomic import open_versioned_group, replace_path, zarr_store_kind
from napari_morphomol.errors import InputError

FORMAT_VERSION = 2
ATTRS_KEY = "morphomol_results"
RESULTS_STORE = zarr_store_kind("results store", ATTRS_KEY)
"""What ``--overwrite`` may replace: a store (final or partial) carrying our ``morphomol_results`` marker."""
RESULTS_LAYER_KEY = "morphomol_results"
"""napari layer metadata key holding the path of the results store the layer shows."""
CANCEL_MARKER = ".cancel"
"""Token rows (and columns) per zarr chunk of ``inputs/tokens``."""
TOKEN_MAPS = "token_maps"
"""The group of stitched token maps (:mod:`.token_maps`)."""
TRUST = "trust"
"""The group of interval bounds and out-of-distribution flags (:mod:`.trust`)."""
_STORE_ENTRIES = {"zarr.json", "tiles", "measured_counts", "measured_token_counts", TOKEN_MAPS, TRUST, "done",
                  "chunk_seconds", "inputs", CANCEL_MARKER}
"""Every name a results store of ours holds at its top level besides its outputs (no output takes one)."""


def partial_path(store_path: str | Path) -> Path:
    """Where an unfinished run keeps its work: ``RESULTS.zarr.partial`` beside ``RESULTS.zarr``."""
    path = Path(store_path)
    return path.with_name(path.name + ".partial")


def lock_path(store_path: str | Path) -> Path:
    """The lock of the run writing ``store_path``: ``RESULTS.zarr.lock`` beside ``RESULTS.zarr``."""
    path = Path(store_path)
    return path.with_name(path.name + ".lock")


@contextmanager
def run_lock(store_path: str | Path) -> Iterator[Path]:
    """Hold ``RESULTS.zarr.lock`` (an exclusive ``flock``, released by the kernel even when the
    process is killed) while this run writes ``store_path``; the file holds pid, host and start.

    Raises InputError naming the holder when another run has it, or when the folder cannot be written.
    """
    path = lock_path(store_path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            from napari_morphomol._atomic import os_error_message

            raise InputError(os_error_message(Path(store_path), exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(f"another predict ({holder}) is writing {Path(store_path).name}; wait for it or stop "
                             f"it (if no such run is alive, delete {path})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed the file between our open and lock
        except FileNotFoundError:
            pass
        os.close(fd)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": started}).encode())
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no other run holds this file
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "just starting"


def is_unstarted_store(path: Path) -> bool:
    """Whether ``path`` is a results store whose start was cut short (a folder holding only the
    names of our layout, without a run fingerprint in its attributes): ours, empty, safe to restart."""
    if not path.is_dir() or not all(entry.name in _STORE_ENTRIES or _is_zarr_array(entry) for entry in path.iterdir()):
        return False
    try:
        document = json.loads((path / "zarr.json").read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    if not isinstance(document, dict) or document.get("node_type") != "group":
        return False
    attrs = (document.get("attributes") or {}).get(ATTRS_KEY)
    return not isinstance(attrs, dict) or "fingerprint" not in attrs


def _is_zarr_array(entry: Path) -> bool:
    """Whether ``entry`` is a zarr v3 array folder (an output array of a store)."""
    try:
        return json.loads((entry / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def remove_abandoned_starts(partial: Path) -> None:
    """Delete the temporary folders of starts of ``partial`` that were killed (call with the run's lock held)."""
    pattern = re.compile(rf"\.{re.escape(partial.name)}\.\d+-[0-9a-f]{{8}}\.tmp")
    for entry in partial.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def partial_progress(store_path: str | Path) -> tuple[int, int] | None:
    """(finished chunks, chunks) of the unfinished run of ``store_path``, or None when it has no ``.partial``."""
    path = partial_path(store_path)
    try:
        root = zarr.open_group(path, mode="r")
        return int(read_done_mask(root).sum()), int(dict(root.attrs[ATTRS_KEY])["n_chunks"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def band_rows(tiles_per_chunk: int) -> int:
    """Tile rows per band: about sqrt(K), so that a chunk of K tiles is a near-square block."""
    return max(1, round(math.sqrt(tiles_per_chunk)))


def chunk_order(rows: np.ndarray, cols: np.ndarray, tiles_per_chunk: int) -> np.ndarray:
    """Order of tiles such that every run of ``tiles_per_chunk`` is spatially contiguous.

    Tiles go in bands of :func:`band_rows` tile rows, column by column inside a band, so a chunk
    is a near-square block and the H&E area its task decodes is little more than its tiles' own.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    return np.lexsort((rows, cols, rows // band_rows(tiles_per_chunk)))


def tile_groups(rows: np.ndarray, cols: np.ndarray, tiles_per_chunk: int, max_gap: int = 2) -> list[np.ndarray]:
    """Positions of a chunk's tiles split by band and where columns jump by more than ``max_gap``
    (tissue gaps), so no task decodes H&E between two pieces of tissue or two bands."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    band = rows // band_rows(tiles_per_chunk)
    order = np.lexsort((cols, band))
    breaks = (np.diff(band[order]) != 0) | (np.diff(cols[order]) > max_gap)
    return np.split(order, np.flatnonzero(breaks) + 1)


def output_records(specs) -> list[dict]:
    """The model's output specs as the store records them (attrs ``outputs``); refuses a name the
    store's own layout uses."""
    records = []
    for spec in specs:
        if spec.name in _STORE_ENTRIES or spec.level not in ("tile", "token"):
            raise ValueError(f"output {spec.name!r} ({spec.level}) cannot be stored: the name is taken or the "
                             "level is not 'tile' or 'token' (internal error)")
        records.append({"name": str(spec.name), "level": str(spec.level), "width": int(spec.width)})
    return records


def output_shape(record: dict, n_tiles: int, n_tokens: int) -> tuple[int, ...]:
    """(tiles, width) of a tile-level output, (tiles, tokens, width) of a token-level one."""
    if record["level"] == "token":
        return n_tiles, n_tokens, record["width"]
    return n_tiles, record["width"]


def create_partial_store(path: Path, *, tiles: pd.DataFrame, tiles_per_chunk: int, measured_counts: np.ndarray | None,
                         token_raster, attrs: dict, measured_token_raster=None) -> zarr.Group:
    """A fresh run store at ``path`` (the partial folder); ``tiles`` already in chunk order, ``attrs``
    holding the ``outputs`` records (:func:`output_records`) and ``tokens_per_tile``; ``token_raster``
    the core-gene counts the tasks read (None for a run that reads no transcripts);
    ``measured_token_raster`` (a ``tiling.TokenRaster`` of the measured add-on genes) with
    ``measured_counts``."""
    from napari_morphomol.tiling.store import write_token_raster

    if path.exists():
        shutil.rmtree(path)
    n_tiles = len(tiles)
    n_chunks = max(1, math.ceil(n_tiles / tiles_per_chunk))
    root = zarr.open_group(path, mode="w", zarr_format=3)
    table = root.create_group("tiles")
    for column in tiles.columns:
        values = tiles[column].to_numpy()
        table.create_array(column, data=values, chunks=(max(1, min(len(values), 65536)),))
    k = max(1, min(tiles_per_chunk, n_tiles))
    for record in attrs["outputs"]:
        shape = output_shape(record, n_tiles, int(attrs["tokens_per_tile"]))
        dims = ("tile", "token", "feature") if record["level"] == "token" else ("tile", "feature")
        root.create_array(record["name"], shape=shape, dtype=np.float32, chunks=(k, *(max(n, 1) for n in shape[1:])),
                          fill_value=np.nan, dimension_names=dims)
    if measured_counts is not None:
        root.create_array("measured_counts", data=measured_counts.astype(np.uint32),
                          chunks=(max(1, min(n_tiles, 8192)), max(measured_counts.shape[1], 1)),
                          dimension_names=("tile", "measured_gene"))
    if measured_token_raster is not None:
        write_token_raster(root, "measured_token_counts", measured_token_raster, "measured_gene")
    root.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False)
    root.create_array("chunk_seconds", shape=(n_chunks,), dtype=np.float64, chunks=(1,), fill_value=np.nan)
    if token_raster is not None:  # None: an image-only run reads no transcripts
        write_token_raster(root.require_group("inputs"), "tokens", token_raster, "core_gene")
    root.attrs[ATTRS_KEY] = {**attrs, "format_version": FORMAT_VERSION, "status": "running",
                             "n_tiles": n_tiles, "n_chunks": n_chunks, "tiles_per_chunk": tiles_per_chunk}
    return root


def recorded_he_to_global(attrs: dict, where) -> np.ndarray:
    """The run's H&E px -> ``global`` map as one 3 x 3 matrix (per-region fits: their best affine),
    from its ``morphomol_results`` attributes; ``where`` names the store in the error."""
    registration = attrs.get("registration") or {}
    matrix = registration.get("matrix") or registration.get("best_affine")
    if matrix is None:
        raise InputError(f"{where} records no H&E -> Xenium registration matrix; run predict again")
    return np.asarray(matrix, dtype=np.float64)


def read_attrs(path: Path) -> dict:
    """The ``morphomol_results`` attributes of the store at ``path``; InputError when it is none."""
    try:
        return dict(zarr.open_group(path, mode="r").attrs.get(ATTRS_KEY, {}))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{path} exists but is not a results store ({exc}); move it away or pass --overwrite") from exc


def update_attrs(path: Path, update: dict) -> dict:
    """Merge ``update`` into the store's attributes; returns them."""
    root = zarr.open_group(path, mode="r+")
    attrs = {**dict(root.attrs[ATTRS_KEY]), **update}
    root.attrs[ATTRS_KEY] = attrs
    return attrs


def read_done_mask(root: zarr.Group) -> np.ndarray:
    """Which chunks are finished; an unreadable entry (never expected, zarr writes atomically)
    counts as not done, so the chunk is simply computed again."""
    done = root["done"]
    try:
        return np.asarray(done[:], dtype=bool)
    except Exception:  # noqa: BLE001 - any decoding failure means "redo"
        mask = np.zeros(done.shape[0], dtype=bool)
        for k in range(done.shape[0]):
            try:
                mask[k] = bool(done[k])
            except Exception:  # noqa: BLE001
                mask[k] = False
        return mask


def finalise_store(partial: Path, final: Path, attrs_update: dict) -> Path:
    """Drop the run's inputs, mark the store complete and move it to ``final`` in one rename."""
    root = zarr.open_group(partial, mode="r+")
    if "inputs" in root:
        del root["inputs"]
    (partial / CANCEL_MARKER).unlink(missing_ok=True)
    root.attrs[ATTRS_KEY] = {**dict(root.attrs[ATTRS_KEY]), **attrs_update, "status": "complete"}
    replace_path(partial, final)
    return final


@dataclass
class Results:
    """A prediction run: one row per tile in every array and in ``tiles``."""

    path: Path
    tiles: pd.DataFrame
    """id, row, col, H&E px box, centre in ``global`` px and um, transcript counts, chunk."""
    addon_genes: list[str]
    outputs: dict[str, np.ndarray]
    """One float32 array per output the model declared, by name, in the order of ``metadata['outputs']``:
    (tiles, width) for a tile-level output, (tiles, tokens, width) for a token-level one (read
    lazily: a zarr array, since it holds 196 values a tile)."""
    measured_genes: list[str]
    """The add-on genes the sample measured (a subset of ``addon_genes``, same order)."""
    measured_counts: np.ndarray | None
    """(tiles, measured genes) uint32 measured add-on counts per tile, or None."""
    metadata: dict
    measured_token_counts: zarr.Array | None = None
    """(token rows, token cols, measured genes) uint32 measured add-on counts per token, read lazily;
    None when nothing was measured (or for runs made before it was stored)."""
    token_maps: dict = field(default_factory=dict)
    """The stitched token maps by kind ("predicted", "measured"), ``token_maps.TokenMapImage``
    read lazily; empty for a tile-only model (or a run made before they were stored)."""
    trust: object = None
    """The run's ``trust.RunTrust``: interval bounds and out-of-distribution flags, or why there are none."""

    def output(self, name: str) -> np.ndarray:
        """The array of the output ``name``; InputError naming the outputs this run holds."""
        if name not in self.outputs:
            raise InputError(f"the run in {self.path} holds no output {name!r}; its model declared "
                             f"{', '.join(self.outputs) or 'none'}")
        return self.outputs[name]

    @property
    def output_specs(self) -> tuple:
        """The model's declared outputs (``OutputSpec``), as the store recorded them."""
        from napari_morphomol.models.config import OutputSpec

        return tuple(OutputSpec(**record) for record in self.metadata["outputs"])

    @property
    def predictions(self) -> np.ndarray:
        """(tiles, add-on genes) float32, predicted log1p expression summed over the tile."""
        return self.output("predictions")

    @property
    def embeddings(self) -> np.ndarray:
        """(tiles, d) float32 tile embeddings."""
        return self.output("embeddings")

    @property
    def measured_log1p(self) -> np.ndarray | None:
        """log1p of ``measured_counts``: the scale of ``predictions``."""
        return None if self.measured_counts is None else np.log1p(self.measured_counts).astype(np.float32)

    @property
    def route(self) -> str:
        """Which inputs the model was given (``models.config.ROUTES``): ``image`` for an H&E alone
        (runs made before routes were recorded gave the model every input it reads)."""
        return self.metadata.get("route") or self.model_card.model.default_route

    @property
    def frame_pixel_size_um(self) -> float:
        """The size of one ``global`` px of the tile table: the Xenium pixel, or for an H&E alone
        (no Xenium frame: tiles lie in H&E um) 1 um."""
        sample = self.metadata.get("sample") or {}
        if sample.get("xenium_pixel_size_um"):
            return float(sample["xenium_pixel_size_um"])
        if sample.get("he_path") and not sample.get("xenium_dir"):
            from napari_morphomol.tiling.pipeline import HE_FRAME_PIXEL_SIZE_UM

            return HE_FRAME_PIXEL_SIZE_UM
        from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM

        return XENIUM_PIXEL_SIZE_UM

    @property
    def model_card(self):
        from napari_morphomol.models import ModelCard

        return ModelCard.from_json(json.dumps(self.metadata["model_card"]))


def results_from_group(path: Path, root: zarr.Group, attrs: dict) -> Results:
    """The arrays of a results store (finished or partial: unfinished rows are NaN) as :class:`Results`."""
    table = root["tiles"]
    tiles = pd.DataFrame({name: table[name][:] for name in attrs["tile_columns"]})
    from napari_morphomol.inference.token_maps import read_token_maps
    from napari_morphomol.inference.trust import read_trust

    outputs = {record["name"]: root[record["name"]] if record["level"] == "token" else root[record["name"]][:]
               for record in attrs["outputs"]}
    measured = root["measured_counts"][:] if "measured_counts" in root else None
    measured_tokens = root["measured_token_counts"] if "measured_token_counts" in root else None
    return Results(path, tiles, list(attrs["addon_genes"]), outputs, list(attrs["measured_genes"]), measured, attrs,
                   measured_tokens, read_token_maps(root), read_trust(root, attrs))


def open_results(path: str | Path) -> Results:
    """Read a finished store written by :func:`napari_morphomol.inference.predict`.

    Parameters
    ----------
    path
        The ``RESULTS.zarr`` of a predict run.

    Returns
    -------
    Results
        Its tile table and one array per output. InputError for an unfinished run, a folder that
        is not a results store, or a store of another format (run ``morphomol predict`` again).
    """
    path = Path(path)
    if not path.exists() and partial_path(path).exists():
        raise InputError(f"the run writing {path} did not finish ({partial_path(path)} holds its partial results); "
                         "run the same predict command again to resume it")
    root, attrs = open_versioned_group(path, ATTRS_KEY, FORMAT_VERSION, "results store written by `morphomol predict`",
                                       "give the RESULTS.zarr of a predict run, or run `morphomol predict` again")
    if attrs.get("status") != "complete":
        raise InputError(f"{path} is an unfinished run (status {attrs.get('status')!r}); run predict again to resume")
    return results_from_group(path, root, attrs)
