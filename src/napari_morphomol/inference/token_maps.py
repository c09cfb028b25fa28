"""Stitched token maps of a run, written into its results store when every chunk is done.

Layout: the group ``token_maps`` holds one multiscale image per kind: ``predicted`` (a model with
the add-on token head: per raster token, the mean over the up to four tiles covering it of the
head's expected log1p count, ``softplus`` of its log rate) and, when the sample measured add-on
genes, ``measured`` (log1p of the measured counts per token). Each kind is the arrays ``0``,
``1``, ... of (genes, token rows, token cols) float32, NaN where no tile covers, zarr chunks
(1, :data:`MAP_CHUNK_TOKENS`, :data:`MAP_CHUNK_TOKENS`): one gene's plane reads alone. Level
``l + 1`` halves level ``l``: each pixel is log1p of the mean count of the finite pixels under
it, so a zoomed-out map keeps the quantity "log1p counts per token". The group's attrs name the
genes and units, and per level its shape, its downsampling and its pixel -> ``global`` px matrix
(pixel centres, as ``TokenGrid.token_pixel_to_global``), plus ``multiscales`` in OME-NGFF 0.4
form (axes c, y, x, a scale per level) for other readers.

Invariant: level 0 of ``predicted`` is ``TokenGrid.token_map`` of the head's expected log1p counts
for every gene, and level 0 of ``measured`` is the measured token raster's log1p where a tile
covers; both are written one block of :data:`MAP_CHUNK_TOKENS` squared tokens x all genes at a
time, reading only the tiles covering the block, so memory is bounded by the block, not the slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from napari_morphomol.inference.store import TOKEN_MAPS, recorded_he_to_global
from napari_morphomol.models.config import ADDON_TOKEN_HEAD, addon_token_log1p
from napari_morphomol.tiling.geometry import TileGeometry
from napari_morphomol.tiling.stitching import TokenGrid

MAP_CHUNK_TOKENS = 128
"""Side of a map block and zarr chunk in tokens (2.3 mm at 18.3 um)."""
COARSEST_SIDE_TOKENS = 256
"""Levels halve until the map's longer side is at most this many pixels."""
HALVING_GENES = 16
"""Genes of a block read at a time while building the coarser levels."""
TOKEN_MAP_UNITS = "log1p counts per token"
MAP_KINDS = ("predicted", "measured")


def level_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """(rows, cols) of each level of a map of ``shape``: halved (rounded up) down to :data:`COARSEST_SIDE_TOKENS`."""
    shapes = [tuple(int(n) for n in shape)]
    while max(shapes[-1]) > COARSEST_SIDE_TOKENS:
        shapes.append(tuple(-(-n // 2) for n in shapes[-1]))
    return shapes


def level_pixel_to_global(grid: TokenGrid, level: int) -> np.ndarray:
    """Pixel (x, y) of ``level`` -> ``global`` px; a pixel's centre is the centre of the 2^level tokens it covers."""
    f = 2.0**level
    return grid.token_pixel_to_global() @ np.array([[f, 0.0, (f - 1) / 2], [0.0, f, (f - 1) / 2], [0.0, 0.0, 1.0]])


def run_token_grid(root: zarr.Group, attrs: dict) -> TokenGrid:
    """Where the tiles of the results store ``root`` (its ``attrs``) lie on the token raster."""
    geometry, he_to_global = TileGeometry(**attrs["geometry_args"]), recorded_he_to_global(attrs, "this results store")
    return TokenGrid.from_tiles(root["tiles"]["row"][:], root["tiles"]["col"][:], geometry, he_to_global)


def write_token_maps(root: zarr.Group, attrs: dict) -> list[str]:
    """Write the kinds of :data:`MAP_KINDS` the run has into ``root``'s ``token_maps`` (replaced).

    Parameters
    ----------
    root
        The results store (open for writing), its ``addon_tokens`` output complete.
    attrs
        Its ``morphomol_results`` attributes (genes, geometry, registration).

    Returns
    -------
    list of str
        The kinds written (none for a model without the add-on token head).
    """
    if TOKEN_MAPS in root:
        del root[TOKEN_MAPS]
    if ADDON_TOKEN_HEAD not in root:
        return []
    group = root.create_group(TOKEN_MAPS)
    grid = run_token_grid(root, attrs)
    output = root[ADDON_TOKEN_HEAD]

    def predicted(rows: slice, cols: slice) -> np.ndarray | None:
        return grid.stitch_block(rows, cols, lambda tiles: addon_token_log1p(output.oindex[tiles]), output.chunks[0])

    _write_kind(group, "predicted", grid, list(attrs["addon_genes"]), predicted)
    if "measured_token_counts" not in root or not attrs["measured_genes"]:
        return ["predicted"]
    counts = root["measured_token_counts"]

    def measured(rows: slice, cols: slice) -> np.ndarray | None:
        covered = grid.covered[rows, cols]
        if not covered.any():
            return None
        values = np.log1p(np.asarray(counts[rows, cols], dtype=np.float32))
        values[~covered] = np.nan
        return np.moveaxis(values, -1, 0)

    _write_kind(group, "measured", grid, list(attrs["measured_genes"]), measured)
    return ["predicted", "measured"]


def _write_kind(group: zarr.Group, kind: str, grid: TokenGrid, genes: list[str], block_values) -> None:
    shapes = level_shapes(grid.shape)
    image = group.create_group(kind)
    n_genes = max(len(genes), 1)
    levels = [image.create_array(str(level), shape=(n_genes, *shape), dtype=np.float32, fill_value=np.nan,
                                 chunks=(1, MAP_CHUNK_TOKENS, MAP_CHUNK_TOKENS), dimension_names=("gene", "y", "x"))
              for level, shape in enumerate(shapes)]
    c, (rows, cols) = MAP_CHUNK_TOKENS, shapes[0]
    for r0 in range(0, rows, c):
        for c0 in range(0, cols, c):
            block_rows, block_cols = slice(r0, min(r0 + c, rows)), slice(c0, min(c0 + c, cols))
            block = block_values(block_rows, block_cols)
            if block is not None:
                levels[0][:, block_rows, block_cols] = block
    for level in range(1, len(levels)):
        _halve(levels[level - 1], levels[level])
    image.attrs.update(_image_attrs(kind, grid, genes, shapes))


def _halve(finer: zarr.Array, coarser: zarr.Array) -> None:
    """Fill ``coarser`` from ``finer``: log1p of the mean count of the finite pixels of each 2 x 2
    square, :data:`HALVING_GENES` genes of one block at a time."""
    c = MAP_CHUNK_TOKENS
    n_genes, rows, cols = coarser.shape
    for g0 in range(0, n_genes, HALVING_GENES):
        genes = slice(g0, min(g0 + HALVING_GENES, n_genes))
        for r0 in range(0, rows, c):
            for c0 in range(0, cols, c):
                values = np.asarray(finer[genes, 2 * r0:2 * (r0 + c), 2 * c0:2 * (c0 + c)], dtype=np.float32)
                n_rows, n_cols = -(-values.shape[1] // 2), -(-values.shape[2] // 2)
                padded = np.full((values.shape[0], 2 * n_rows, 2 * n_cols), np.nan, dtype=np.float32)
                padded[:, :values.shape[1], :values.shape[2]] = values
                squares = padded.reshape(values.shape[0], n_rows, 2, n_cols, 2)
                finite = np.isfinite(squares)
                total = np.expm1(np.where(finite, squares, np.float32(0.0))).sum(axis=(2, 4))
                n = finite.sum(axis=(2, 4))
                with np.errstate(invalid="ignore", divide="ignore"):
                    coarser[genes, r0:r0 + n_rows, c0:c0 + n_cols] = np.where(n > 0, np.log1p(total / n), np.nan)


def _image_attrs(kind: str, grid: TokenGrid, genes: list[str], shapes: list[tuple[int, int]]) -> dict:
    levels = [{"path": str(level), "shape": list(shape), "downsample": 2**level,
               "pixel_to_global": level_pixel_to_global(grid, level).tolist()} for level, shape in enumerate(shapes)]
    return {
        "morphomol_token_map": {"kind": kind, "genes": list(genes), "units": TOKEN_MAP_UNITS,
                                "token_he_px": grid.token_he_px, "levels": levels},
        "multiscales": [{
            "version": "0.4", "name": kind,
            "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 2.0**level, 2.0**level]},
                {"type": "translation", "translation": [0.0, (2.0**level - 1) / 2, (2.0**level - 1) / 2]}]}
                for level in range(len(shapes))],
        }],
    }


@dataclass(frozen=True)
class TokenMapImage:
    """One kind of a run's stitched token maps, read lazily: ``levels[l][g]`` is gene ``g``'s plane at level ``l``."""

    kind: str
    genes: list[str]
    levels: list[zarr.Array]
    """(genes, rows, cols) float32 per level, finest first."""
    pixel_to_global: list[np.ndarray]
    """Per level: pixel (x, y) -> ``global`` px, pixel centres."""
    units: str

    def plane(self, gene: str, level: int = 0) -> np.ndarray:
        """(rows, cols) float32 map of ``gene`` at ``level`` (NaN where no tile is)."""
        return np.asarray(self.levels[level][self.genes.index(gene)], dtype=np.float32)

    def at_tokens(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(n, genes) level-0 values at raster tokens ``(rows[k], cols[k])``, read one chunk block at a time."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        values = np.full((len(rows), len(self.genes)), np.nan, dtype=np.float32)
        c = MAP_CHUNK_TOKENS
        block = (rows // c) * (self.levels[0].shape[2] // c + 1) + cols // c
        order = np.argsort(block, kind="stable")
        for members in np.split(order, np.flatnonzero(np.diff(block[order])) + 1):
            if not len(members):
                continue
            r0, c0 = rows[members[0]] // c * c, cols[members[0]] // c * c
            chunk = np.asarray(self.levels[0][:, r0:r0 + c, c0:c0 + c], dtype=np.float32)
            values[members] = chunk[:, rows[members] - r0, cols[members] - c0].T
        return values


def read_token_maps(root: zarr.Group) -> dict[str, TokenMapImage]:
    """The stitched token maps of the results store ``root`` by kind (empty for a run without them)."""
    if TOKEN_MAPS not in root:
        return {}
    images = {}
    for kind in MAP_KINDS:
        if kind not in root[TOKEN_MAPS]:
            continue
        group = root[TOKEN_MAPS][kind]
        record = dict(group.attrs["morphomol_token_map"])
        images[kind] = TokenMapImage(kind, list(record["genes"]), [group[level["path"]] for level in record["levels"]],
                                     [np.asarray(level["pixel_to_global"]) for level in record["levels"]],
                                     record["units"])
    return images
