"""Predicted add-on expression per Xenium cell, from a run's token map (headless: no Qt).

A *cell* here is a segmented Xenium cell (``cells.parquet``: ``cell_id``, centroid in um,
``cell_area``). It takes the token (18.3 um for the paper's tiles) its centroid lies in, through
the run's registration: ``um -> global px -> H&E px -> token``. Invariant: a cell's predicted
count of a gene is the expected count of its token (the stitched token map predict wrote: the
mean over the tiles covering the token of ``softplus`` of the add-on token head, read one chunk
block at a time) scaled by the cell's area over the token's area, so a token covered by cells
of the same size shares its expected count among them. ``X`` holds ``log1p`` of that, the same
transform as every other map.

Cells whose centroid lies on no tile of the run (off tissue, outside a region) have no
prediction and are left out; ``uns['morphomol_cells']`` says how many.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from napari_morphomol.analysis.gene_maps import require_token_head, token_map_image
from napari_morphomol.analysis.run_explorer import RunExplorer
from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.errors import InputError
from napari_morphomol.models.trust import token_interval

CELL_UNITS = "log1p predicted counts per cell"
CELL_MASK = "masks/1"
"""The cell label image of ``cells.zarr.zip`` (``masks/0`` is the nuclei), in ``global`` px."""
COARSEST_LABEL_SIDE_PX = 2048
"""The cell view's label pyramid halves (nearest label) until its longer side is at most this."""
CELL_COLUMNS = ("cell_id", "x_centroid", "y_centroid", "cell_area")
METHOD = "token at the cell centroid, its expected count scaled by cell area / token area"


def read_xenium_cells(xenium_dir: str | Path) -> pd.DataFrame:
    """The segmented cells of a Xenium run (``cells.parquet``): id, centroid (um) and area (um^2).

    Parameters
    ----------
    xenium_dir
        The Xenium output folder of the run's sample.

    Returns
    -------
    pandas.DataFrame
        One row per cell, columns :data:`CELL_COLUMNS`, ``cell_id`` as strings.
    """
    path = Path(xenium_dir) / "cells.parquet"
    if not Path(xenium_dir).is_dir():
        raise InputError(f"the Xenium folder {Path(xenium_dir)} is not there (moved or renamed?); its cells are read "
                         "from it: move it back, or pass the cells table")
    if not path.is_file():
        raise InputError(f"{Path(xenium_dir)} has no cells.parquet: this run has no cell segmentation, so there is "
                         "no cell view; the tile and token maps work without it (segment the run with Xenium "
                         "Ranger to get cells)")
    cells = pd.read_parquet(path, columns=None)
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise InputError(f"{path} lacks the columns {missing} (it has {list(cells.columns)}); it is not a Xenium "
                         "cells table: re-export it from the instrument or Xenium Ranger")
    cells = cells[list(CELL_COLUMNS)].copy()
    cells["cell_id"] = cells["cell_id"].astype(str)
    return cells.reset_index(drop=True)


def cell_label_ids(xenium_dir: str | Path, cells: pd.DataFrame) -> np.ndarray:
    """The value of each cell (rows of ``cells``) in the cell label mask: ``label_id`` of
    ``cell_boundaries.parquet``, or row + 1 (Xenium's order) when the bundle has no boundaries."""
    path = Path(xenium_dir) / "cell_boundaries.parquet"
    if not path.is_file():
        return np.arange(1, len(cells) + 1, dtype=np.int64)
    labels = pd.read_parquet(path, columns=["cell_id", "label_id"]).drop_duplicates("cell_id")
    found = pd.Series(labels["label_id"].to_numpy(), index=labels["cell_id"].astype(str)).reindex(cells["cell_id"])
    if found.isna().any():
        raise InputError(f"{int(found.isna().sum())} cells of cells.parquet have no label in {path}; the two files "
                         "are not of one run")
    return found.to_numpy(dtype=np.int64)


def cell_label_levels(xenium_dir: str | Path) -> list:
    """The run's cell label mask (``cells.zarr.zip``, ``global`` px) as lazy dask levels, finest
    first, each halving the last by taking every second pixel (labels are never averaged)."""
    import dask.array as da
    import zarr
    from zarr.storage import ZipStore

    path = Path(xenium_dir) / "cells.zarr.zip"
    if not path.is_file():
        raise InputError(f"{Path(xenium_dir)} has no cells.zarr.zip: this run has no cell label mask, so there is no "
                         "cell view; the tile and token maps and the cells table work without it")
    try:
        mask = zarr.open_group(ZipStore(path, mode="r"), mode="r")[CELL_MASK]
    except (KeyError, OSError, ValueError) as exc:
        raise InputError(f"{path} holds no cell mask {CELL_MASK!r} ({type(exc).__name__}: {exc}); re-export the run "
                         "from the instrument or Xenium Ranger") from exc
    levels = [da.from_zarr(mask)]
    while max(levels[-1].shape) > COARSEST_LABEL_SIDE_PX:
        levels.append(levels[-1][::2, ::2])
    return levels


def measured_cell_counts(xenium_dir: str | Path, genes: list[str], cell_ids: pd.Index) -> np.ndarray | None:
    """(cells, genes) measured counts from the run's ``cell_feature_matrix.h5`` (cells in the order
    of ``cell_ids``), or None when the bundle has no matrix."""
    path = Path(xenium_dir) / "cell_feature_matrix.h5"
    if not path.is_file():
        return None
    import scanpy as sc

    matrix = sc.read_10x_h5(path, gex_only=False)
    matrix.var_names_make_unique()
    lacking = [g for g in genes if g not in matrix.var_names]
    if lacking:
        raise InputError(f"{path} has no counts of {len(lacking)} measured add-on genes (e.g. {lacking[:3]}); "
                         "the matrix is not this run's")
    rows = matrix.obs_names.get_indexer(cell_ids)
    if (rows < 0).any():
        raise InputError(f"{int((rows < 0).sum())} cells of cells.parquet are not in {path}; the two files are "
                         "not of one run")
    counts = matrix[rows, genes].X
    return np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float32)


def cell_tokens(explorer: RunExplorer, centroids_um: np.ndarray) -> np.ndarray:
    """Linear index (row * cols + col) of the token raster holding each (x, y) centroid, -1 where
    the centroid lies on no tile of the run."""
    grid = explorer.token_grid
    global_px = np.asarray(centroids_um, dtype=np.float64) / explorer.xenium_pixel_size_um
    he_px = apply_affine_xy(np.linalg.inv(grid.he_to_global), global_px)
    col = np.floor(he_px[:, 0] / grid.token_he_px).astype(np.int64)
    row = np.floor(he_px[:, 1] / grid.token_he_px).astype(np.int64)
    rows, cols = grid.shape
    inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
    index = np.where(inside, row * cols + col, -1)
    covered = np.zeros(len(index), dtype=bool)
    covered[inside] = grid.covered.ravel()[index[inside]]
    return np.where(covered, index, -1)


def cells_anndata(explorer: RunExplorer, cells: pd.DataFrame | None = None) -> ad.AnnData:
    """The run's add-on predictions per Xenium cell, as AnnData.

    Parameters
    ----------
    explorer
        A run of a model with the add-on token head (``explorer.has_token_maps``).
    cells
        The cells (:func:`read_xenium_cells`); by default those of the run's Xenium folder.

    Returns
    -------
    anndata.AnnData
        obs indexed by Xenium ``cell_id`` (with ``cell_area``, ``token`` and, from the run's
        bundle, ``label_id``: the cell's value in the cell label mask), obsm['spatial'] the
        centroids in um (x, y), X the predicted add-on expression (:data:`CELL_UNITS`),
        layers['measured'] log1p of the measured counts (NaN for genes the sample did not
        measure) and var['measured'], when the bundle has its cell-feature matrix. A calibrated
        run adds layers['predicted_lower'] / ['predicted_upper'] (the conformal interval on the
        cell's rate, with the card's cell-scale quantile, else the token scale's) and
        obs['out_of_distribution'] (the flag of the tile under the centroid).
    """
    results = explorer.results
    require_token_head(results, "cell view")
    xenium_dir = (results.metadata.get("sample") or {}).get("xenium_dir")
    if cells is None:
        if xenium_dir is None:
            raise InputError(f"the run in {results.path} records no Xenium folder, so there are no cells to map")
        cells = read_xenium_cells(xenium_dir)
    centroids = cells[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    tokens = cell_tokens(explorer, centroids)
    kept = tokens >= 0
    grid = explorer.token_grid
    token_log1p = token_map_image(results, "predicted").at_tokens(*np.divmod(tokens[kept], grid.shape[1]))
    he_pixel_size_um = float(results.metadata["geometry_args"]["he_pixel_size_um"])
    token_area_um2 = (grid.token_he_px * he_pixel_size_um) ** 2
    area = cells["cell_area"].to_numpy(dtype=np.float64)[kept]
    predicted = np.log1p(np.expm1(np.asarray(token_log1p, dtype=np.float64)) * (area / token_area_um2)[:, None])
    obs = pd.DataFrame({"cell_area": area, "token": tokens[kept]},
                       index=pd.Index(cells["cell_id"].to_numpy()[kept].astype(str), name="cell_id"))
    if xenium_dir is not None and Path(xenium_dir).is_dir():
        obs["label_id"] = cell_label_ids(xenium_dir, cells)[kept]
    adata = ad.AnnData(X=predicted.astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index(results.addon_genes, name="gene")))
    adata.obsm["spatial"] = centroids[kept]
    adata.var["measured"] = adata.var_names.isin(results.measured_genes)
    if results.measured_genes and xenium_dir is not None:
        counts = measured_cell_counts(xenium_dir, results.measured_genes, adata.obs_names)
        if counts is not None:
            measured = np.full(adata.shape, np.nan, dtype=np.float32)
            measured[:, adata.var["measured"].to_numpy()] = np.log1p(counts)
            adata.layers["measured"] = measured
    adata.uns["morphomol_cells"] = {"results": str(results.path), "method": METHOD, "units": CELL_UNITS,
                                    "n_cells": int(len(cells)), "n_cells_off_tiles": int((~kept).sum()),
                                    "token_area_um2": float(token_area_um2)}
    trust = results.trust
    quantile = None if trust is None else (trust.cell_quantile if trust.cell_quantile is not None
                                           else trust.token_quantile)
    if quantile is not None:
        adata.layers["predicted_lower"], adata.layers["predicted_upper"] = token_interval(predicted, quantile)
        adata.uns["morphomol_cells"]["interval_level"] = float(trust.level)
    if trust is not None and trust.has_flags:
        tile = explorer.tiles_at_um(centroids[kept])
        adata.obs["out_of_distribution"] = np.where(tile >= 0, trust.outlier_flag[np.maximum(tile, 0)], False)
    return adata
