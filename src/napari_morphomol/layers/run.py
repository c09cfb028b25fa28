"""napari layer data for a prediction run (gene maps, clusters, PCA, tile selection), in um.

Plain layer data tuples (no napari import), like :mod:`.sample`. Each raster is
placed with ``layer_affine_um`` through the run's H&E -> ``global`` map, so it overlays the H&E,
DAPI and transcript layers of the same sample.
"""

from __future__ import annotations

import numpy as np

from napari_morphomol.analysis import CELL_UNITS, EXPRESSION_UNITS, TOKEN_EXPRESSION_UNITS, RunExplorer
from napari_morphomol.analysis.run_explorer import MEASURED_KINDS
from napari_morphomol.coords import layer_affine_um
from napari_morphomol.inference.store import RESULTS_LAYER_KEY
from napari_morphomol.layers.sample import UNITS_UM
from napari_morphomol.layers.view import percentile_limits

PREDICTED_LAYER = "predicted expression"
MEASURED_LAYER = "measured expression"
RESIDUAL_LAYER = "residual (measured - predicted)"
INTERVAL_LAYER = "interval width"
OUTLIER_LAYER = "out of distribution"
OUTLIER_COLOR = (0.55, 0.55, 0.55, 1.0)
"""Flagged tiles are drawn in this grey over the maps (at the layer's opacity), greying them out."""
CLUSTERS_LAYER = "Leiden clusters"
PCA_LAYER = "embedding PCA (RGB)"
SELECTION_LAYER = "selected tiles"
MAP_COLORMAPS = {"predicted": "magma", "measured": "magma", "residual": "bwr", "interval": "viridis"}
MAP_LAYER_NAMES = {"predicted": PREDICTED_LAYER, "measured": MEASURED_LAYER, "residual": RESIDUAL_LAYER,
                   "interval": INTERVAL_LAYER}
SELECTION_COLOR = (1.0, 1.0, 0.0, 1.0)


MAP_PERCENTILES = (1.0, 99.0)
"""The contrast of every gene map: 1st-99th percentile of the covered stride squares."""


def map_contrast_limits(raster: np.ndarray, kind: str) -> tuple[float, float]:
    """Contrast of one gene map (:data:`MAP_PERCENTILES`); symmetric about 0 for residuals."""
    return percentile_limits(raster, MAP_PERCENTILES, symmetric=kind == "residual")


RESOLUTIONS = {"tile": "tile (stride squares of 128 um)", "token": "token (18 um)", "cell": "cell (Xenium cells)"}
"""The resolutions a run's maps come in: key -> what the Explore dock offers. Token and cell maps
need a model with the add-on token head (``RunExplorer.has_token_maps``); cell maps also the
run's cell segmentation (cells.parquet and the label mask of cells.zarr.zip)."""
MAP_UNITS = {"tile": EXPRESSION_UNITS, "token": TOKEN_EXPRESSION_UNITS, "cell": CELL_UNITS}


def map_raster(explorer: RunExplorer, gene: str, kind: str, resolution: str = "tile"):
    """The raster of one gene map at ``resolution`` (see :data:`RESOLUTIONS`): NaN everywhere when
    ``gene`` was not measured and ``kind`` needs it. A cell map is a list of lazy levels (multiscale)."""
    unmeasured = (kind in MEASURED_KINDS and not explorer.is_measured(gene)) or (
        kind == "interval" and explorer.interval_refusal(resolution) is not None)
    if resolution == "cell":
        levels = explorer.cell_map(gene, "predicted" if unmeasured else kind)
        return [level * np.float32(np.nan) for level in levels] if unmeasured else levels
    predicted = explorer.gene_map if resolution == "tile" else explorer.token_map
    if unmeasured:
        return np.full(predicted(gene, "predicted").shape, np.nan, dtype=np.float32)
    return predicted(gene, kind)


SHARED_CONTRAST_KINDS = ("predicted", "measured")
"""The predicted and measured maps of a measured gene share one contrast (over both maps' values),
so equal colours mean equal expression side by side."""


def map_limits(explorer: RunExplorer, gene: str, kind: str, resolution: str, raster) -> tuple[float, float] | None:
    """Contrast of one map (:func:`map_contrast_limits`; a cell map's from its cells' values; the
    :data:`SHARED_CONTRAST_KINDS` of a measured gene over both maps), None when it has no finite value."""
    if resolution == "cell":
        if kind in MEASURED_KINDS and not explorer.is_measured(gene):
            return None
        if kind == "interval" and explorer.interval_refusal(resolution) is not None:
            return None
        raster = explorer.cell_label_values(gene, kind)
    values = np.asarray(raster, dtype=np.float64).ravel()
    if kind in SHARED_CONTRAST_KINDS and explorer.is_measured(gene):
        other = next(k for k in SHARED_CONTRAST_KINDS if k != kind)
        other_values = (explorer.cell_label_values(gene, other) if resolution == "cell"
                        else map_raster(explorer, gene, other, resolution))
        values = np.concatenate([values, np.asarray(other_values, dtype=np.float64).ravel()])
    return map_contrast_limits(values, kind) if np.isfinite(values).any() else None


def map_affine_um(explorer: RunExplorer, resolution: str = "tile") -> np.ndarray:
    """Where a map raster of ``resolution`` lies, as a napari affine in um (a cell map is in
    ``global`` px, as the DAPI image)."""
    if resolution == "token":
        return layer_affine_um(explorer.token_grid.token_pixel_to_global(), explorer.xenium_pixel_size_um)
    if resolution == "cell":
        return layer_affine_um(np.eye(3), explorer.xenium_pixel_size_um)
    return stride_affine_um(explorer)


def stride_affine_um(explorer: RunExplorer) -> np.ndarray:
    return layer_affine_um(explorer.grid.stride_pixel_to_global(), explorer.xenium_pixel_size_um)


def tile_affine_um(explorer: RunExplorer) -> np.ndarray:
    return layer_affine_um(explorer.grid.tile_pixel_to_global(), explorer.xenium_pixel_size_um)


def he_alone_in_frame_of(run: RunExplorer, he_alone: RunExplorer) -> np.ndarray | None:
    """The napari affine that carries the layers of an H&E-alone run (placed in H&E um) into the frame
    of ``run``, a run of the same H&E file with its Xenium run (Xenium um), through ``run``'s
    registration (its best affine); None when they are not of the same H&E or ``run`` has no
    Xenium frame."""
    from pathlib import Path

    from napari_morphomol.analysis.gene_maps import results_he_to_global
    from napari_morphomol.coords import napari_affine, scale_matrix

    sample, alone = (run.results.metadata.get("sample") or {}), (he_alone.results.metadata.get("sample") or {})
    if run.route_note or not he_alone.route_note or not sample.get("he_path") or not alone.get("he_path"):
        return None
    if Path(sample["he_path"]).resolve() != Path(alone["he_path"]).resolve():
        return None
    he_um_to_run_um = (scale_matrix(run.xenium_pixel_size_um) @ results_he_to_global(run.results)
                       @ scale_matrix(1.0 / float(alone["he_pixel_size_um"])))
    return napari_affine(he_um_to_run_um)


def gene_map_layer(explorer: RunExplorer, gene: str, kind: str = "predicted", resolution: str = "tile") -> tuple:
    """One map of ``gene`` at ``resolution``; the Explore dock swaps ``data`` (and contrast) of this
    one layer to change gene, and its affine too to change between tile and token resolution (a
    cell map is multiscale: the dock makes the layer anew to change to or from it)."""
    raster = map_raster(explorer, gene, kind, resolution)
    return (
        raster,
        {"name": MAP_LAYER_NAMES[kind], "units": UNITS_UM, "affine": map_affine_um(explorer, resolution),
         "colormap": MAP_COLORMAPS[kind], "contrast_limits": map_limits(explorer, gene, kind, resolution, raster),
         "opacity": 0.8, "blending": "translucent", "multiscale": resolution == "cell",
         "metadata": {"gene": gene, "kind": kind, "units": MAP_UNITS[resolution], "resolution": resolution,
                      RESULTS_LAYER_KEY: str(explorer.results.path)}},
        "image",
    )


def cluster_label_colors(explorer: RunExplorer, key: str) -> dict:
    """Label value -> colour for a Labels layer: cluster k is label k + 1, 0 is transparent, None is the default."""
    categories = explorer.adata.obs[key].cat.categories
    colors = explorer.adata.uns[f"{key}_colors"]
    return {0: "transparent", None: "transparent", **{i + 1: colors[i] for i in range(len(categories))}}


def cluster_labels(explorer: RunExplorer, key: str) -> np.ndarray:
    """Tile-grid raster of cluster label + 1 (0 where there is no tile)."""
    codes = explorer.adata.obs[key].cat.codes.to_numpy().astype(np.int32) + 1
    return explorer.grid.tile_raster(codes, fill=0)


def clusters_layer(explorer: RunExplorer, key: str) -> tuple:
    return (
        cluster_labels(explorer, key),
        {"name": CLUSTERS_LAYER, "units": UNITS_UM, "affine": tile_affine_um(explorer), "opacity": 0.6,
         "colormap": cluster_label_colors(explorer, key),
         "metadata": {"clustering": key, RESULTS_LAYER_KEY: str(explorer.results.path),
                      "legend": dict(zip(explorer.adata.obs[key].cat.categories.astype(str),
                                         explorer.adata.uns[f"{key}_colors"]))}},
        "labels",
    )


def pca_rgb(explorer: RunExplorer) -> np.ndarray:
    """First three PCs scaled by their 1st-99th percentiles to [0, 1], as RGBA (transparent off-tissue)."""
    pcs = np.asarray(explorer.adata.obsm["X_pca"][:, :3], dtype=np.float32)
    if pcs.shape[1] < 3:
        pcs = np.pad(pcs, ((0, 0), (0, 3 - pcs.shape[1])))
    low, high = np.percentile(pcs, MAP_PERCENTILES, axis=0)
    scaled = np.clip((pcs - low) / np.where(high > low, high - low, 1.0), 0.0, 1.0)
    rgba = np.concatenate([scaled, np.ones((len(scaled), 1), np.float32)], axis=1)
    return explorer.grid.tile_raster(rgba.astype(np.float32), fill=0.0)


def pca_layer(explorer: RunExplorer) -> tuple:
    return (
        pca_rgb(explorer),
        {"name": PCA_LAYER, "units": UNITS_UM, "affine": tile_affine_um(explorer), "rgb": True, "visible": False,
         "metadata": {"components": "PC1, PC2, PC3 -> R, G, B", RESULTS_LAYER_KEY: str(explorer.results.path)}},
        "image",
    )


def outlier_layer(explorer: RunExplorer) -> tuple:
    """The tiles flagged out of distribution, grey over the maps (transparent elsewhere)."""
    trust = explorer.trust
    flagged = np.flatnonzero(trust.outlier_flag)
    return _tile_mask_layer(explorer, flagged, OUTLIER_LAYER, OUTLIER_COLOR, 0.75, {
        "n_flagged": int(len(flagged)), "threshold": trust.threshold,
        "legend": {f"out of distribution (outlier score > {trust.threshold:.2f})": OUTLIER_COLOR}})


def _tile_mask_layer(explorer: RunExplorer, tiles: np.ndarray, name: str, color: tuple, opacity: float,
                     metadata: dict | None = None) -> tuple:
    """A labels layer painting the given results rows' tiles in ``color`` (transparent elsewhere)."""
    return (
        selection_mask(explorer, tiles),
        {"name": name, "units": UNITS_UM, "affine": tile_affine_um(explorer), "opacity": opacity,
         "colormap": {0: "transparent", None: "transparent", 1: color},
         "metadata": {RESULTS_LAYER_KEY: str(explorer.results.path), **(metadata or {})}},
        "labels",
    )


def selection_mask(explorer: RunExplorer, tiles: np.ndarray) -> np.ndarray:
    """Tile-grid raster: 1 on the given results rows, 0 elsewhere."""
    flags = np.zeros(explorer.adata.n_obs, dtype=np.int32)
    flags[np.asarray(tiles, dtype=np.int64)] = 1
    return explorer.grid.tile_raster(flags, fill=0)


def selection_layer(explorer: RunExplorer, tiles: np.ndarray) -> tuple:
    return _tile_mask_layer(explorer, tiles, SELECTION_LAYER, SELECTION_COLOR, 0.7)
