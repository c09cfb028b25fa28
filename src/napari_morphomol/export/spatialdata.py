"""A prediction run as a SpatialData object: the sample, the tiles, the table and the gene maps.

Elements added to the sample's own (lazy) images and points:

- ``tiles`` (shapes): each tile's H&E px box mapped to ``global`` px through the run's full
  registration (per-region models included), as a polygon indexed by ``tile_id``.
- ``tile_table`` (table): the AnnData of :func:`results_to_anndata`, annotating ``tiles``
  (``region_key='region'``, ``instance_key='tile_id'``).
- ``predicted_expression`` / ``measured_expression`` (images, ``c`` = genes): the stride grid
  of ``analysis.StrideGrid`` (each cell the mean of the tiles covering it, NaN where no tile
  does), with the affine that places a cell on its H&E px square and then in ``global``.

- ``predicted_expression_tokens`` / ``measured_expression_tokens`` (images): a token-head run's
  stitched token maps, read lazily from the results store.
- ``cell_labels`` (labels) and ``cell_table`` (table annotating it by ``label_id``): a token-head
  run whose sample has its cell segmentation: the Xenium cell mask and the cells AnnData
  (``analysis.cells_anndata``).

The H&E element's transformation to ``global`` is the run's registration (its best affine for
per-region models; the full record is in ``attrs['morphomol_registration']``); ``attrs`` also
carry ``EXPORT_ATTRS_KEY``, the mark of an export of ours. Pixel ``i`` of an
image covers ``[i, i + 1)``, as in docs/tiling.md.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from anndata import AnnData
from shapely.geometry import Polygon
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, set_transformation

from napari_morphomol.analysis import StrideGrid, TokenGrid
from napari_morphomol.analysis.gene_maps import run_token_grid, token_map_image
from napari_morphomol.coords import GLOBAL, scale_matrix
from napari_morphomol.elements import HE_IMAGE, SAMPLE_ATTRS_KEY
from napari_morphomol.errors import InputError
from napari_morphomol.export.registration import RunRegistration, run_registration
from napari_morphomol.inference.store import Results
from napari_morphomol.io.sample import load_sample
from napari_morphomol.registration import REGISTRATION_ATTRS_KEY

TILES = "tiles"
TILE_TABLE = "tile_table"
PREDICTED_IMAGE = "predicted_expression"
MEASURED_IMAGE = "measured_expression"
PREDICTED_TOKEN_IMAGE = "predicted_expression_tokens"
"""The token head's map (log1p counts per token, 18.3 um pixels), for runs of a token-head model."""
MEASURED_TOKEN_IMAGE = "measured_expression_tokens"
TOKEN_IMAGE_CHUNK = 256
"""Token-map chunks: one gene, 256 x 256 tokens (4.7 mm square)."""
CELL_LABELS = "cell_labels"
"""The run's Xenium cell label mask (``cells.zarr.zip``, ``masks/1``; a token-head run with cells)."""
CELL_TABLE = "cell_table"
"""The cells AnnData (``analysis.cells_anndata``) annotating :data:`CELL_LABELS` by ``label_id``."""
CELL_INSTANCE_KEY = "label_id"
REGION_KEY = "region"
INSTANCE_KEY = "tile_id"
EXPORT_ATTRS_KEY = "morphomol_export"
"""Root attribute that marks a SpatialData store as an export of ours (``--overwrite`` may replace it)."""
EXPORT_FORMAT_VERSION = 1


def open_run_sample(results: Results) -> SpatialData:
    """The sample the run predicted on (its Xenium run and H&E, or an H&E alone), opened lazily
    from the paths and the H&E pixel size the run recorded."""
    sample = results.metadata.get("sample", {})
    xenium_dir, he_path = sample.get("xenium_dir"), sample.get("he_path")
    recorded = [he_path] if xenium_dir is None else [xenium_dir, he_path]
    missing = [p for p in recorded if p is None or not Path(p).exists()]
    if missing:
        raise InputError(f"the sample of {results.path} is no longer where the run found it (missing: "
                         f"{', '.join(map(str, missing))}); move it back there and export again (from Python, "
                         "export_results(..., sample=open_sample(WHERE_IT_IS_NOW)) exports with it where it is)")
    return load_sample(xenium_dir, he_path, he_pixel_size_um=sample.get("he_pixel_size_um"))


def _token_map_images(results: Results) -> dict:
    """The stitched predicted (and measured) token maps of a token-head run, read lazily from its
    store, or nothing for a tile-only model."""
    import dask.array as da

    from napari_morphomol.models.config import ADDON_TOKEN_HEAD

    if ADDON_TOKEN_HEAD not in results.outputs:
        return {}
    grid = run_token_grid(results)
    images = {}
    for name, kind in ((PREDICTED_TOKEN_IMAGE, "predicted"), (MEASURED_TOKEN_IMAGE, "measured")):
        if kind == "predicted" or results.measured_genes:
            image = token_map_image(results, kind)
            images[name] = token_map_element(da.from_zarr(image.levels[0]), image.genes, grid)
    return images


def _cell_elements(explorer) -> tuple[dict, dict]:
    """The cell label mask and the cells table annotating it, for a token-head run whose sample has
    its cell segmentation; nothing otherwise (the tile and token elements do not need them)."""
    from napari_morphomol.analysis.cells import COARSEST_LABEL_SIDE_PX

    if explorer.cell_view_refusal() is not None:
        return {}, {}
    mask = explorer.cell_labels[0]
    factors, side = [], max(mask.shape)
    while side > COARSEST_LABEL_SIDE_PX:
        factors.append(2)
        side //= 2
    labels = Labels2DModel.parse(mask, dims=("y", "x"), transformations={GLOBAL: Identity()},
                                 scale_factors=factors or None, chunks=(1024, 1024))
    cells = explorer.cells.copy()
    cells.obs[REGION_KEY] = pd.Categorical([CELL_LABELS] * cells.n_obs)
    table = TableModel.parse(cells, region=CELL_LABELS, region_key=REGION_KEY, instance_key=CELL_INSTANCE_KEY)
    return {CELL_LABELS: labels}, {CELL_TABLE: table}


def tile_shapes(results: Results, registration: RunRegistration) -> gpd.GeoDataFrame:
    """Tile squares (H&E px boxes) as polygons in ``global`` px, indexed by ``tile_id``."""
    t = results.tiles
    x0, y0, x1, y1 = (t[c].to_numpy(dtype=np.float64) for c in ("he_x0", "he_y0", "he_x1", "he_y1"))
    corners_he = np.stack(
        [np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1
    )
    corners_global = registration.apply_xy(corners_he.reshape(-1, 2)).reshape(-1, 4, 2)
    frame = gpd.GeoDataFrame(geometry=[Polygon(c) for c in corners_global],
                             index=pd.Index(t["tile_id"].to_numpy(dtype=np.int64), name=INSTANCE_KEY))
    return ShapesModel.parse(frame, transformations={GLOBAL: Identity()})


def gene_map_image(values: np.ndarray, genes: list[str], grid: StrideGrid):
    """(tiles, genes) -> (genes, rows, cols) stride-grid image placed in ``global``.

    SpatialData pixel ``i`` covers ``[i, i + 1)``, so pixel (c, r) is stride square (c, r) as it is:
    no half-pixel shift (napari's pixel centres need one; ``StrideGrid.stride_pixel_to_global``).
    """
    values = np.asarray(values, dtype=np.float32)
    stack = np.stack([grid.stride_map(values[:, k]) for k in range(values.shape[1])])
    to_global = grid.he_to_global @ scale_matrix(grid.stride_he_px)
    affine = Affine(to_global, input_axes=("x", "y"), output_axes=("x", "y"))
    return Image2DModel.parse(stack, dims=("c", "y", "x"), c_coords=list(genes), transformations={GLOBAL: affine})


def token_map_element(stack, genes: list[str], grid: TokenGrid):
    """(genes, rows, cols) token maps (a lazy array) -> a multiscale image placed in ``global``
    (pixel ``i`` covers tokens ``[i, i + 1)``, as :func:`gene_map_image`), chunked per gene."""
    factors, side = [], min(grid.shape)
    while side >= 256:  # halve down to about 128 tokens a side
        factors.append(2)
        side //= 2
    to_global = grid.he_to_global @ scale_matrix(grid.token_he_px)
    affine = Affine(to_global, input_axes=("x", "y"), output_axes=("x", "y"))
    return Image2DModel.parse(stack, dims=("c", "y", "x"), c_coords=list(genes), transformations={GLOBAL: affine},
                              scale_factors=factors or None, chunks=(1, TOKEN_IMAGE_CHUNK, TOKEN_IMAGE_CHUNK))


def results_to_spatialdata(results: Results, adata: AnnData, *, sample: SpatialData | None = None,
                           explorer=None) -> SpatialData:
    """The sample's elements (lazy) plus tiles, the table annotating them and the gene maps.

    A ``sample`` given by the caller gets its H&E transformation to ``global`` set to the run's;
    an ``explorer`` of the run (``analysis.RunExplorer``) lends its cells, else one is made.
    """
    registration = run_registration(results.metadata)
    sample = open_run_sample(results) if sample is None else sample
    ours = {TILES, TILE_TABLE, PREDICTED_IMAGE, MEASURED_IMAGE, PREDICTED_TOKEN_IMAGE, MEASURED_TOKEN_IMAGE,
            CELL_LABELS, CELL_TABLE}
    clash = ours & {name for _, name, _ in sample.gen_elements()}
    if clash:
        raise InputError(f"the sample already has elements named {sorted(clash)}; rename them before exporting")
    if HE_IMAGE in sample.images:
        set_transformation(sample.images[HE_IMAGE],
                           Affine(registration.best_affine, input_axes=("x", "y"), output_axes=("x", "y")),
                           to_coordinate_system=GLOBAL)
    images = dict(sample.images)
    grid = StrideGrid.from_results(results)
    images[PREDICTED_IMAGE] = gene_map_image(results.predictions, results.addon_genes, grid)
    if results.measured_counts is not None:
        images[MEASURED_IMAGE] = gene_map_image(results.measured_log1p, results.measured_genes, grid)
    images.update(_token_map_images(results))
    table = adata.copy()
    table.obs[REGION_KEY] = pd.Categorical([TILES] * table.n_obs)
    table.obs[INSTANCE_KEY] = results.tiles["tile_id"].to_numpy(dtype=np.int64)
    table = TableModel.parse(table, region=TILES, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    attrs = {**sample.attrs, REGISTRATION_ATTRS_KEY: registration.record,
             EXPORT_ATTRS_KEY: {"format_version": EXPORT_FORMAT_VERSION, "results": str(results.path)}}
    if isinstance(attrs.get(SAMPLE_ATTRS_KEY), dict):
        attrs[SAMPLE_ATTRS_KEY] = {**attrs[SAMPLE_ATTRS_KEY], "he_to_global": registration.best_affine.tolist()}
    from napari_morphomol.analysis import explore_results

    cell_labels, cell_tables = _cell_elements(explore_results(results) if explorer is None else explorer)
    return SpatialData(images=images, labels={**sample.labels, **cell_labels}, points=dict(sample.points),
                       shapes={**sample.shapes, TILES: tile_shapes(results, registration)},
                       tables={**sample.tables, TILE_TABLE: table, **cell_tables}, attrs=attrs)
