"""Per-gene transcript density and the transcripts in view, indexed in one bounded-memory pass.

Real runs hold 100-300 M transcripts: neither points nor an in-memory index of them fits a
laptop. One pass over the partitions (a few at a time; those of a transcripts element
:func:`~napari_morphomol.io.load_sample` made are read straight from its parquet file, without
dask's frames, see ``io.sample.TranscriptsFile``) bins every transcript (qv >= 20)
into square bins of ``bin_um`` and writes two orderings of the kept ones to a scratch folder:

- **by feature**: each transcript's bin (int32), grouped per partition by feature, so a gene's
  density is the bin count of its slices;
- **by block**: each transcript's x, y (float32 um) and feature code, grouped per partition by
  square blocks of :data:`BLOCK_UM`, so the transcripts in a view are read from the blocks it
  touches, at any transcript count.

Memory holds the dense raster of all genes (int32 per bin), per-feature totals and the slice
offsets (per partition, features + 1 and blocks + 1 integers): bounded by the section's area and
a few partitions, not by the transcript count. Disk holds 14 bytes per kept transcript (16 for
panels of more than 65,535 features) until the index is closed or garbage collected.

Bins are half-open and start at 0 um: bin (i, j) holds x in [j b, (j+1) b) and y in [i b, (i+1) b);
block (I, J) holds bins whose row is in [I k, (I+1) k) and column in [J k, (J+1) k), k bins a side.
Every transcript is counted once: as NaN or infinite x or y (``n_non_finite``, warned about), as
having no feature name (``n_unnamed``), as below ``min_qv`` (``n_low_qv``), outside the extent
(``n_outside``), or in a bin.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import dask
import dask.dataframe as dd
import numba
import numpy as np
import pandas as pd
from skimage.measure import block_reduce

from napari_morphomol._atomic import cache_dir
from napari_morphomol.errors import InputError
from napari_morphomol.io.features import is_control_feature, warn_non_finite_xy

MIN_QV = 20.0
BLOCK_UM = 200.0
"""The side of the blocks of the in-view ordering (an 800 um view reads about 25 blocks); rounded to
whole bins."""
_COLUMNS = ("bins", "x", "y", "feature")
"""The scratch files: the by-feature ordering's bins, and the by-block ordering's x, y and feature codes."""
_COUNT_CHUNK = 1 << 24
"""Transcripts whose bins are counted at once when a gene's density is asked for (64 MB)."""
_STATUS_NON_FINITE, _STATUS_UNNAMED, _STATUS_LOW_QV, _STATUS_OUTSIDE = -1, -2, -3, -4


@numba.njit(cache=True, nogil=True)
def _classify(x, y, qv, codes, bin_um, nx, ny, block_bins, nbx, n_features, n_blocks, min_qv):
    """Each row's bin (or a negative status) and block; counts per feature and per block (shifted
    by one, ready for a cumulative sum) and per status."""
    n = x.shape[0]
    bin_of = np.empty(n, np.int64)
    block_of = np.empty(n, np.int32)
    feature_counts = np.zeros(n_features + 1, np.int64)
    block_counts = np.zeros(n_blocks + 1, np.int64)
    status_counts = np.zeros(4, np.int64)
    for i in range(n):
        xi, yi = np.float64(x[i]), np.float64(y[i])
        if not (np.isfinite(xi) and np.isfinite(yi)):
            bin_of[i] = _STATUS_NON_FINITE
        elif codes[i] < 0:
            bin_of[i] = _STATUS_UNNAMED
        elif not qv[i] >= min_qv:  # a NaN quality is low too
            bin_of[i] = _STATUS_LOW_QV
        else:
            fx, fy = np.floor(xi / bin_um), np.floor(yi / bin_um)
            if fx < 0 or fx >= nx or fy < 0 or fy >= ny:
                bin_of[i] = _STATUS_OUTSIDE
            else:
                ix, iy = np.int64(fx), np.int64(fy)
                bin_of[i] = iy * nx + ix
                block = (iy // block_bins) * nbx + ix // block_bins
                block_of[i] = block
                feature_counts[codes[i] + 1] += 1
                block_counts[block + 1] += 1
                continue
        status_counts[-1 - bin_of[i]] += 1
    return bin_of, block_of, feature_counts, block_counts, status_counts


@numba.njit(cache=True, nogil=True)
def _scatter(x, y, codes, bin_of, block_of, feature_offsets, block_offsets, bins_out, x_out, y_out, feature_out):
    """The kept rows in the two orderings (stable: file order within a feature or a block)."""
    feature_next = feature_offsets[:-1].copy()
    block_next = block_offsets[:-1].copy()
    for i in range(x.shape[0]):
        if bin_of[i] < 0:
            continue
        c = codes[i]
        bins_out[feature_next[c]] = bin_of[i]
        feature_next[c] += 1
        p = block_next[block_of[i]]
        x_out[p], y_out[p], feature_out[p] = x[i], y[i], c
        block_next[block_of[i]] += 1


@numba.njit(cache=True, nogil=True)
def _add_gene_counts(raster, bins, feature_offsets, is_gene):
    for f in range(is_gene.shape[0]):
        if is_gene[f]:
            for k in range(feature_offsets[f], feature_offsets[f + 1]):
                raster[bins[k]] += 1


class TranscriptDensity:
    """Counts per (feature, bin) of a sample's transcripts, and its transcripts by block, on disk.

    Attributes
    ----------
    features
        The feature names (the categories of ``feature_name``); ``is_gene`` is False for controls.
    bin_um, shape_yx
        The bin side and the (rows, columns) of the bin grid from (0, 0) um.
    feature_totals
        Transcripts in a bin, per feature.
    n_outside, n_low_qv, n_non_finite, n_unnamed
        The transcripts in no bin, by reason (see the module docstring).
    """

    def __init__(self, features: list[str], *, bin_um: float, shape_yx: tuple[int, int], block_bins: int,
                 scratch: Path, feature_offsets: np.ndarray, block_offsets: np.ndarray, gene_raster: np.ndarray,
                 status_counts: np.ndarray):
        self.features = features
        self.is_gene = np.array([not is_control_feature(f) for f in features], dtype=bool)
        self.bin_um = float(bin_um)
        self.shape_yx = shape_yx
        self.block_bins = block_bins
        self.scratch = scratch
        self._feature_offsets, self._block_offsets = feature_offsets, block_offsets
        self._gene_raster = gene_raster
        self.feature_totals = np.diff(feature_offsets, axis=1).sum(axis=0) if len(feature_offsets) else \
            np.zeros(len(features), np.int64)
        self.n_non_finite, self.n_unnamed, self.n_low_qv, self.n_outside = (int(n) for n in status_counts)
        self._feature_dtype = np.uint16 if len(features) <= np.iinfo(np.uint16).max else np.uint32
        self._files = {name: os.open(scratch / name, os.O_RDONLY) for name in _COLUMNS}
        self._finalizer = weakref.finalize(self, _remove_scratch, scratch, list(self._files.values()))

    @property
    def n_binned(self) -> int:
        """Transcripts in a bin (every feature, controls too)."""
        return int(self.feature_totals.sum())

    @property
    def block_um(self) -> float:
        """Side of one block of the index (``block_bins`` bins), in um."""
        return self.block_bins * self.bin_um

    def close(self) -> None:
        """Delete the scratch files now (else when the index is garbage collected)."""
        self._finalizer()

    def _read(self, name: str, dtype, start: int, stop: int) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        data = os.pread(self._files[name], (stop - start) * itemsize, start * itemsize)
        return np.frombuffer(data, dtype=dtype)

    def _rows(self, features: list[str]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.features)}
        unknown = [f for f in features if f not in index]
        if unknown:
            raise InputError(f"unknown genes {unknown}; the run has {len(self.features)} features.")
        return np.array([index[f] for f in features], dtype=np.int64)

    def raster(self, features: list[str] | None = None) -> np.ndarray:
        """Counts per bin (y, x) summed over ``features`` (default: every gene, no controls)."""
        if features is None:
            return self._gene_raster.reshape(self.shape_yx).astype(np.float32)
        n_bins = self.shape_yx[0] * self.shape_yx[1]
        summed = np.zeros(n_bins, np.int64)
        slices, pending = [], 0
        spans = [(start, stop) for row in self._rows(features)
                 for start, stop in self._feature_offsets[:, row : row + 2] if stop > start]
        for k, (start, stop) in enumerate(spans):  # one bin count per 16 M transcripts, not one per partition
            slices.append(self._read("bins", np.int32, start, stop))
            pending += stop - start
            if pending >= _COUNT_CHUNK or k == len(spans) - 1:
                summed += np.bincount(np.concatenate(slices), minlength=n_bins)
                slices, pending = [], 0
        return summed.reshape(self.shape_yx).astype(np.float32)

    def pyramid(self, raster: np.ndarray, min_size_px: int = 1024) -> list[np.ndarray]:
        """Levels of summed 2 x 2 blocks until the level fits ``min_size_px``."""
        levels = [raster]
        while max(levels[-1].shape) > min_size_px:
            levels.append(block_reduce(levels[-1], (2, 2), np.sum))
        return levels

    def gene_totals(self) -> pd.Series:
        """Binned transcripts per gene (controls left out)."""
        return pd.Series(self.feature_totals[self.is_gene], index=np.asarray(self.features)[self.is_gene])

    def transcripts_in_box(
        self, features: list[str], *, x_range_um: tuple[float, float], y_range_um: tuple[float, float],
        max_points: int = 200_000,
    ) -> pd.DataFrame:
        """Transcripts of ``features`` inside a box (half-open, um), read from the blocks it touches.

        Parameters
        ----------
        features
            Gene names of the index (an unknown name is an InputError).
        x_range_um, y_range_um
            The box's (low, high) sides in um, half-open.
        max_points
            At most this many transcripts come back.

        Returns
        -------
        pandas.DataFrame
            Columns ``x``, ``y`` (float32 um) and ``feature_name``; when more than ``max_points``
            are inside, an even random subset of them (the same for the same box), and
            ``attrs['n_in_box']`` says how many were inside.
        """
        (x0, x1), (y0, y1) = x_range_um, y_range_um
        rows = self._rows(features)
        ny, nx = self.shape_yx
        nby, nbx = -(-ny // self.block_bins), -(-nx // self.block_bins)
        block_um = self.block_um
        bx0, bx1 = max(int(np.floor(x0 / block_um)) - 1, 0), min(int(np.floor(x1 / block_um)) + 1, nbx - 1)
        by0, by1 = max(int(np.floor(y0 / block_um)) - 1, 0), min(int(np.floor(y1 / block_um)) + 1, nby - 1)
        xs, ys, codes = [], [], []
        if bx0 <= bx1 and by0 <= by1 and x1 > x0 and y1 > y0:
            for offsets in self._block_offsets:
                for by in range(by0, by1 + 1):
                    start, stop = offsets[by * nbx + bx0], offsets[by * nbx + bx1 + 1]
                    if stop <= start:
                        continue
                    x = self._read("x", np.float32, start, stop)
                    y = self._read("y", np.float32, start, stop)
                    code = self._read("feature", self._feature_dtype, start, stop)
                    keep = (x >= x0) & (x < x1) & (y >= y0) & (y < y1) & np.isin(code, rows)
                    xs.append(x[keep])
                    ys.append(y[keep])
                    codes.append(code[keep])
        x, y, code = (np.concatenate(a) if a else np.zeros(0, d) for a, d in
                      ((xs, np.float32), (ys, np.float32), (codes, self._feature_dtype)))
        n_in_box = len(x)
        if n_in_box > max_points:
            chosen = np.sort(np.random.default_rng(0).choice(n_in_box, max_points, replace=False))
            x, y, code = x[chosen], y[chosen], code[chosen]
        names = np.asarray(self.features, dtype=object)[code.astype(np.int64)]
        found = pd.DataFrame({"x": x, "y": y, "feature_name": pd.Series(names, dtype=object)})
        found.attrs["n_in_box"] = n_in_box
        return found


def _remove_scratch(scratch: Path, descriptors: list[int]) -> None:
    for fd in descriptors:
        os.close(fd)
    shutil.rmtree(scratch, ignore_errors=True)


def _feature_categories(points: dd.DataFrame) -> pd.Index:
    dtype = points["feature_name"].dtype
    if isinstance(dtype, pd.CategoricalDtype) and dtype.categories is not None:
        return pd.Index(dtype.categories)
    return pd.Index(points["feature_name"].drop_duplicates().compute().astype(str).sort_values())


def build_transcript_density(
    points: dd.DataFrame,
    *,
    extent_um: tuple[float, float],
    bin_um: float = 4.0,
    min_qv: float = MIN_QV,
    scratch_dir: str | os.PathLike | None = None,
) -> TranscriptDensity:
    """Index transcripts (columns ``x``, ``y`` in um, ``feature_name``, ``qv``) over [0, W) x [0, H) um.

    Parameters
    ----------
    points
        Dask points of a sample (``sdata.points[TRANSCRIPTS]``); only x, y, feature_name and qv are read.
    extent_um
        (width, height) of the section in um: bins cover it from (0, 0).
    bin_um
        The bin side in um.
    min_qv
        Transcripts below this quality are counted (``n_low_qv``), not binned.
    scratch_dir
        Where the scratch folder goes (default: ``scratch`` in the project's cache folder,
        ``MORPHOMOL_CACHE`` or ~/.cache/napari-morphomol, on disk); it needs about 14 bytes per
        transcript.

    Returns
    -------
    TranscriptDensity
        The index; its scratch files go when it is closed or garbage collected.

    Raises
    ------
    InputError
        A bin size that is not positive, or a scratch folder without room or not writable.
    """
    if bin_um <= 0:
        raise InputError(f"bin size must be positive, got {bin_um} um")
    width_um, height_um = extent_um
    nx, ny = max(int(np.ceil(width_um / bin_um)), 1), max(int(np.ceil(height_um / bin_um)), 1)
    block_bins = max(int(round(BLOCK_UM / bin_um)), 1)
    nbx, nby = -(-nx // block_bins), -(-ny // block_bins)
    features = _feature_categories(points)
    code_of = pd.CategoricalDtype(categories=features)
    n_features, n_blocks = len(features), nbx * nby
    feature_dtype = np.uint16 if n_features <= np.iinfo(np.uint16).max else np.uint32
    has_qv = "qv" in points.columns

    def order_frame(df: pd.DataFrame) -> tuple:
        names = df["feature_name"]
        if not (isinstance(names.dtype, pd.CategoricalDtype) and names.dtype == code_of):
            names = names.astype(code_of)
        return order_columns(df["x"].to_numpy(), df["y"].to_numpy(), df["qv"].to_numpy() if has_qv else None,
                             names.cat.codes.to_numpy())

    def order_file_partition(source, partition: int) -> tuple:
        arrays = source.read_columns(partition)
        return order_columns(arrays["x"], arrays["y"], arrays.get("qv"), arrays["codes"])

    def order_columns(x, y, qv, codes) -> tuple:
        codes = codes.astype(np.int32)
        qv = np.full(len(x), np.inf, np.float32) if qv is None else qv
        bin_of, block_of, feature_counts, block_counts, status_counts = _classify(
            x, y, qv, codes, float(bin_um), nx, ny, block_bins, nbx, n_features, n_blocks, float(min_qv))
        feature_offsets, block_offsets = np.cumsum(feature_counts), np.cumsum(block_counts)
        kept = int(feature_offsets[-1])
        ordered = (np.empty(kept, np.int32), np.empty(kept, np.float32), np.empty(kept, np.float32),
                   np.empty(kept, feature_dtype))
        _scatter(x, y, codes, bin_of, block_of, feature_offsets, block_offsets, *ordered)
        return ordered, feature_offsets, block_offsets, status_counts

    scratch = _make_scratch(scratch_dir)
    from napari_morphomol.io.sample import transcripts_file  # spatialdata's import, only when indexing

    source = transcripts_file(points)
    if source is not None and list(source.categories) == list(features):  # straight from the parquet file
        delayed_parts = [dask.delayed(order_file_partition)(source, i) for i in range(len(source.partitions))]
    else:
        columns = ["x", "y", "feature_name"] + (["qv"] if has_qv else [])  # read nothing else from disk
        delayed_parts = [dask.delayed(order_frame)(part) for part in points[columns].to_delayed()]
    is_gene = np.array([not is_control_feature(f) for f in features], dtype=bool)
    gene_raster = np.zeros(nx * ny, np.int32)
    feature_offsets, block_offsets, status_counts, written = [], [], np.zeros(4, np.int64), 0
    batch = os.cpu_count() or 1  # parallel, yet one partition's results per core in memory
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(scratch / name, "wb")) for name in _COLUMNS}
            for start in range(0, len(delayed_parts), batch):
                for ordered, f_offsets, b_offsets, counts in dask.compute(*delayed_parts[start : start + batch]):
                    for name, array in zip(_COLUMNS, ordered, strict=True):
                        files[name].write(array.tobytes())
                    _add_gene_counts(gene_raster, ordered[0], f_offsets, is_gene)
                    feature_offsets.append(written + f_offsets)
                    block_offsets.append(written + b_offsets)
                    status_counts += counts
                    written += len(ordered[0])
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(f"no room left in {scratch.parent} for the transcript index (about 14 bytes per "
                             "transcript); free space there, or set MORPHOMOL_CACHE to a folder with more "
                             "room.") from exc
        raise
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    warn_non_finite_xy(int(status_counts[0]))
    empty = np.zeros((0, 1), np.int64)
    return TranscriptDensity(
        [str(f) for f in features], bin_um=bin_um, shape_yx=(ny, nx), block_bins=block_bins, scratch=scratch,
        feature_offsets=np.stack(feature_offsets) if feature_offsets else empty.repeat(n_features + 1, 1),
        block_offsets=np.stack(block_offsets) if block_offsets else empty.repeat(n_blocks + 1, 1),
        gene_raster=gene_raster, status_counts=status_counts,
    )


def _make_scratch(scratch_dir) -> Path:
    where = Path(scratch_dir) if scratch_dir is not None else cache_dir() / "scratch"
    try:
        if scratch_dir is None:
            where.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="transcript-index-", dir=where))
    except OSError as exc:
        raise InputError(f"cannot make the transcript index's scratch folder in {where} ({exc}); set "
                         "MORPHOMOL_CACHE to a writable folder with room (about 14 bytes per transcript).") from exc


def transcripts_in_box_um(
    points: dd.DataFrame,
    features: list[str],
    *,
    x_range_um: tuple[float, float],
    y_range_um: tuple[float, float],
    min_qv: float = MIN_QV,
    max_points: int = 200_000,
) -> pd.DataFrame:
    """Transcripts of ``features`` inside a box (half-open), at most ``max_points`` of them, by a
    pass over every partition (what the view can show before :class:`TranscriptDensity` is built)."""
    (x0, x1), (y0, y1) = x_range_um, y_range_um
    wanted = set(features)

    def select(df: pd.DataFrame) -> pd.DataFrame:
        mask = (df["x"] >= x0) & (df["x"] < x1) & (df["y"] >= y0) & (df["y"] < y1)
        mask &= df["feature_name"].isin(wanted)
        if "qv" in df.columns:
            mask &= df["qv"] >= min_qv
        return df.loc[mask, ["x", "y", "feature_name"]].astype({"feature_name": str})

    meta = pd.DataFrame({"x": pd.Series(dtype="float32"), "y": pd.Series(dtype="float32"),
                         "feature_name": pd.Series(dtype=str)})
    columns = ["x", "y", "feature_name"] + (["qv"] if "qv" in points.columns else [])
    found = points[columns].map_partitions(select, meta=meta).compute()
    return found.iloc[:max_points].reset_index(drop=True)
