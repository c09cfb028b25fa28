"""PCA, neighbour graph, Leiden clusters and UMAP of tile embeddings with scanpy (no Qt)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np

from napari_morphomol.errors import InputError

PAPER_N_PCS = 31
PAPER_RESOLUTIONS = (0.5, 1.0)
MIN_TILES = 4
"""Fewer tiles give no neighbour graph worth clustering."""
NEIGHBOURS = "exact (scikit-learn)"
"""How the neighbour graph is found, at every run size. Exact neighbours of 31 PCs cost 1.6 s for
25,000 tiles and 8.8 s for 60,000 here; pynndescent (scanpy's choice from 8,192 tiles on) spends
about 40 s compiling with numba in every new process before its first graph, so exact is faster
up to beyond any Xenium slide (a 2.9 cm^2 slide is about 16,000 tiles at stride 128 um)."""


def leiden_key(resolution: float) -> str:
    """obs column of the Leiden clusters at ``resolution``: 'leiden_0.5', 'leiden_1.0'."""
    return f"leiden_{float(resolution)}"


def cluster_colors(n_clusters: int) -> list[str]:
    """Hex colours for clusters 0..n-1: scanpy's own categorical palettes, so plots match."""
    from scanpy.plotting import palettes

    for palette in (palettes.default_20, palettes.default_28, palettes.default_102):
        if n_clusters <= len(palette):
            return [str(c) for c in palette[:n_clusters]]
    return [str(palettes.default_102[i % len(palettes.default_102)]) for i in range(n_clusters)]


def add_clusters(adata: ad.AnnData, resolutions: Sequence[float] = PAPER_RESOLUTIONS, n_pcs: int = PAPER_N_PCS,
                 seed: int = 0) -> ad.AnnData:
    """PCA of obsm['X_embedding'] (or X), neighbours, Leiden per resolution and UMAP, as the paper does.

    Adds obsm['X_pca'] (at most ``n_pcs`` components; fewer when there are fewer tiles or embedding
    dimensions), obsm['X_umap'], obs['leiden_<r>'] (categorical) with uns['leiden_<r>_colors'], and
    uns['morphomol_clusters'] (what was run). X is not changed. Returns ``adata`` itself.
    """
    import scanpy as sc

    resolutions = [float(r) for r in resolutions]
    if not resolutions or any(not np.isfinite(r) or r <= 0 for r in resolutions):
        raise InputError(
            f"Leiden resolutions must be positive numbers, got {list(resolutions)}; the paper uses 0.5 and 1.0"
        )
    if n_pcs < 2:
        raise InputError(f"n_pcs must be at least 2, got {n_pcs}; the paper uses {PAPER_N_PCS}")
    if adata.n_obs < MIN_TILES:
        raise InputError(f"clustering needs at least {MIN_TILES} tiles, got {adata.n_obs}; predict a larger region")
    features = np.asarray(adata.obsm["X_embedding"] if "X_embedding" in adata.obsm else adata.X, dtype=np.float32)
    if not np.isfinite(features).all():
        raise InputError("the embeddings hold NaN or infinite values; the prediction run is incomplete or broken")
    work = ad.AnnData(X=features)
    n_comps = int(min(n_pcs, features.shape[0] - 1, features.shape[1] - 1))
    sc.pp.pca(
        work, n_comps=n_comps, random_state=seed, svd_solver="arpack" if n_comps < min(features.shape) - 1 else "full"
    )
    n_neighbors = int(min(15, adata.n_obs - 1))
    sc.pp.neighbors(work, n_neighbors=n_neighbors, use_rep="X_pca", random_state=seed, transformer="sklearn")
    for resolution in resolutions:
        key = leiden_key(resolution)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sc.tl.leiden(work, resolution=resolution, key_added=key, random_state=seed, flavor="igraph",
                         n_iterations=2, directed=False)
        labels = work.obs[key]
        adata.obs[key] = labels.to_numpy()
        adata.obs[key] = adata.obs[key].astype("category")
        adata.uns[f"{key}_colors"] = cluster_colors(len(adata.obs[key].cat.categories))
    sc.tl.umap(work, random_state=seed)
    adata.obsm["X_pca"] = work.obsm["X_pca"].astype(np.float32)
    adata.obsm["X_umap"] = work.obsm["X_umap"].astype(np.float32)
    adata.uns["morphomol_clusters"] = {
        "representation": "X_embedding" if "X_embedding" in adata.obsm else "X",
        "n_pcs": n_comps, "n_pcs_requested": int(n_pcs), "n_neighbors": n_neighbors, "neighbours": NEIGHBOURS,
        "resolutions": resolutions, "seed": int(seed),
        "pca_variance_ratio": work.uns["pca"]["variance_ratio"].astype(float).tolist(),
    }
    return adata
