"""A prediction run as AnnData: one observation per tile (no Qt)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from napari_morphomol.inference import Results
from napari_morphomol.models.metrics import METRICS, per_gene_metrics


def measured_matrix(results: Results) -> np.ndarray | None:
    """Measured log1p counts as (tiles, add-on genes), NaN for the add-on genes the sample did not measure."""
    measured = results.measured_log1p
    if measured is None:
        return None
    full = np.full(results.predictions.shape, np.nan, dtype=np.float32)
    columns = [results.addon_genes.index(gene) for gene in results.measured_genes]
    full[:, columns] = measured
    return full


def gene_metrics(results: Results) -> pd.DataFrame:
    """Spearman, Pearson and MSE of predicted vs measured log1p over tiles, one row per measured gene."""
    if results.measured_log1p is None or len(results.tiles) < 2:
        return pd.DataFrame(columns=list(METRICS), index=pd.Index([], name="gene"), dtype=float)
    columns = [results.addon_genes.index(gene) for gene in results.measured_genes]
    predicted = results.predictions[:, columns]
    done = np.isfinite(predicted).all(axis=1)  # a run still writing has NaN rows
    if done.sum() < 2:
        return pd.DataFrame(columns=list(METRICS), index=pd.Index([], name="gene"), dtype=float)
    return per_gene_metrics(predicted[done], results.measured_log1p[done], results.measured_genes)


def tiles_anndata(results: Results) -> ad.AnnData:
    """Tiles x predicted add-on genes (log1p), with the tile table, positions, embeddings and measurements.

    obs = the tile table (index: tile_id as text); X = predictions; layers['measured'] (NaN where a
    gene was not measured) when the sample measured add-on genes; obsm['spatial'] = tile centres in
    ``global`` px (x, y); obsm['X_embedding'] = the model's tile embeddings; var['measured'] and the
    per-gene metrics (NaN for unmeasured genes).
    """
    obs = results.tiles.copy()
    obs.index = pd.Index(obs["tile_id"].astype(str).to_numpy(), name="tile")
    var = pd.DataFrame(index=pd.Index(list(results.addon_genes), name="gene"))
    var["measured"] = var.index.isin(results.measured_genes)
    metrics = gene_metrics(results)
    for name in METRICS:
        var[name] = metrics[name].reindex(var.index).astype(float) if len(metrics) else np.nan
    adata = ad.AnnData(X=np.asarray(results.predictions, dtype=np.float32), obs=obs, var=var)
    measured = measured_matrix(results)
    if measured is not None:
        adata.layers["measured"] = measured
    adata.obsm["spatial"] = obs[["global_x", "global_y"]].to_numpy(dtype=np.float64)
    adata.obsm["X_embedding"] = np.asarray(results.embeddings, dtype=np.float32)
    return adata
