"""Gene maps on the stride grid, the tile grid and the token grid, placed in ``global`` px (no Qt).

Tiles are 2 x 2 stride squares (256 px at 0.5 um/px) and overlap by one stride, so a stride square
is covered by up to four tiles: its value is their mean. A per-token output (one value per token
of each tile, :class:`TokenGrid`) maps onto the token raster the same way: a token is covered by
up to four tiles (14 tokens per tile, 7 per stride) and its value is their mean. Maps are (rows, cols) rasters over the
whole H&E image, NaN where no tile covers a square. Tile-grid rasters (one pixel per tile, centred
on the tile) carry per-tile labels such as clusters or a selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.errors import InputError
from napari_morphomol.inference import Results
from napari_morphomol.tiling import TileGeometry

_TILE_STRIDES = 2
"""A tile spans 2 x 2 stride squares (tile 512 px, stride 256 px)."""


def results_he_to_global(results: Results) -> np.ndarray:
    """The run's H&E px -> ``global`` map as one 3 x 3 matrix (per-region fits: their best affine)."""
    registration = results.metadata.get("registration") or {}
    matrix = registration.get("matrix") or registration.get("best_affine")
    if matrix is None:
        raise InputError(f"{results.path} records no H&E -> Xenium registration matrix; run predict again")
    return np.asarray(matrix, dtype=np.float64)


@dataclass(frozen=True)
class StrideGrid:
    """Where a run's tiles lie on the stride grid, and the averaging that turns tile values into maps."""

    rows: np.ndarray
    """(tiles,) tile row of each results row."""
    cols: np.ndarray
    shape: tuple[int, int]
    """(rows, cols) of the stride raster."""
    stride_he_px: float
    """Side of one stride square in native H&E px."""
    he_to_global: np.ndarray
    square_mean: sp.csr_matrix
    """(squares, tiles): row k averages the tiles covering stride square k (flattened row-major)."""
    covered: np.ndarray
    """(rows, cols) bool: squares that some tile covers."""

    @classmethod
    def from_results(cls, results: Results) -> "StrideGrid":
        geometry = TileGeometry(**results.metadata["geometry_args"])
        if geometry.tile_px != _TILE_STRIDES * geometry.stride_px:
            raise InputError(f"gene maps need tiles of two strides; this run has tile {geometry.tile_px} px, "
                             f"stride {geometry.stride_px} px")
        return cls.from_tiles(results.tiles["row"].to_numpy(), results.tiles["col"].to_numpy(),
                              geometry.stride_raster_shape, geometry.stride_tokens / geometry.tokens_per_he_px,
                              results_he_to_global(results))

    @classmethod
    def from_tiles(cls, rows, cols, shape: tuple[int, int], stride_he_px: float,
                   he_to_global: np.ndarray) -> "StrideGrid":
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        n_rows, n_cols = int(shape[0]), int(shape[1])
        if len(rows) and (rows.min() < 0 or cols.min() < 0 or rows.max() + 2 > n_rows or cols.max() + 2 > n_cols):
            raise InputError(f"tiles reach outside the stride grid {shape}; the results and the geometry disagree")
        tile_index = np.arange(len(rows))
        square_rows = np.concatenate([rows + dr for dr in (0, 1) for _ in (0, 1)])
        square_cols = np.concatenate([cols + dc for _ in (0, 1) for dc in (0, 1)])
        cover = sp.csr_matrix((np.ones(4 * len(rows)), (square_rows * n_cols + square_cols, np.tile(tile_index, 4))),
                              shape=(n_rows * n_cols, len(rows)))
        counts = np.asarray(cover.sum(axis=1)).ravel()
        with np.errstate(divide="ignore"):
            weights = np.where(counts > 0, 1.0 / counts, 0.0)
        square_mean = (sp.diags(weights) @ cover).tocsr().astype(np.float32)
        return cls(rows, cols, (n_rows, n_cols), float(stride_he_px), np.asarray(he_to_global, np.float64),
                   square_mean, (counts > 0).reshape(n_rows, n_cols))

    # -- maps -----------------------------------------------------------------------------------
    def stride_map(self, tile_values: np.ndarray) -> np.ndarray:
        """(tiles,) values -> (rows, cols) float32 raster of stride-square means, NaN where no tile is."""
        values = np.asarray(tile_values, dtype=np.float32)
        if values.shape != self.rows.shape:
            raise InputError(f"expected one value per tile ({len(self.rows)}), got shape {values.shape}")
        raster = (self.square_mean @ values).reshape(self.shape)
        raster[~self.covered] = np.nan
        return raster

    def tile_raster(self, tile_values: np.ndarray, fill=0) -> np.ndarray:
        """(tiles,) or (tiles, k) values -> one pixel per tile on the tile grid (rows - 1, cols - 1)."""
        values = np.asarray(tile_values)
        if values.shape[0] != len(self.rows):
            raise InputError(f"expected one value per tile ({len(self.rows)}), got shape {values.shape}")
        raster = np.full((self.shape[0] - 1, self.shape[1] - 1, *values.shape[1:]), fill, dtype=values.dtype)
        raster[self.rows, self.cols] = values
        return raster

    # -- placement ------------------------------------------------------------------------------
    def stride_pixel_to_global(self) -> np.ndarray:
        """Stride raster pixel (x, y) -> ``global``: the pixel's centre is its square's centre."""
        s = self.stride_he_px
        return self.he_to_global @ np.array([[s, 0.0, s / 2], [0.0, s, s / 2], [0.0, 0.0, 1.0]])

    def tile_pixel_to_global(self) -> np.ndarray:
        """Tile raster pixel (x, y) -> ``global``: pixel (j, i) is centred on tile (i, j) and one stride wide."""
        s = self.stride_he_px
        return self.he_to_global @ np.array([[s, 0.0, s], [0.0, s, s], [0.0, 0.0, 1.0]])

    def tiles_at_global(self, points_global_px: np.ndarray) -> np.ndarray:
        """Results row of the tile whose central stride square holds each (x, y) point, -1 for none."""
        pixels = apply_affine_xy(np.linalg.inv(self.tile_pixel_to_global()), points_global_px)
        j, i = np.floor(pixels + 0.5).astype(np.int64).T
        lookup = self.tile_raster(np.arange(len(self.rows), dtype=np.int64), fill=-1)
        inside = (i >= 0) & (j >= 0) & (i < lookup.shape[0]) & (j < lookup.shape[1])
        found = np.full(len(i), -1, dtype=np.int64)
        found[inside] = lookup[i[inside], j[inside]]
        return found


@dataclass(frozen=True)
class TokenGrid:
    """Where a run's tiles lie on the token raster, and the averaging that turns per-token outputs
    (tiles, tokens) into one map at token resolution (18.3 um for the paper's model)."""

    n_tiles: int
    shape: tuple[int, int]
    """(rows, cols) of the token raster."""
    token_he_px: float
    """Side of one token in native H&E px."""
    he_to_global: np.ndarray
    token_mean: sp.csr_matrix
    """(raster tokens, tiles x tokens per tile): row k averages the tile tokens lying on raster token k."""
    covered: np.ndarray
    """(rows, cols) bool: raster tokens that some tile covers."""

    @classmethod
    def from_results(cls, results: Results) -> TokenGrid:
        geometry = TileGeometry(**results.metadata["geometry_args"])
        return cls.from_tiles(results.tiles["row"].to_numpy(), results.tiles["col"].to_numpy(), geometry,
                              results_he_to_global(results))

    @classmethod
    def from_tiles(cls, rows, cols, geometry: TileGeometry, he_to_global: np.ndarray) -> TokenGrid:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        n_rows, n_cols = geometry.raster_shape
        s, t = geometry.stride_tokens, geometry.tokens_per_side
        if len(rows) and (rows.min() < 0 or cols.min() < 0 or s * rows.max() + t > n_rows
                          or s * cols.max() + t > n_cols):
            raise InputError(f"tiles reach outside the token raster {(n_rows, n_cols)}; the results and the "
                             "geometry disagree")
        a, b = np.divmod(np.arange(t * t), t)  # token (a, b) of a tile, row-major like the model's tokens
        raster_rows = (s * rows[:, None] + a[None, :]).ravel()
        raster_cols = (s * cols[:, None] + b[None, :]).ravel()
        cover = sp.csr_matrix((np.ones(len(raster_rows)), (raster_rows * n_cols + raster_cols,
                                                          np.arange(len(raster_rows)))),
                              shape=(n_rows * n_cols, len(rows) * t * t))
        counts = np.asarray(cover.sum(axis=1)).ravel()
        with np.errstate(divide="ignore"):
            weights = np.where(counts > 0, 1.0 / counts, 0.0)
        token_mean = (sp.diags(weights) @ cover).tocsr().astype(np.float32)
        return cls(len(rows), (n_rows, n_cols), 1.0 / geometry.tokens_per_he_px,
                   np.asarray(he_to_global, np.float64), token_mean, (counts > 0).reshape(n_rows, n_cols))

    def token_map(self, token_values: np.ndarray) -> np.ndarray:
        """(tiles, tokens) values -> (rows, cols) float32 raster of their means, NaN where no tile is.

        Parameters
        ----------
        token_values
            One value per token of each tile, tokens row-major (one gene of a token-level output).

        Returns
        -------
        numpy.ndarray
            The token-resolution map; place it with :meth:`token_pixel_to_global`.
        """
        values = np.asarray(token_values, dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != self.n_tiles or values.shape[0] * values.shape[1] != \
                self.token_mean.shape[1]:
            raise InputError(f"expected (tiles, tokens) = ({self.n_tiles}, "
                             f"{self.token_mean.shape[1] // max(self.n_tiles, 1)}) values, got shape {values.shape}")
        raster = (self.token_mean @ values.ravel()).reshape(self.shape)
        raster[~self.covered] = np.nan
        return raster

    def token_stack(self, token_values: np.ndarray) -> np.ndarray:
        """(tiles, tokens, width) values -> (rows, cols, width) float32 maps, one per column, as
        :meth:`token_map` makes each (NaN where no tile is)."""
        values = np.asarray(token_values, dtype=np.float32)
        if values.ndim != 3 or values.shape[0] * values.shape[1] != self.token_mean.shape[1]:
            raise InputError(f"expected (tiles, tokens, width) with {self.n_tiles} tiles, got shape {values.shape}")
        stack = np.asarray(self.token_mean @ values.reshape(-1, values.shape[2]), dtype=np.float32)
        stack = stack.reshape(*self.shape, values.shape[2])
        stack[~self.covered] = np.nan
        return stack

    def token_pixel_to_global(self) -> np.ndarray:
        """Token raster pixel (x, y) -> ``global``: the pixel's centre is its token's centre."""
        s = self.token_he_px
        return self.he_to_global @ np.array([[s, 0.0, s / 2], [0.0, s, s / 2], [0.0, 0.0, 1.0]])


def require_token_head(results: Results, what: str) -> None:
    """Refuse ``what`` (e.g. "token maps") for a run whose model predicts per tile only."""
    from napari_morphomol.models.config import ADDON_TOKEN_HEAD

    if ADDON_TOKEN_HEAD not in results.outputs:
        raise InputError(f"the model of {results.path} predicts per tile only (no {ADDON_TOKEN_HEAD!r} output), so "
                         f"it has no {what}: train one with `morphomol train --token-head poisson`")


def token_head_log1p(results: Results, genes=slice(None)) -> np.ndarray:
    """The add-on token head's expected log1p counts, ``softplus`` of its log rate: (tiles, tokens,
    genes) for a slice or list of add-on gene columns, (tiles, tokens) for one column."""
    from napari_morphomol.models.config import ADDON_TOKEN_HEAD

    require_token_head(results, "token maps")
    return np.logaddexp(0.0, results.output(ADDON_TOKEN_HEAD)[:, :, genes])


def measured_token_log1p(results: Results, grid: TokenGrid, genes=slice(None)) -> np.ndarray:
    """log1p of the sample's measured counts per token on ``grid``'s raster, NaN where no tile is:
    (rows, cols, genes) for a slice or list of measured gene columns, (rows, cols) for one."""
    counts = results.measured_token_counts
    if counts is None:
        raise InputError(f"{results.path} holds no measured counts per token (it was made before they were "
                         "stored); run `morphomol predict` again for measured token maps")
    rows, cols = grid.shape
    raster = np.log1p(np.asarray(counts[:rows, :cols, genes], dtype=np.float32))
    raster[~grid.covered] = np.nan
    return raster
