"""Tile grid, tissue / transcript filters and token binning for the fusion model (no Qt).

Geometry: :mod:`napari_morphomol.tiling.geometry` (:class:`TileSpec`, how tiles and tokens are
cut, and :class:`TileGeometry`, a spec over one H&E image: one token grid shared by tiles, tokens
and resized image pixels). Entry points: :func:`tile_sample` (a loaded sample) and
:func:`make_tiling` (plain arrays and dataframes), both with :class:`TilingOptions`, and for an
H&E alone (no Xenium run) :func:`tile_he_sample` / :func:`make_he_tiling`;
:class:`LevelSampler` cuts the H&E tiles;
:func:`write_tiles_zarr` / :func:`read_tiles_zarr` store the result; :class:`TokenGrid`
(:mod:`.stitching`) stitches per-tile token values into one token-resolution map.
"""

from napari_morphomol.tiling.geometry import TileGeometry, TileSpec, pick_pyramid_level
from napari_morphomol.tiling.he_tiles import LevelSampler
from napari_morphomol.tiling.panel import GenePanel, is_control_feature
from napari_morphomol.tiling.pipeline import (
    Tiling,
    TilingOptions,
    compute_tissue_mask,
    make_he_tiling,
    make_tiling,
    tile_he_sample,
    tile_sample,
)
from napari_morphomol.tiling.stitching import TokenGrid
from napari_morphomol.tiling.store import TILES_STORE, TilesStore, read_tiles_zarr, write_tiles_zarr
from napari_morphomol.tiling.transcripts import (
    TokenMapping,
    TokenRaster,
    TranscriptBins,
    bin_transcripts,
    feature_names,
)

__all__ = [
    "TokenGrid",
    "TokenMapping",
    "GenePanel",
    "LevelSampler",
    "TileGeometry",
    "TileSpec",
    "TilesStore",
    "Tiling",
    "TilingOptions",
    "TokenRaster",
    "TranscriptBins",
    "bin_transcripts",
    "TILES_STORE",
    "compute_tissue_mask",
    "feature_names",
    "is_control_feature",
    "make_he_tiling",
    "make_tiling",
    "pick_pyramid_level",
    "read_tiles_zarr",
    "tile_he_sample",
    "tile_sample",
    "write_tiles_zarr",
]
