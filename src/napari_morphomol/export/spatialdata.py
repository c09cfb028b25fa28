"""A prediction run as a SpatialData object: the run's elements beside the sample, referred to or copied.

By default (``self_contained=False``) the object holds what the run adds and refers to the sample
where it is: the sample's record (``attrs['morphomol']``: its files, absolute) names the files,
:data:`HE_OVERVIEW` is a coarse multiscale copy of the H&E (about 2 um/px, from the H&E's own
pyramid, lazily) placed in ``global`` so that plain ``spatialdata.read_zarr`` and napari-spatialdata
show the maps over the H&E, and :func:`open_export` reads the store back with the sample's full
lazy elements attached from those files. With ``self_contained=True`` the sample's own elements
(H&E, DAPI, transcripts: :data:`SAMPLE_ELEMENTS`) are in the object instead, to be copied.

The run's elements:

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
carry ``EXPORT_ATTRS_KEY``, the mark of an export of ours (with ``self_contained`` and the names of
the sample's elements it refers to). Pixel ``i`` of an image covers ``[i, i + 1)``, as in docs/tiling.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
from anndata import AnnData
from shapely.geometry import Polygon
from spatialdata import SpatialData, read_zarr
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, set_transformation

from napari_morphomol.analysis import StrideGrid, TokenGrid
from napari_morphomol.analysis.gene_maps import run_token_grid, token_map_image
from napari_morphomol.coords import GLOBAL, HE_PX, scale_matrix
from napari_morphomol.elements import (
    HE_IMAGE,
    MORPHOLOGY,
    SAMPLE_ATTRS_KEY,
    SAMPLE_PATH_KEYS,
    TRANSCRIPTS,
    element_levels_cyx,
)
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
EXPORT_FORMAT_VERSION = 2
"""2: the sample referred to by default (``self_contained`` in the mark); 1 (always a full copy) still reads."""
HE_OVERVIEW = "he_overview"
"""A default export's coarse copy of the H&E (multiscale RGB, about :data:`OVERVIEW_PIXEL_SIZE_UM` per
px), placed in ``global`` by the run's registration and in ``he_px``; :func:`open_export` replaces it
by the full H&E."""
OVERVIEW_PIXEL_SIZE_UM = 2.0
"""The overview's finest pixel: the H&E's finest level at least this coarse, else its coarsest level
averaged down to it; 3 bytes per (2 um)^2 bound its size (75 MB raw for 1 cm^2, before compression)."""
OVERVIEW_COARSEST_SIDE_PX = 512
"""The overview's levels halve down to this side (napari-spatialdata shows the coarsest first)."""
SAMPLE_ELEMENTS = (HE_IMAGE, MORPHOLOGY, TRANSCRIPTS)
"""The sample's elements (those ``io.load_sample`` opens) that a default export refers to, not copies."""


def _load_recorded_sample(record: dict, owner: str, found_by: str, retry: str) -> SpatialData:
    """The sample in ``record`` (``xenium_dir``, ``he_path``, ``he_pixel_size_um``) opened lazily, or an
    InputError naming what is missing and saying to move it back and ``retry``."""
    xenium_dir, he_path = record.get("xenium_dir"), record.get("he_path")
    recorded = [he_path] if xenium_dir is None else [xenium_dir, he_path]
    missing = [p for p in recorded if p is None or not Path(p).exists()]
    if missing:
        raise InputError(f"the sample of {owner} is no longer where {found_by} found it (missing: "
                         f"{', '.join(map(str, missing))}); move it back there and {retry}")
    return load_sample(xenium_dir, he_path, he_pixel_size_um=record.get("he_pixel_size_um"))


def open_run_sample(results: Results) -> SpatialData:
    """The sample the run predicted on (its Xenium run and H&E, or an H&E alone), opened lazily
    from the paths and the H&E pixel size the run recorded."""
    return _load_recorded_sample(results.metadata.get("sample", {}), str(results.path), "the run",
                                 "export again (from Python, export_results(..., sample=open_sample(WHERE_IT_IS_NOW)) "
                                 "exports with it where it is)")


def sample_reference(sample: SpatialData) -> dict:
    """The record a default export keeps of the sample's files, so that it can refer to them.

    Parameters
    ----------
    sample
        A sample opened by ``io.load_sample`` / ``io.open_sample`` (its ``attrs['morphomol']``).

    Returns
    -------
    dict
        The sample's record (``elements.SampleInfo`` fields) with its paths made absolute.

    Raises
    ------
    InputError
        When the sample records no files it was read from (it was not opened by napari-morphomol):
        then only a self-contained export can hold it.
    """
    record = sample.attrs.get(SAMPLE_ATTRS_KEY)
    if not isinstance(record, dict) or not (record.get("xenium_dir") or record.get("he_path")):
        raise InputError("the sample does not record the files it was read from (it was not opened by "
                         "napari-morphomol's load_sample / open_sample), so an export cannot refer to them; "
                         "open it with napari_morphomol.io.open_sample, or export a self-contained copy "
                         "(--self-contained, self_contained=True)")
    return {**record, **{k: str(Path(record[k]).resolve()) for k in SAMPLE_PATH_KEYS if record.get(k)}}


def he_overview(he_image, he_to_global: np.ndarray, he_pixel_size_um: float):
    """A coarse multiscale copy of an H&E image element, lazily, placed like the H&E.

    Parameters
    ----------
    he_image
        The sample's H&E element (multiscale or not, (c, y, x) uint8 RGB).
    he_to_global
        3 x 3 (x, y) affine, H&E px -> ``global`` px (the run's registration).
    he_pixel_size_um
        The H&E's level-0 pixel size.

    Returns
    -------
    xarray.DataTree
        A multiscale image whose finest level is the H&E's finest level of at least
        :data:`OVERVIEW_PIXEL_SIZE_UM` per px (else its coarsest level averaged over whole blocks of
        pixels to that size), halved down to :data:`OVERVIEW_COARSEST_SIDE_PX`; transformations
        ``he_px`` (a Scale: overview pixel ``i`` covers H&E px ``[i * s, (i + 1) * s)``) and ``global``.
    """
    levels = element_levels_cyx(he_image)
    height0, width0 = levels[0].shape[1:]

    def level_pixel_um(level) -> float:
        return he_pixel_size_um * width0 / level.shape[2]

    base = next((level for level in levels if level_pixel_um(level) >= OVERVIEW_PIXEL_SIZE_UM * (1 - 1e-6)),
                levels[-1])
    factor = math.ceil(OVERVIEW_PIXEL_SIZE_UM / level_pixel_um(base) - 1e-6)
    factor = max(1, min(factor, *base.shape[1:]))  # an image smaller than one overview pixel keeps one pixel
    scale_xy = np.array([width0 / base.shape[2], height0 / base.shape[1]]) * factor
    if factor > 1:  # whole blocks of pixels, chunk by chunk from the file
        block = factor * max(1, 2048 // factor)
        base = da.coarsen(np.mean, base.rechunk((base.shape[0], block, block)), {1: factor, 2: factor},
                          trim_excess=True).round().astype(np.uint8)
    factors, side = [], max(base.shape[1:])
    while side > OVERVIEW_COARSEST_SIDE_PX:
        factors.append(2)
        side //= 2
    to_he = np.diag([*scale_xy, 1.0])
    transformations = {HE_PX: Scale(scale_xy, axes=("x", "y")),
                       GLOBAL: Affine(np.asarray(he_to_global) @ to_he, input_axes=("x", "y"), output_axes=("x", "y"))}
    return Image2DModel.parse(base, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=transformations,
                              scale_factors=factors, chunks=(3, 1024, 1024))


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


def _set_he_to_global(sample: SpatialData, he_to_global: np.ndarray) -> None:
    """Place the sample's H&E (when it has one) in ``global`` by the run's affine, in place."""
    if HE_IMAGE in sample.images:
        set_transformation(sample.images[HE_IMAGE], Affine(he_to_global, input_axes=("x", "y"), output_axes=("x", "y")),
                           to_coordinate_system=GLOBAL)


def results_to_spatialdata(results: Results, adata: AnnData, *, sample: SpatialData | None = None,
                           explorer=None, self_contained: bool = False) -> SpatialData:
    """The run's tiles, the table annotating them and the gene maps, beside the sample referred to
    (default) or with the sample's own lazy elements (``self_contained``).

    Parameters
    ----------
    results
        The prediction run (``inference.open_results``).
    adata
        Its tiles AnnData (:func:`results_to_anndata`), for the tile table.
    sample
        The sample to export with (default: the one the run recorded, opened lazily); its H&E
        transformation to ``global`` is set to the run's.
    explorer
        An ``analysis.RunExplorer`` of the run that lends its cells; else one is made.
    self_contained
        Hold the sample's elements (:data:`SAMPLE_ELEMENTS` and any other of a given sample) to be
        copied into the store; by default hold :data:`HE_OVERVIEW` and the sample's record instead
        (nothing of the sample's large elements is computed).

    Returns
    -------
    spatialdata.SpatialData
        Every element placed in ``global``; attrs as the module docstring says.

    Raises
    ------
    InputError
        When the sample has elements named as the run's, or (default) records no files to refer to.
    """
    registration = run_registration(results.metadata)
    sample = open_run_sample(results) if sample is None else sample
    ours = {TILES, TILE_TABLE, PREDICTED_IMAGE, MEASURED_IMAGE, PREDICTED_TOKEN_IMAGE, MEASURED_TOKEN_IMAGE,
            CELL_LABELS, CELL_TABLE, HE_OVERVIEW}
    clash = ours & {name for _, name, _ in sample.gen_elements()}
    if clash:
        raise InputError(f"the sample already has elements named {sorted(clash)}; rename them before exporting")
    _set_he_to_global(sample, registration.best_affine)
    grid = StrideGrid.from_results(results)
    images = {PREDICTED_IMAGE: gene_map_image(results.predictions, results.addon_genes, grid)}
    if results.measured_counts is not None:
        images[MEASURED_IMAGE] = gene_map_image(results.measured_log1p, results.measured_genes, grid)
    images.update(_token_map_images(results))
    table = adata.copy()
    table.obs[REGION_KEY] = pd.Categorical([TILES] * table.n_obs)
    table.obs[INSTANCE_KEY] = results.tiles["tile_id"].to_numpy(dtype=np.int64)
    table = TableModel.parse(table, region=TILES, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    mark = {"format_version": EXPORT_FORMAT_VERSION, "results": str(results.path), "self_contained": self_contained}
    attrs = {**sample.attrs, REGISTRATION_ATTRS_KEY: registration.record}
    if self_contained:
        if isinstance(attrs.get(SAMPLE_ATTRS_KEY), dict):
            attrs[SAMPLE_ATTRS_KEY] = {**attrs[SAMPLE_ATTRS_KEY], "he_to_global": registration.best_affine.tolist()}
        sample_parts = {"images": dict(sample.images), "labels": dict(sample.labels), "points": dict(sample.points),
                        "shapes": dict(sample.shapes), "tables": dict(sample.tables)}
    else:
        attrs[SAMPLE_ATTRS_KEY] = {**sample_reference(sample), "he_to_global": registration.best_affine.tolist()}
        mark["sample_elements"] = [name for name in SAMPLE_ELEMENTS if name in {*sample.images, *sample.points}]
        info = attrs[SAMPLE_ATTRS_KEY]
        overview = ({HE_OVERVIEW: he_overview(sample.images[HE_IMAGE], registration.best_affine,
                                              info["he_pixel_size_um"])} if HE_IMAGE in sample.images else {})
        sample_parts = {"images": overview, "labels": {}, "points": {}, "shapes": {}, "tables": {}}
    attrs[EXPORT_ATTRS_KEY] = mark
    from napari_morphomol.analysis import explore_results

    cell_labels, cell_tables = _cell_elements(explore_results(results) if explorer is None else explorer)
    shapes = {**sample_parts["shapes"], TILES: tile_shapes(results, registration)}
    return SpatialData(images={**sample_parts["images"], **images}, labels={**sample_parts["labels"], **cell_labels},
                       points=sample_parts["points"], shapes=shapes,
                       tables={**sample_parts["tables"], TILE_TABLE: table, **cell_tables}, attrs=attrs)


def open_export(path: str | Path, *, sample: SpatialData | None = None) -> SpatialData:
    """A SpatialData export of ours read back: a default export gets the sample's H&E, DAPI and
    transcripts attached from the files it names, in place of its H&E overview.

    Parameters
    ----------
    path
        A store written by ``morphomol export --spatialdata`` (``export_results(spatialdata=...)``).
    sample
        The sample to attach, replacing the one the store names (e.g. when it was moved):
        ``io.open_sample(WHERE_IT_IS_NOW)``.

    Returns
    -------
    spatialdata.SpatialData
        The store's elements (lazy) with, for a default export, the sample elements its mark lists
        (:data:`SAMPLE_ELEMENTS`: the H&E, placed in ``global`` by the run's registration, the DAPI
        and the transcripts), read by ``io.load_sample`` without the cell segmentation: the
        sample's other labels, shapes and tables, which a self-contained export copies in, are not
        attached. A self-contained export is returned as ``spatialdata.read_zarr`` reads it.

    Raises
    ------
    InputError
        When ``path`` is not a SpatialData export of ours, or the sample is no longer where the
        export found it (naming what is missing and what to do).
    """
    path = Path(path)
    try:
        sdata = read_zarr(path)
    except Exception as exc:
        raise InputError(f"{path} is not a readable SpatialData store ({type(exc).__name__}: {exc}); "
                         "give a store written by `morphomol export --spatialdata`") from exc
    mark = sdata.attrs.get(EXPORT_ATTRS_KEY)
    if not isinstance(mark, dict):
        raise InputError(f"{path} is not a SpatialData export of napari-morphomol (no attrs[{EXPORT_ATTRS_KEY!r}]); "
                         "open it with spatialdata.read_zarr")
    if mark.get("self_contained", True):
        return sdata
    record = sdata.attrs[SAMPLE_ATTRS_KEY]
    if sample is None:
        sample = _load_recorded_sample(record, str(path), "the export",
                                       "open it again (from Python, open_export(PATH, sample=open_sample("
                                       "WHERE_IT_IS_NOW)) opens it with the sample where it is)")
    _set_he_to_global(sample, np.asarray(record["he_to_global"], dtype=np.float64))
    names = mark.get("sample_elements", SAMPLE_ELEMENTS)
    images = {name: sample.images[name] for name in names if name in sample.images}
    images.update((name, element) for name, element in sdata.images.items() if name != HE_OVERVIEW)
    points = {name: sample.points[name] for name in names if name in sample.points}
    return SpatialData(images=images, labels=dict(sdata.labels), points={**points, **sdata.points},
                       shapes=dict(sdata.shapes), tables=dict(sdata.tables), attrs=sdata.attrs)
