"""Tiles as AnnData and the paper's PCA / Leiden / UMAP on tile embeddings."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_morphomol.analysis import add_clusters, cluster_colors, leiden_key, tiles_anndata
from napari_morphomol.errors import InputError
from napari_morphomol.inference import open_results


def blobs_anndata(n_per_blob=40, n_blobs=3, dim=48, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(n_blobs, dim))
    embedding = np.concatenate([c + rng.normal(size=(n_per_blob, dim)) for c in centres]).astype(np.float32)
    adata = ad.AnnData(X=np.zeros((len(embedding), 2), np.float32))
    adata.obsm["X_embedding"] = embedding
    adata.obs["blob"] = np.repeat(np.arange(n_blobs), n_per_blob)
    return adata


def test_tiles_anndata_holds_the_run(results_store):
    results = open_results(results_store)
    adata = tiles_anndata(results)
    assert adata.shape == results.predictions.shape
    assert list(adata.var_names) == results.addon_genes
    assert list(adata.obs_names) == [str(t) for t in results.tiles["tile_id"]]
    np.testing.assert_array_equal(adata.X, results.predictions)
    np.testing.assert_array_equal(adata.obsm["X_embedding"], results.embeddings)
    np.testing.assert_array_equal(adata.obsm["spatial"], results.tiles[["global_x", "global_y"]].to_numpy())
    assert results.measured_genes, "the synthetic sample measures its add-on genes"
    gene = results.measured_genes[0]
    column = results.addon_genes.index(gene)
    np.testing.assert_allclose(adata.layers["measured"][:, column], np.log1p(results.measured_counts[:, 0]), rtol=1e-6)
    assert adata.var.loc[gene, "measured"]
    assert np.isfinite(adata.var.loc[gene, ["spearman", "pearson", "mse"]].to_numpy(float)).all()


def test_add_clusters_recovers_separated_blobs():
    adata = add_clusters(blobs_anndata(), resolutions=(0.5, 1.0), n_pcs=31, seed=0)
    assert adata.obsm["X_pca"].shape == (120, 31)
    assert adata.obsm["X_umap"].shape == (120, 2)
    for resolution in (0.5, 1.0):
        key = leiden_key(resolution)
        assert isinstance(adata.obs[key].dtype, pd.CategoricalDtype)
        assert len(adata.uns[f"{key}_colors"]) == len(adata.obs[key].cat.categories)
    table = pd.crosstab(adata.obs["blob"], adata.obs["leiden_0.5"])
    assert ((table > 0).sum(axis=1) == 1).all(), f"each blob must be one cluster:\n{table}"
    assert ((table > 0).sum(axis=0) == 1).all(), f"no cluster may mix blobs:\n{table}"


def test_add_clusters_is_reproducible_and_user_resolutions():
    first = add_clusters(blobs_anndata(), resolutions=(0.3,), seed=3)
    second = add_clusters(blobs_anndata(), resolutions=(0.3,), seed=3)
    assert "leiden_0.3" in first.obs and "leiden_0.5" not in first.obs
    np.testing.assert_array_equal(first.obs["leiden_0.3"].to_numpy(), second.obs["leiden_0.3"].to_numpy())
    np.testing.assert_allclose(first.obsm["X_umap"], second.obsm["X_umap"])


def test_add_clusters_caps_components_for_few_tiles():
    adata = add_clusters(blobs_anndata(n_per_blob=5, dim=8), n_pcs=31)
    assert adata.obsm["X_pca"].shape[1] == 7
    assert adata.uns["morphomol_clusters"]["n_pcs"] == 7


@pytest.mark.parametrize("kwargs", [{"resolutions": ()}, {"resolutions": (0.0,)}, {"resolutions": (-1.0,)},
                                    {"n_pcs": 1}])
def test_add_clusters_refuses_bad_settings(kwargs):
    with pytest.raises(InputError):
        add_clusters(blobs_anndata(), **kwargs)


def test_add_clusters_refuses_too_few_tiles_and_nan():
    with pytest.raises(InputError, match="at least"):
        add_clusters(blobs_anndata(n_per_blob=1))
    adata = blobs_anndata()
    adata.obsm["X_embedding"][0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        add_clusters(adata)


def test_cluster_colors_are_distinct_hex():
    for n in (1, 20, 25, 150):
        colors = cluster_colors(n)
        assert len(colors) == n and all(c.startswith("#") for c in colors)
    assert len(set(cluster_colors(102))) == 102


def test_add_clusters_on_a_large_run_uses_exact_neighbours():
    """Above 8,192 tiles scanpy would switch to pynndescent (and its graph type); ours stays exact."""
    adata = add_clusters(blobs_anndata(n_per_blob=2731, dim=16), resolutions=(0.5,))
    assert adata.n_obs > 8192 and adata.uns["morphomol_clusters"]["neighbours"] == "exact (scikit-learn)"
    table = pd.crosstab(adata.obs["blob"], adata.obs["leiden_0.5"])
    assert ((table > 0).sum(axis=0) == 1).all(), f"no cluster may mix blobs:\n{table}"
