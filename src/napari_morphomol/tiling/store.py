"""The tiles store (``TILES.zarr``): grid, token raster and targets, for training and inspection.

Layout (zarr v3 group):
- attrs ``morphomol_tiles``: format version, geometry, ordered core and add-on genes, the filter
  report, the Xenium pixel size and the H&E -> ``global`` matrix when it is one affine.
- ``tiles/<column>``: the kept tiles' table (id, row, col, H&E px box, centre in ``global`` and um,
  background fraction, transcript counts), one 1-D array per column.
- ``tokens`` (token rows, token cols, core genes) uint32: tile (i, j) is
  ``tokens[s*i:s*i+14, s*j:s*j+14]`` with ``s = geometry["stride_tokens"]``. Empty chunks are not stored.
- ``addon_tokens`` (token rows, token cols, add-on genes) uint32, laid out as ``tokens``: the
  per-token targets; a tile's per-token counts sum to its row of ``addon_counts``.
- ``core_totals`` (token rows, token cols) uint32; ``addon_stride`` (stride rows, stride cols, add-on
  genes) uint32: add-on counts per stride square (tile (i, j) = stride squares [i, i+2) x [j, j+2)).
- ``addon_counts`` (tiles, add-on genes) uint32 and ``targets_log1p`` float32, rows in table order.

Format 3 (this one) adds ``addon_tokens``; format 2 named the geometry by tokens and pixel sizes
(``stride_tokens``, ``tile_pixel_size_um``, dimensions ``token_y`` / ``token_x``). A store of an
earlier format (format 1 used ``cell`` and ``mpp`` names) is refused with "tile the sample again".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from napari_morphomol._atomic import atomic_output, open_versioned_group, zarr_store_kind
from napari_morphomol.registration.transforms import AffineXY
from napari_morphomol.tiling.geometry import TileGeometry
from napari_morphomol.tiling.pipeline import Tiling

FORMAT_VERSION = 3
ATTRS_KEY = "morphomol_tiles"
_BAND_TOKENS = 28
"""Token rows written at a time (two chunks of 14 x 14-token tiles at stride 7)."""


TILES_STORE = zarr_store_kind("tiles store", ATTRS_KEY)
"""What ``write_tiles_zarr`` writes: ``--overwrite`` replaces only a store carrying ``ATTRS_KEY``."""


def write_tiles_zarr(tiling: Tiling, out_path: str | Path, *, overwrite: bool = False,
                     provenance: dict | None = None, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Write the tiles store atomically (a hidden temporary store beside ``out_path``, then one
    rename), guarded by :func:`napari_morphomol._atomic.guard_output` against ``inputs``."""
    with atomic_output(out_path, TILES_STORE, inputs=inputs, overwrite=overwrite) as tmp:
        _write(tiling, tmp, provenance=provenance or {})
    return Path(out_path)


def _write(tiling: Tiling, path: Path, *, provenance: dict) -> None:
    bins, geometry, transform = tiling.bins, tiling.geometry, tiling.transform
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs[ATTRS_KEY] = {
        "format_version": FORMAT_VERSION,
        "geometry": geometry.to_dict(),
        "core_genes": list(tiling.panel.core),
        "addon_genes": list(tiling.panel.addon),
        "report": tiling.report,
        "tile_columns": list(tiling.tiles.columns),
        "xenium_pixel_size_um": float(tiling.xenium_pixel_size_um),
        "he_to_global": transform.matrix.tolist() if isinstance(transform, AffineXY) else None,
        "provenance": provenance,
    }
    table = root.create_group("tiles")
    for column in tiling.tiles.columns:
        values = tiling.tiles[column].to_numpy()
        table.create_array(column, data=values, chunks=(max(1, min(len(values), 65536)),))
    write_token_raster(root, "tokens", bins.tokens, "core_gene")
    write_token_raster(root, "addon_tokens", bins.addon_tokens, "addon_gene")
    root.create_array("core_totals", data=bins.core_totals, chunks=(256, 256),
                      dimension_names=("token_y", "token_x"))
    root.create_array("addon_stride", data=bins.addon_stride,
                      chunks=(64, 64, max(bins.addon_stride.shape[2], 1)),
                      dimension_names=("stride_y", "stride_x", "addon_gene"))
    rows_, cols_ = tiling.tiles["row"].to_numpy(), tiling.tiles["col"].to_numpy()
    counts = bins.tile_addon_counts(rows_, cols_).astype(np.uint32)
    n_tiles, n_addon = counts.shape
    chunk = (max(1, min(n_tiles, 8192)), max(n_addon, 1))
    root.create_array("addon_counts", data=counts, chunks=chunk, dimension_names=("tile", "addon_gene"))
    root.create_array("targets_log1p", data=np.log1p(counts).astype(np.float32), chunks=chunk,
                      dimension_names=("tile", "addon_gene"))


def write_token_raster(group: zarr.Group, name: str, raster, gene_dimension: str) -> None:
    """A :class:`~napari_morphomol.tiling.TokenRaster` as the uint32 array ``name`` of ``group``
    (token_y, token_x, ``gene_dimension``), band by band: a sparse raster is never made dense whole."""
    rows, cols, genes = raster.shape
    array = group.create_array(name, shape=(rows, cols, genes), dtype=np.uint32,
                              chunks=(_BAND_TOKENS, _BAND_TOKENS, max(genes, 1)), fill_value=0,
                              dimension_names=("token_y", "token_x", gene_dimension))
    for r0 in range(0, rows, _BAND_TOKENS):
        array[r0:r0 + _BAND_TOKENS] = raster.window(r0, 0, _BAND_TOKENS, cols)


@dataclass
class TilesStore:
    """A written tiles store, read lazily (token arrays stay on disk)."""

    path: Path
    geometry: TileGeometry
    tiles: pd.DataFrame
    core_genes: list[str]
    addon_genes: list[str]
    report: dict
    tokens: zarr.Array
    addon_tokens: zarr.Array
    addon_counts: zarr.Array
    targets_log1p: zarr.Array
    attrs: dict

    def tile_tokens(self, position: int) -> np.ndarray:
        """(14, 14, core genes) token counts of the tile at table ``position``."""
        s, t = self.geometry.stride_tokens, self.geometry.tokens_per_side
        i, j = int(self.tiles["row"].iloc[position]), int(self.tiles["col"].iloc[position])
        return self.tokens[s * i:s * i + t, s * j:s * j + t]

    def tile_addon_tokens(self, position: int) -> np.ndarray:
        """(14, 14, add-on genes) per-token add-on counts of the tile at table ``position``."""
        s, t = self.geometry.stride_tokens, self.geometry.tokens_per_side
        i, j = int(self.tiles["row"].iloc[position]), int(self.tiles["col"].iloc[position])
        return self.addon_tokens[s * i:s * i + t, s * j:s * j + t]


def read_tiles_zarr(path: str | Path) -> TilesStore:
    path = Path(path)
    root, attrs = open_versioned_group(path, ATTRS_KEY, FORMAT_VERSION, "tiles store written by `morphomol tiles`",
                                       "give a .tiles.zarr from `morphomol tiles`, or tile the sample again")
    g = attrs["geometry"]
    geometry = TileGeometry(**{f.name: g[f.name] for f in dataclasses.fields(TileGeometry)})
    table = root["tiles"]
    tiles = pd.DataFrame({name: table[name][:] for name in attrs["tile_columns"]})
    return TilesStore(path, geometry, tiles, attrs["core_genes"], attrs["addon_genes"], attrs["report"],
                      root["tokens"], root["addon_tokens"], root["addon_counts"], root["targets_log1p"], attrs)
