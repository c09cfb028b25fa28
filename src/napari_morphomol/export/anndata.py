"""A prediction run as an AnnData: tiles are observations, add-on genes are variables.

Schema (docs/export.md): ``X`` predicted log1p expression; ``layers['measured']`` the measured
log1p counts on the same scale (NaN for add-on genes the sample did not measure); ``obs`` the
tile table; ``obsm['spatial']`` tile centres in ``global`` px; ``obsm['X_embedding']``; with
clusters ``obsm['X_pca']``, ``obsm['X_umap']``, ``obs['leiden_0.5']``, ``obs['leiden_1.0']`` and
their ``uns['leiden_*_colors']``; ``var`` per-gene metrics; ``uns`` the model card, the
registration and its landmarks. Everything is a plain h5ad type, so scanpy uses it as it is.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from anndata import AnnData

from napari_morphomol.export.registration import run_registration
from napari_morphomol.inference.store import Results
from napari_morphomol.models import per_gene_metrics

ANNDATA_FORMAT = "napari-morphomol.anndata/1"
PCA_COMPONENTS = 31
LEIDEN_RESOLUTIONS = (0.5, 1.0)
N_NEIGHBORS = 15


def results_to_anndata(results: Results, *, clusters: bool = True, random_state: int = 0) -> AnnData:
    """The run as an AnnData; ``clusters`` adds PCA, Leiden and UMAP of the tile embeddings."""
    tiles = results.tiles.reset_index(drop=True)
    obs = tiles.set_index(tiles["tile_id"].astype(str).rename("tile"))
    var = pd.DataFrame(index=pd.Index(results.addon_genes, name="gene"))
    var["measured"] = var.index.isin(results.measured_genes)
    adata = AnnData(X=np.asarray(results.predictions, dtype=np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = tiles[["global_x", "global_y"]].to_numpy(dtype=np.float64)
    adata.obsm["X_embedding"] = np.asarray(results.embeddings, dtype=np.float32)
    _add_measured(adata, results)
    adata.uns["morphomol"] = _run_summary(results)
    adata.uns["model_card"] = json.dumps(results.metadata["model_card"])
    _add_registration(adata, results.metadata)
    if clusters:
        add_clusters(adata, random_state=random_state)
    return adata


def _add_measured(adata: AnnData, results: Results) -> None:
    for metric in ("pearson", "spearman", "mse"):
        adata.var[metric] = np.nan
    if results.measured_counts is None:
        return
    columns = [results.addon_genes.index(g) for g in results.measured_genes]
    measured = np.full(adata.shape, np.nan, dtype=np.float32)
    measured[:, columns] = results.measured_log1p
    adata.layers["measured"] = measured
    if adata.n_obs >= 2:
        metrics = per_gene_metrics(adata.X[:, columns], results.measured_log1p, results.measured_genes)
        adata.var.loc[metrics.index, metrics.columns] = metrics.to_numpy()


def _run_summary(results: Results) -> dict:
    meta = results.metadata
    sample = meta.get("sample", {})
    return {
        "format": ANNDATA_FORMAT,
        "results_store": str(results.path),
        "run_id": str(meta.get("run_id", "")),
        "xenium_pixel_size_um": float(sample.get("xenium_pixel_size_um") or np.nan),
        "he_pixel_size_um": float(sample.get("he_pixel_size_um") or np.nan),
        "spatial_units": "global px (Xenium morphology pixels)",
        "run_metadata": json.dumps({k: v for k, v in meta.items() if k != "model_card"}),
    }


def _add_registration(adata: AnnData, metadata: dict) -> None:
    registration = run_registration(metadata)
    adata.uns["registration"] = {
        "direction": "he_px -> global_px",
        "model": registration.model,
        "he_to_global": registration.best_affine,
        "record": json.dumps(registration.record),
    }
    pairs = registration.landmarks
    if pairs is not None:
        adata.uns["landmarks"] = {
            "names": np.asarray(pairs.names, dtype=str),
            "active": np.asarray(pairs.active, dtype=bool),
            "he_px": np.asarray(pairs.he_px, dtype=np.float64),
            "global_px": np.asarray(pairs.global_px, dtype=np.float64),
        }


def add_clusters(adata: AnnData, *, random_state: int = 0) -> None:
    """PCA (31 components), Leiden at 0.5 and 1.0 and UMAP of ``obsm['X_embedding']``, as the paper.

    Fewer components and neighbours are used when there are fewer tiles than that (nothing below
    3 tiles); the numbers used are in ``uns['pca']`` and ``uns['neighbors_embedding']``.
    """
    import scanpy as sc
    from scanpy.plotting.palettes import default_20, default_102

    n_obs, dim = adata.obsm["X_embedding"].shape
    if n_obs < 3:
        return
    embedding = AnnData(X=np.asarray(adata.obsm["X_embedding"], dtype=np.float32), obs=pd.DataFrame(index=adata.obs_names))
    n_comps = min(PCA_COMPONENTS, n_obs - 1, dim - 1)
    sc.pp.pca(embedding, n_comps=n_comps, random_state=random_state)
    sc.pp.neighbors(embedding, n_neighbors=min(N_NEIGHBORS, n_obs - 1), use_rep="X_pca", random_state=random_state)
    for resolution in LEIDEN_RESOLUTIONS:
        key = f"leiden_{resolution}"
        sc.tl.leiden(embedding, resolution=resolution, key_added=key, flavor="igraph", n_iterations=2,
                     directed=False, random_state=random_state)
        adata.obs[key] = embedding.obs[key].to_numpy()
        adata.obs[key] = adata.obs[key].astype("category")
        n = len(adata.obs[key].cat.categories)
        palette = default_20 if n <= 20 else default_102 if n <= 102 else ["#808080"] * n
        adata.uns[f"{key}_colors"] = np.asarray(list(palette[:n]), dtype=str)
    sc.tl.umap(embedding, random_state=random_state)
    adata.obsm["X_pca"] = embedding.obsm["X_pca"]
    adata.obsm["X_umap"] = embedding.obsm["X_umap"]
    adata.uns["pca"] = {"variance_ratio": embedding.uns["pca"]["variance_ratio"], "n_comps": n_comps,
                        "n_comps_requested": PCA_COMPONENTS, "input": "X_embedding"}
    adata.uns["neighbors_embedding"] = {"n_neighbors": min(N_NEIGHBORS, n_obs - 1), "use_rep": "X_pca",
                                        "resolutions": np.asarray(LEIDEN_RESOLUTIONS)}
