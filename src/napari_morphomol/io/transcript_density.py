"""Per-gene transcript density rasters built in one pass, and transcripts in a box.

Real runs hold 100 M+ transcripts; showing them as points is hopeless and a random subset lies.
One pass over the dask partitions bins every transcript (qv >= 20) into square bins of ``bin_um``
and keeps a sparse genes x bins count matrix, so any gene's (or the total's) density is one
sparse row away. Bins are half-open and start at 0 um: bin (i, j) holds x in [j b, (j+1) b) and y in [i b, (i+1) b).
Transcripts with a NaN or infinite x or y are counted apart (``n_non_finite``) and warned about.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import scipy.sparse as sp
from skimage.measure import block_reduce

from napari_morphomol.errors import InputError
from napari_morphomol.io.features import is_control_feature, warn_non_finite_xy

MIN_QV = 20.0


@dataclass(frozen=True)
class TranscriptDensity:
    """Counts per (feature, bin); features are the categories of ``feature_name``."""

    features: list[str]
    is_gene: np.ndarray
    bin_um: float
    shape_yx: tuple[int, int]
    counts: sp.csr_matrix
    n_outside: int
    n_low_qv: int
    n_non_finite: int

    def raster(self, features: list[str] | None = None) -> np.ndarray:
        """Counts per bin (y, x) summed over ``features`` (default: every gene, no controls)."""
        if features is None:
            rows = np.flatnonzero(self.is_gene)
        else:
            index = {name: i for i, name in enumerate(self.features)}
            unknown = [f for f in features if f not in index]
            if unknown:
                raise InputError(f"unknown genes {unknown}; the run has {len(self.features)} features.")
            rows = np.array([index[f] for f in features], dtype=np.int64)
        summed = np.asarray(self.counts[rows].sum(axis=0)).ravel()
        return summed.reshape(self.shape_yx).astype(np.float32)

    def pyramid(self, raster: np.ndarray, min_size_px: int = 1024) -> list[np.ndarray]:
        """Levels of summed 2 x 2 blocks until the level fits ``min_size_px``."""
        levels = [raster]
        while max(levels[-1].shape) > min_size_px:
            levels.append(block_reduce(levels[-1], (2, 2), np.sum))
        return levels

    def gene_totals(self) -> pd.Series:
        totals = np.asarray(self.counts.sum(axis=1)).ravel()
        return pd.Series(totals, index=self.features).loc[np.asarray(self.features)[self.is_gene]]


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
) -> TranscriptDensity:
    """Bin transcripts (columns ``x``, ``y`` in um, ``feature_name``, ``qv``) over [0, W) x [0, H) um.

    Every transcript is counted once: in a bin, or as non-finite x/y (first), low qv, or outside."""
    if bin_um <= 0:
        raise InputError(f"bin size must be positive, got {bin_um} um")
    width_um, height_um = extent_um
    nx, ny = int(np.ceil(width_um / bin_um)), int(np.ceil(height_um / bin_um))
    features = _feature_categories(points)
    code_of = pd.CategoricalDtype(categories=features)
    n_bins = nx * ny
    has_qv = "qv" in points.columns

    def count_partition(df: pd.DataFrame) -> pd.DataFrame:
        x = df["x"].to_numpy(np.float64)
        y = df["y"].to_numpy(np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        non_finite = int((~keep).sum())
        low_qv = 0
        if has_qv:
            good = df["qv"].to_numpy() >= min_qv
            low_qv = int((keep & ~good).sum())
            keep &= good
        ix = np.floor(x / bin_um)
        iy = np.floor(y / bin_um)
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        outside = int((keep & ~inside).sum())
        keep &= inside
        codes = df["feature_name"].astype(code_of).cat.codes.to_numpy()[keep].astype(np.int64)
        key = codes * n_bins + (iy[keep].astype(np.int64) * nx + ix[keep].astype(np.int64))
        uniq, counts = np.unique(key, return_counts=True)
        return pd.DataFrame({"key": np.concatenate([uniq, [-1, -2, -3]]),
                             "count": np.concatenate([counts, [outside, low_qv, non_finite]])})

    columns = ["x", "y", "feature_name"] + (["qv"] if has_qv else [])  # read nothing else from disk
    parts = points[columns].map_partitions(count_partition, meta=pd.DataFrame({"key": [0], "count": [0]}).iloc[:0])
    keys, values = [], []
    delayed_parts = parts.to_delayed()
    batch = 2 * (os.cpu_count() or 1)  # parallel, yet only a few partitions' results in memory
    for start in range(0, len(delayed_parts), batch):
        for df in dask.compute(*delayed_parts[start : start + batch]):
            keys.append(df["key"].to_numpy())
            values.append(df["count"].to_numpy())
    key, value = np.concatenate(keys), np.concatenate(values)
    good = key >= 0
    rows, cols = np.divmod(key[good], n_bins)
    counts = sp.csr_matrix((value[good], (rows, cols)), shape=(len(features), n_bins), dtype=np.int64)
    n_non_finite = int(value[key == -3].sum())
    warn_non_finite_xy(n_non_finite)
    return TranscriptDensity(
        features=[str(f) for f in features],
        is_gene=np.array([not is_control_feature(f) for f in features], dtype=bool),
        bin_um=float(bin_um),
        shape_yx=(ny, nx),
        counts=counts.astype(np.int32),
        n_outside=int(value[key == -1].sum()),
        n_low_qv=int(value[key == -2].sum()),
        n_non_finite=n_non_finite,
    )


def transcripts_in_box_um(
    points: dd.DataFrame,
    features: list[str],
    *,
    x_range_um: tuple[float, float],
    y_range_um: tuple[float, float],
    min_qv: float = MIN_QV,
    max_points: int = 200_000,
) -> pd.DataFrame:
    """Transcripts of ``features`` inside a box (half-open), at most ``max_points`` of them."""
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
