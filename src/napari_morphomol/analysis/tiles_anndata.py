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


COVERAGE = "coverage"
"""The metrics column of a calibrated run: the fraction of tiles whose measured value lies in its interval."""


def gene_metrics(results: Results) -> pd.DataFrame:
    """Spearman, Pearson and MSE of predicted vs measured log1p over tiles, one row per measured gene,
    and for a run with tile intervals their empirical coverage (column :data:`COVERAGE`)."""
    trust = results.trust
    names = list(METRICS) + ([COVERAGE] if trust is not None and trust.has_intervals else [])
    if results.measured_log1p is None or len(results.tiles) < 2:
        return pd.DataFrame(columns=names, index=pd.Index([], name="gene"), dtype=float)
    columns = [results.addon_genes.index(gene) for gene in results.measured_genes]
    predicted = results.predictions[:, columns]
    done = np.isfinite(predicted).all(axis=1)  # a run still writing has NaN rows
    if done.sum() < 2:
        return pd.DataFrame(columns=names, index=pd.Index([], name="gene"), dtype=float)
    measured = results.measured_log1p[done]
    metrics = per_gene_metrics(predicted[done], measured, results.measured_genes)
    if COVERAGE in names:
        lower, upper = trust.lower[done][:, columns], trust.upper[done][:, columns]
        metrics[COVERAGE] = ((measured >= lower) & (measured <= upper)).mean(axis=0)
    return metrics


def trust_uns(results: Results) -> dict:
    """What a run's AnnData keeps of its trust in ``uns['morphomol_trust']``: the level, the
    outlier threshold, the calibration samples and the model card's conformal quantiles (scale ->
    (levels, genes), infinite where too few calibration predictions bound a level)."""
    from napari_morphomol.models.trust import Calibration

    trust = results.trust
    calibration = (results.metadata.get("model_card") or {}).get("calibration")
    if trust is None or trust.unavailable or calibration is None:
        return {}
    card = Calibration.from_card(calibration, len(results.addon_genes))
    out = {"level": float(trust.level), "levels": np.asarray(card.levels), "samples": list(card.samples),
           "method": calibration.get("method", ""),
           **{f"{scale}_quantiles": np.asarray(values.quantiles) for scale, values in card.scales.items()}}
    if trust.threshold is not None:
        out["outlier_threshold"] = float(trust.threshold)
    return out


def tiles_anndata(results: Results) -> ad.AnnData:
    """Tiles x predicted add-on genes (log1p), with the tile table, positions, embeddings and measurements.

    obs = the tile table (index: tile_id as text); X = predictions; layers['measured'] (NaN where a
    gene was not measured) when the sample measured add-on genes; obsm['spatial'] = tile centres in
    ``global`` px (x, y); obsm['X_embedding'] = the model's tile embeddings; var['measured'] and the
    per-gene metrics (NaN for unmeasured genes). A calibrated run adds layers['predicted_lower'] and
    ['predicted_upper'] (the interval bounds, log1p), obs['outlier_score'] and
    obs['out_of_distribution'], and uns['morphomol_trust'] (:func:`trust_uns`).
    """
    obs = results.tiles.copy()
    obs.index = pd.Index(obs["tile_id"].astype(str).to_numpy(), name="tile")
    var = pd.DataFrame(index=pd.Index(list(results.addon_genes), name="gene"))
    var["measured"] = var.index.isin(results.measured_genes)
    metrics = gene_metrics(results)
    for name in metrics.columns:
        var[name] = metrics[name].reindex(var.index).astype(float) if len(metrics) else np.nan
    adata = ad.AnnData(X=np.asarray(results.predictions, dtype=np.float32), obs=obs, var=var)
    measured = measured_matrix(results)
    if measured is not None:
        adata.layers["measured"] = measured
    adata.obsm["spatial"] = obs[["global_x", "global_y"]].to_numpy(dtype=np.float64)
    adata.obsm["X_embedding"] = np.asarray(results.embeddings, dtype=np.float32)
    trust = results.trust
    if trust is not None and trust.has_intervals:
        adata.layers["predicted_lower"], adata.layers["predicted_upper"] = trust.lower, trust.upper
    if trust is not None and trust.has_flags:
        adata.obs["outlier_score"] = trust.outlier_score
        adata.obs["out_of_distribution"] = trust.outlier_flag
    uns = trust_uns(results)
    if uns:
        adata.uns["morphomol_trust"] = uns
    return adata
