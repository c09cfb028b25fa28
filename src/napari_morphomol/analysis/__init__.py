"""Analysis of a prediction run (no Qt): tiles and cells as AnnData, PCA / Leiden / UMAP, maps.

Entry points: :func:`tiles_anndata` (results -> AnnData), :func:`add_clusters` (the paper's
PCA 31 + Leiden 0.5 / 1.0 + UMAP on the tile embeddings), :func:`explore_run` (a
:class:`RunExplorer`: maps on the stride grid and, for a token-head model, on the token raster)
and :func:`cells_anndata` (predictions per Xenium cell from the token map); :func:`calibrate_on_runs`
recalibrates a model on runs of held-out slides (docs/trust.md). See docs/explore.md.
"""

from napari_morphomol.analysis.calibration import calibrate_on_runs
from napari_morphomol.analysis.cells import CELL_UNITS, cells_anndata, read_xenium_cells
from napari_morphomol.analysis.clusters import (
    PAPER_N_PCS,
    PAPER_RESOLUTIONS,
    add_clusters,
    cluster_colors,
    leiden_key,
)
from napari_morphomol.analysis.gene_maps import StrideGrid, TokenGrid, results_he_to_global
from napari_morphomol.analysis.run_explorer import (
    EXPRESSION_UNITS,
    MAP_KINDS,
    TOKEN_EXPRESSION_UNITS,
    RunExplorer,
    explore_results,
    explore_run,
    partial_results,
)
from napari_morphomol.analysis.tiles_anndata import gene_metrics, measured_matrix, tiles_anndata

__all__ = [
    "CELL_UNITS",
    "EXPRESSION_UNITS",
    "MAP_KINDS",
    "TOKEN_EXPRESSION_UNITS",
    "RunExplorer",
    "StrideGrid",
    "TokenGrid",
    "calibrate_on_runs",
    "cells_anndata",
    "explore_results",
    "explore_run",
    "read_xenium_cells",
    "results_he_to_global",
    "PAPER_N_PCS",
    "PAPER_RESOLUTIONS",
    "add_clusters",
    "cluster_colors",
    "gene_metrics",
    "leiden_key",
    "measured_matrix",
    "partial_results",
    "tiles_anndata",
]
