"""Per-gene metrics of predicted vs measured log1p add-on expression, and the variant table.

As in the paper: Pearson, Spearman and MSE per gene over tiles, then averaged over genes.
A gene that is constant over the evaluated tiles has no correlation (NaN) and is left out of
the correlation means, so say how many genes each mean covers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from napari_morphomol._atomic import guard_output_folder, text_file_kind, write_text_atomic
from napari_morphomol.errors import InputError

METRICS = ("spearman", "pearson", "mse")


def per_gene_metrics(predictions: np.ndarray, targets: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """One row per gene: pearson, spearman, mse over tiles (predictions, targets: tiles x genes)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if predictions.shape != targets.shape or predictions.ndim != 2 or predictions.shape[1] != len(genes):
        raise InputError(
            f"Predictions {predictions.shape} and targets {targets.shape} must both be (tiles, {len(genes)} genes)."
        )
    if predictions.shape[0] < 2:
        raise InputError("Correlations need at least 2 tiles.")
    frame = pd.DataFrame(
        {
            "pearson": _column_correlation(predictions, targets),
            "spearman": _column_correlation(rankdata(predictions, axis=0), rankdata(targets, axis=0)),
            "mse": ((predictions - targets) ** 2).mean(axis=0),
        },
        index=pd.Index(list(genes), name="gene"),
    )
    return frame[list(METRICS)]


def _column_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denominator = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=0) / denominator, np.nan)


def mean_metrics(gene_metrics: pd.DataFrame) -> dict[str, float]:
    """Means over genes (NaN correlations of constant genes skipped) and how many genes count."""
    means = {
        name: float(np.nanmean(gene_metrics[name])) if gene_metrics[name].notna().any() else float("nan")
        for name in METRICS
    }
    means["n_genes"] = int(len(gene_metrics))
    means["n_genes_correlated"] = int(gene_metrics["pearson"].notna().sum())
    return means


def variant_table(results: Mapping[str, pd.DataFrame | Sequence[pd.DataFrame]]) -> pd.DataFrame:
    """Table A.1 shape: one row per variant, mean and sd of each metric's gene mean over runs.

    ``results`` maps a variant name to its per-gene metrics, or to a list of them (one per
    fold or seed); sd is NaN with a single run.
    """
    rows = {}
    for variant, runs in results.items():
        runs = [runs] if isinstance(runs, pd.DataFrame) else list(runs)
        if not runs:
            raise InputError(f"Variant {variant!r} has no results.")
        means = pd.DataFrame([mean_metrics(run) for run in runs])
        row = {}
        for name in METRICS:
            row[f"{name}_mean"] = float(means[name].mean())
            row[f"{name}_sd"] = float(means[name].std(ddof=1)) if len(runs) > 1 else float("nan")
        row["n_runs"] = len(runs)
        row["n_genes"] = int(means["n_genes"].iloc[0])
        rows[variant] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("variant")


def table_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """Markdown with 'mean ± sd' cells, higher-is-better correlations first, as in the paper."""
    lines = [_MARKDOWN_HEADER, "|---|---|---|---|---|---|"]
    for variant, row in table.iterrows():
        cells = []
        for name in METRICS:
            mean, sd = row[f"{name}_mean"], row[f"{name}_sd"]
            cells.append(f"{mean:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}"))
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {int(row['n_runs'])} | {int(row['n_genes'])} |")
    return "\n".join(lines) + "\n"


_MARKDOWN_HEADER = "| Variant | Spearman ↑ | Pearson ↑ | MSE ↓ | runs | genes |"
VARIANT_TABLE_CSV = text_file_kind("variant table (CSV)", lambda text: text.startswith("variant,spearman_mean,"))
VARIANT_TABLE_MARKDOWN = text_file_kind("variant table (Markdown)", lambda text: text.startswith(_MARKDOWN_HEADER))
GENE_TABLE_CSV = text_file_kind("per-gene metrics table", lambda text: text.startswith("checkpoint,variant,"))


def write_variant_table(table: pd.DataFrame, path_stem: str | Path, *, overwrite: bool = False,
                        inputs=()) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` atomically.

    Parameters
    ----------
    table
        From :func:`variant_table`.
    path_stem
        Path without suffix; its folder is made when missing.
    overwrite
        Replace earlier tables of ours (never other files).
    inputs
        Paths the tables may not replace or lie inside (checkpoints, data).

    Returns
    -------
    tuple of Path
        The CSV and Markdown paths.
    """
    stem = Path(path_stem)
    guard_output_folder(stem.parent, inputs=inputs).mkdir(parents=True, exist_ok=True)
    csv_path, markdown_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    write_text_atomic(csv_path, table.to_csv(), VARIANT_TABLE_CSV, inputs=inputs, overwrite=overwrite)
    write_text_atomic(markdown_path, table_markdown(table), VARIANT_TABLE_MARKDOWN, inputs=inputs, overwrite=overwrite)
    return csv_path, markdown_path
