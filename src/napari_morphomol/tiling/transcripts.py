"""Transcripts -> token rasters of core-gene and add-on counts, and a stride raster of add-on counts.

Each transcript is filtered (finite x/y, qv, controls, panel), mapped from um through ``global``
px and the registration into H&E px, then into token coordinates (see :mod:`.geometry`), and
counted once.
Work goes partition by partition of a (dask) dataframe; the only memory that grows with the slide
is the output. The panel raster (core and add-on genes of every token) is dense ``(rows, cols,
genes)`` uint16 while it fits in ``max_dense_bytes``, otherwise a CSR matrix (tokens x genes) built
from per-partition sorted keys; it is split into the core and add-on :class:`TokenRaster`.
Invariant: an add-on transcript is counted in its token exactly when it is counted in its stride
square, so a tile's per-token add-on counts sum to its tile target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_morphomol.errors import InputError
from napari_morphomol.io.features import warn_non_finite_xy
from napari_morphomol.registration.transforms import AffineXY, HeGlobalTransform, as_he_global_transform
from napari_morphomol.tiling.geometry import TileGeometry
from napari_morphomol.tiling.panel import GenePanel, is_control_feature

_SLOT_OTHER = -1  # a gene outside the panel
_SLOT_CONTROL = -2  # a control probe / codeword


@dataclass(frozen=True)
class TokenMapping:
    """um -> token coordinates. Affine registrations fuse into one 2 x 3 matrix used by the kernel."""

    geometry: TileGeometry
    transform: HeGlobalTransform
    xenium_pixel_size_um: float

    @property
    def um_to_tokens_matrix(self) -> np.ndarray | None:
        if not isinstance(self.transform, AffineXY):
            return None
        to_global = np.diag([1 / self.xenium_pixel_size_um, 1 / self.xenium_pixel_size_um, 1.0])
        to_cells = np.diag([self.geometry.tokens_per_he_px, self.geometry.tokens_per_he_px, 1.0])
        return (to_cells @ np.linalg.inv(self.transform.matrix) @ to_global)[:2]

    def um_to_tokens_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token coordinates of points, with exactly the float operations of the binning kernel.

        A non-affine registration's inverse is its bulk one where it has it (an inverse grid, within
        ``registration.transforms.INVERSE_GRID_TOLERANCE_PX`` of the exact inverse; one affine's cost at slide
        scale). Points with a NaN or infinite coordinate map to NaN (a non-affine inverse is never
        asked about them: its Newton steps would not converge)."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        a = self.um_to_tokens_matrix
        if a is None:
            finite = np.isfinite(x) & np.isfinite(y)
            global_x, global_y = x[finite] / self.xenium_pixel_size_um, y[finite] / self.xenium_pixel_size_um
            bulk = getattr(self.transform, "bulk_inverse_columns", None)
            he = (np.column_stack(bulk(global_x, global_y)) if bulk is not None
                  else self.transform.inverse_apply_xy(np.stack([global_x, global_y], axis=1)))
            q = np.full((len(x), 2), np.nan)
            q[finite] = self.geometry.he_px_to_tokens(he)
            return np.ascontiguousarray(q[:, 0]), np.ascontiguousarray(q[:, 1])
        return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]


@dataclass
class TranscriptCounts:
    """What happened to every transcript (the input total is the sum of the other fields)."""

    low_qv: int = 0
    control: int = 0
    not_in_panel: int = 0
    outside_image: int = 0
    core_binned: int = 0
    addon_binned: int = 0
    addon_outside_grid: int = 0
    non_finite_xy: int = 0
    """NaN or infinite x or y (damaged tables); counted before every other filter."""

    @property
    def total(self) -> int:
        return (self.low_qv + self.control + self.not_in_panel + self.outside_image + self.core_binned
                + self.addon_binned + self.addon_outside_grid + self.non_finite_xy)

    def add(self, counters: np.ndarray) -> None:
        self.low_qv += int(counters[0])
        self.control += int(counters[1])
        self.not_in_panel += int(counters[2])
        self.outside_image += int(counters[3])
        self.core_binned += int(counters[4])
        self.addon_binned += int(counters[5])
        self.addon_outside_grid += int(counters[6])
        self.non_finite_xy += int(counters[7])

    def to_dict(self) -> dict:
        return {**{k: int(v) for k, v in self.__dict__.items()}, "total": self.total}


@numba.njit(cache=True, nogil=True)
def _bin_kernel(x, y, qv, min_qv, codes, slot_of_code, n_core, n_panel, a, extent_x, extent_y, stride_tokens,
                panel_dense, dense_max, panel_keys, core_totals, addon, counters):
    """One pass over a partition. Dense mode increments ``panel_dense`` (rows, cols, core + add-on
    genes) up to ``dense_max`` (a count that would pass it is counted in ``counters[8]``); sparse
    mode (``panel_dense`` of size 0) writes linear keys (token * n_panel + slot) into ``panel_keys``
    and returns their count."""
    n_rows, n_cols = core_totals.shape
    n_srows, n_scols = addon.shape[0], addon.shape[1]
    dense = panel_dense.size > 0
    use_qv = qv.size > 0
    n_keys = 0
    low_qv = control = other = outside = core_n = addon_n = addon_out = non_finite = 0
    for k in range(x.shape[0]):
        xk = np.float64(x[k])
        yk = np.float64(y[k])
        if not (np.isfinite(xk) and np.isfinite(yk)):
            non_finite += 1
            continue
        if use_qv and not qv[k] >= min_qv:
            low_qv += 1
            continue
        code = codes[k]
        slot = slot_of_code[code] if code >= 0 else _SLOT_OTHER
        if slot == _SLOT_CONTROL:
            control += 1
            continue
        if slot == _SLOT_OTHER:
            other += 1
            continue
        qx = a[0, 0] * xk + a[0, 1] * yk + a[0, 2]
        qy = a[1, 0] * xk + a[1, 1] * yk + a[1, 2]
        if not (qx >= 0.0 and qx < extent_x and qy >= 0.0 and qy < extent_y):
            outside += 1
            continue
        cx = min(int(qx), n_cols - 1)
        cy = min(int(qy), n_rows - 1)
        if slot < n_core:
            core_totals[cy, cx] += 1
            core_n += 1
        else:
            sx = cx // stride_tokens
            sy = cy // stride_tokens
            if sx < n_scols and sy < n_srows:
                addon[sy, sx, slot - n_core] += 1
                addon_n += 1
            else:
                addon_out += 1
                continue
        if dense:
            if panel_dense[cy, cx, slot] < dense_max:
                panel_dense[cy, cx, slot] += 1
            else:
                counters[8] += 1
        else:
            panel_keys[n_keys] = (np.int64(cy) * n_cols + cx) * n_panel + slot
            n_keys += 1
    counters[0] += low_qv
    counters[1] += control
    counters[2] += other
    counters[3] += outside
    counters[4] += core_n
    counters[5] += addon_n
    counters[6] += addon_out
    counters[7] += non_finite
    return n_keys


class TokenRaster:
    """Counts per token of some genes (the core or the add-on panel), ``(rows, cols, genes)``,
    dense or CSR (tokens x genes)."""

    def __init__(self, shape: tuple[int, int, int], dense: np.ndarray | None = None,
                 csr: sp.csr_array | None = None) -> None:
        if (dense is None) == (csr is None):
            raise ValueError("a TokenRaster is either dense or sparse")
        self.shape = shape
        self.dense = dense
        self.csr = csr

    @property
    def is_sparse(self) -> bool:
        return self.csr is not None

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return self.dense.nbytes
        return self.csr.data.nbytes + self.csr.indices.nbytes + self.csr.indptr.nbytes

    def window(self, row0: int, col0: int, n_rows: int, n_cols: int) -> np.ndarray:
        """Dense counts of tokens [row0, row0 + n_rows) x [col0, col0 + n_cols) (clipped to the raster)."""
        rows, cols, genes = self.shape
        r1, c1 = min(row0 + n_rows, rows), min(col0 + n_cols, cols)
        if self.dense is not None:
            return self.dense[row0:r1, col0:c1].astype(np.uint32)
        tokens = (np.arange(row0, r1)[:, None] * cols + np.arange(col0, c1)[None, :]).ravel()
        return self.csr[tokens].toarray().astype(np.uint32).reshape(r1 - row0, c1 - col0, genes)

    def tile_tokens(self, geometry: TileGeometry, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``(B, t, t, genes)`` token counts of tiles (row, col): ``raster[s*i:s*i+t, s*j:s*j+t]``."""
        s, t = geometry.stride_tokens, geometry.tokens_per_side
        rows = np.atleast_1d(rows)
        cols = np.atleast_1d(cols)
        out = np.empty((len(rows), t, t, self.shape[2]), dtype=np.uint32)
        for k, (i, j) in enumerate(zip(rows, cols, strict=True)):
            out[k] = self.window(int(i) * s, int(j) * s, t, t)
        return out


@dataclass
class TranscriptBins:
    """Everything tiling needs from the transcripts, counted once."""

    geometry: TileGeometry
    panel: GenePanel
    tokens: TokenRaster
    """Core-gene counts per token (the model's transcript input)."""
    addon_tokens: TokenRaster
    """Add-on counts per token (per-token targets)."""
    core_totals: np.ndarray
    """(rows, cols) core transcripts per token."""
    addon_stride: np.ndarray
    """(stride rows, stride cols, add-on genes) add-on counts per stride square."""
    counts: TranscriptCounts = field(default_factory=TranscriptCounts)

    def tile_core_totals(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Core transcripts per tile, from a summed-area table of ``core_totals``."""
        s, t = self.geometry.stride_tokens, self.geometry.tokens_per_side
        sat = np.zeros((self.core_totals.shape[0] + 1, self.core_totals.shape[1] + 1), dtype=np.int64)
        sat[1:, 1:] = self.core_totals.astype(np.int64).cumsum(0).cumsum(1)
        r0, c0 = np.asarray(rows) * s, np.asarray(cols) * s
        r1, c1 = r0 + t, c0 + t
        return sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]

    def tile_addon_counts(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(B, add-on genes) summed over the tile's stride squares."""
        span = self.geometry.tokens_per_side // self.geometry.stride_tokens
        rows, cols = np.asarray(rows), np.asarray(cols)
        out = np.zeros((len(rows), self.addon_stride.shape[2]), dtype=np.int64)
        for di in range(span):
            for dj in range(span):
                out += self.addon_stride[rows + di, cols + dj]
        return out


def _partitions(transcripts) -> Iterator[pd.DataFrame]:
    if isinstance(transcripts, pd.DataFrame):
        yield transcripts
        return
    for part in transcripts.to_delayed():
        yield part.compute(scheduler="threads")


def feature_names(transcripts, feature_col: str = "feature_name") -> list[str]:
    """The features of a transcript table (known categories are read without a pass over the data);
    an InputError when it has none (an empty table)."""
    if feature_col not in transcripts.columns:
        raise InputError(f"the transcripts have no {feature_col!r} column (columns: {list(transcripts.columns)})")
    column = transcripts[feature_col]
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype) and getattr(column.cat, "known", True):
        names = [str(c) for c in dtype.categories]
    else:
        unique = column.dropna().unique()
        if hasattr(unique, "compute"):
            unique = unique.compute()
        names = sorted(str(c) for c in unique)
    if not names:
        raise InputError(
            "the transcripts table holds no transcripts (no gene names at all); tiles and predictions "
            "need a Xenium run's transcripts: check that transcripts.parquet is the instrument's, "
            "not an empty export, and re-export it from the instrument or Xenium Ranger"
        )
    return names


def _codes_and_slots(column: pd.Series, slot_of_gene: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    cat = column.array if isinstance(column.dtype, pd.CategoricalDtype) else pd.Categorical(column)
    categories = [c.decode() if isinstance(c, bytes) else str(c) for c in cat.categories]
    slots = np.array(
        [_SLOT_CONTROL if is_control_feature(c) else slot_of_gene.get(c, _SLOT_OTHER) for c in categories]
        or [_SLOT_OTHER],
        dtype=np.int32,
    )
    return np.ascontiguousarray(cat.codes, dtype=np.int32), slots


def _merge_keys(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([k for k, _ in parts])
    weights = np.concatenate([c for _, c in parts])
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=weights, minlength=len(unique)).astype(np.int64)


def bin_transcripts(
    transcripts,
    geometry: TileGeometry,
    panel: GenePanel,
    he_to_global: np.ndarray | HeGlobalTransform,
    *,
    xenium_pixel_size_um: float,
    min_qv: float = 20.0,
    x_col: str = "x_location",
    y_col: str = "y_location",
    feature_col: str = "feature_name",
    qv_col: str | None = "qv",
    max_dense_bytes: int = 2 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
    dense_dtype: type = np.uint16,
) -> TranscriptBins:
    """Count transcripts (um columns) into the token and stride rasters of ``geometry``.

    Kept: finite x and y, ``qv >= min_qv`` (no ``qv`` column: all kept), panel genes, inside the
    H&E image (token coordinates in ``[0, extent)``). Everything else is counted in
    ``TranscriptBins.counts``; non-finite positions are also warned about (XeniumDataWarning).
    The dense raster holds uint16 counts (half the memory; a token holds a few hundred
    transcripts); a token with more than 65,535 of one gene makes the pass run again in uint32.
    """
    for col in (x_col, y_col, feature_col) + ((qv_col,) if qv_col else ()):
        if col not in transcripts.columns:
            raise InputError(
                f"the transcripts have no {col!r} column (columns: {list(transcripts.columns)}); "
                "expected Xenium's feature_name, x_location, y_location (um) and qv"
            )
    if not 0.01 < xenium_pixel_size_um < 10:
        raise InputError(f"Xenium pixel size {xenium_pixel_size_um} is not a size in um/px (usually 0.2125)")
    mapping = TokenMapping(geometry, as_he_global_transform(he_to_global), xenium_pixel_size_um)
    fused = mapping.um_to_tokens_matrix
    rows, cols = geometry.raster_shape
    n_core, n_addon = len(panel.core), len(panel.addon)
    slot_of_gene = {g: i for i, g in enumerate(panel.core + panel.addon)}
    n_panel = n_core + n_addon
    dense_bytes = rows * cols * n_panel * np.dtype(dense_dtype).itemsize
    sparse = dense_bytes > max_dense_bytes
    panel_dense = np.zeros((0, 0, 0) if sparse else (rows, cols, n_panel), dtype=dense_dtype)
    core_totals = np.zeros((rows, cols), dtype=np.uint32)
    addon = np.zeros((*geometry.stride_raster_shape, n_addon), dtype=np.uint32)
    counts = TranscriptCounts()
    counters = np.zeros(9, dtype=np.int64)
    key_parts: list[tuple[np.ndarray, np.ndarray]] = []
    pending = 0
    extent_x, extent_y = geometry.extent_tokens_xy
    n_parts = getattr(transcripts, "npartitions", 1)
    for index, part in enumerate(_partitions(transcripts)):
        codes, slots = _codes_and_slots(part[feature_col], slot_of_gene)
        qv = part[qv_col].to_numpy(dtype=np.float32) if qv_col else np.zeros(0, np.float32)
        if fused is not None:
            x = part[x_col].to_numpy()
            y = part[y_col].to_numpy()
            a = fused
        else:
            x, y = mapping.um_to_tokens_xy(part[x_col].to_numpy(), part[y_col].to_numpy())
            a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        keys = np.empty(len(part) if sparse else 0, dtype=np.int64)
        n_keys = _bin_kernel(np.ascontiguousarray(x), np.ascontiguousarray(y), qv, float(min_qv), codes, slots,
                             n_core, n_panel, a, extent_x, extent_y, geometry.stride_tokens,
                             panel_dense, np.iinfo(dense_dtype).max, keys, core_totals, addon, counters)
        if sparse and n_keys:
            unique, per_key = np.unique(keys[:n_keys], return_counts=True)
            key_parts.append((unique, per_key))
            pending += len(unique)
            if pending > 4 * max(len(key_parts[0][0]), 1 << 22):
                key_parts = [_merge_keys(key_parts)]
                pending = len(key_parts[0][0])
        if progress is not None:
            progress(index + 1, n_parts)
    if counters[8]:  # a count passed the dense type's range: count again, wider
        return bin_transcripts(transcripts, geometry, panel, he_to_global, xenium_pixel_size_um=xenium_pixel_size_um,
                               min_qv=min_qv, x_col=x_col, y_col=y_col, feature_col=feature_col, qv_col=qv_col,
                               max_dense_bytes=max_dense_bytes, progress=progress, dense_dtype=np.uint32)
    counts.add(counters)
    warn_non_finite_xy(counts.non_finite_xy)
    if sparse:
        keys, per_key = _merge_keys(key_parts) if key_parts else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        csr = sp.csr_array(
            (per_key.astype(np.uint32), (keys // n_panel, keys % n_panel)), shape=(rows * cols, n_panel)
        )
        tokens = TokenRaster((rows, cols, n_core), csr=csr[:, :n_core])
        addon_tokens = TokenRaster((rows, cols, n_addon), csr=csr[:, n_core:])
    else:
        tokens = TokenRaster((rows, cols, n_core), dense=panel_dense[..., :n_core])
        addon_tokens = TokenRaster((rows, cols, n_addon), dense=panel_dense[..., n_core:])
    return TranscriptBins(geometry, panel, tokens, addon_tokens, core_totals, addon, counts)
