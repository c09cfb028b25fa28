"""Gene maps on the stride grid, the tile grid and the token grid, placed in ``global`` px (no Qt).

Tiles are 2 x 2 stride squares (256 px at 0.5 um/px) and overlap by one stride, so a stride square
is covered by up to four tiles: its value is their mean. A per-token output (one value per token
of each tile, :class:`~napari_morphomol.tiling.stitching.TokenGrid`) maps onto the token raster
the same way: a token is covered by up to four tiles (14 tokens per tile, 7 per stride) and its
value is their mean; predict writes those maps into the results store (:func:`token_map_image`
reads them). Maps are (rows, cols) rasters over the whole H&E image, NaN where no tile covers.
Tile-grid rasters (one pixel per tile, centred on the tile) carry per-tile labels such as
clusters or a selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.errors import InputError
from napari_morphomol.inference import Results
from napari_morphomol.inference.store import recorded_he_to_global
from napari_morphomol.inference.token_maps import TokenMapImage
from napari_morphomol.tiling import TileGeometry, TokenGrid

_TILE_STRIDES = 2
"""A tile spans 2 x 2 stride squares (tile 512 px, stride 256 px)."""


def results_he_to_global(results: Results) -> np.ndarray:
    """The run's H&E px -> ``global`` map as one 3 x 3 matrix (per-region fits: their best affine)."""
    return recorded_he_to_global(results.metadata, results.path)


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


def run_token_grid(results: Results) -> TokenGrid:
    """Where a run's tiles lie on the token raster (:class:`~napari_morphomol.tiling.stitching.TokenGrid`)."""
    return TokenGrid.from_tiles(results.tiles["row"].to_numpy(), results.tiles["col"].to_numpy(),
                                TileGeometry(**results.metadata["geometry_args"]), results_he_to_global(results))


def require_token_head(results: Results, what: str) -> None:
    """Refuse ``what`` (e.g. "token maps") for a run whose model predicts per tile only."""
    from napari_morphomol.models.config import ADDON_TOKEN_HEAD

    if ADDON_TOKEN_HEAD not in results.outputs:
        raise InputError(f"the model of {results.path} predicts per tile only (no {ADDON_TOKEN_HEAD!r} output), so "
                         f"it has no {what}: train one with `morphomol train --token-head poisson`")


def token_head_log1p(results: Results, genes=slice(None), tiles=slice(None)) -> np.ndarray:
    """The add-on token head's expected log1p counts, ``softplus`` of its log rate: (tiles, tokens,
    genes) for a slice or list of add-on gene columns, (tiles, tokens) for one column; ``tiles``
    (a slice or one results row) reads only those tiles."""
    from napari_morphomol.models.config import ADDON_TOKEN_HEAD, addon_token_log1p

    require_token_head(results, "token maps")
    output = results.output(ADDON_TOKEN_HEAD)
    return addon_token_log1p(np.asarray(output.oindex[tiles, :, genes] if hasattr(output, "oindex")
                                        else output[tiles, :, genes]))


def token_map_image(results: Results, kind: str) -> TokenMapImage:
    """The run's stitched token maps of ``kind`` ("predicted" or "measured"), read lazily; InputError
    saying what to do when the run has none of that kind."""
    require_token_head(results, "token maps")
    if kind not in results.token_maps:
        if kind == "measured" and not results.measured_genes:
            raise InputError("this sample measured none of the add-on genes: only predicted token maps exist")
        raise InputError(f"{results.path} holds no stitched {kind} token maps (it was made before they were stored); "
                         "run `morphomol predict` again (with --overwrite) for token maps")
    return results.token_maps[kind]
