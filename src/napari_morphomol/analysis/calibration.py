"""Calibrate a model on finished runs of held-out samples: what the user sees, scale by scale.

``train --calibration`` calibrates on tiles, before any run exists. A run of the model over a
held-out sample that measured the add-on panel holds more: the stitched token maps (each raster
token the mean of up to four tiles, as Explore shows it) and the sample's segmented cells.
:func:`calibrate_on_runs` scores those with the same definitions (``models.trust``):

- tile: ``|measured - predicted| / exp(log_variance / 2)`` per tile (a variance-head model);
- token: ``|counts - rate| / sqrt(rate + 0.5)`` per raster token on the tiles, the rate of the
  stitched token map;
- cell: the same per Xenium cell, the rate of the cell's token scaled by its area (a cell holds
  fewer transcripts than a token, so its counts are more discrete and it needs its own quantile);
- the outlier threshold: the 99 % quantile of the runs' tile scores (the model's reference stays).

A gene's quantile is replaced only where the runs measured it at least :data:`MIN_PREDICTIONS`
times; the card's quantile (or none) stays for the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from napari_morphomol.analysis.run_explorer import RunExplorer
from napari_morphomol.errors import InputError
from napari_morphomol.models.trust import (
    CALIBRATED_LEVELS,
    OUTLIER_LEVEL,
    Calibration,
    OutlierThreshold,
    ScaleCalibration,
    conformal_quantiles,
    count_scores,
    tile_scores,
)

MIN_PREDICTIONS = 20
"""Calibration predictions a gene needs at a scale before its quantile is taken from the runs."""
MAX_TOKENS = 200_000
"""Raster tokens scored per run at most (a random sample of the covered ones)."""


def _at_tokens(raster, rows: np.ndarray, cols: np.ndarray, band: int = 64) -> np.ndarray:
    """(n, genes) float64 values of a (rows, cols, genes) zarr raster at the given tokens, read a
    band of ``band`` rows at a time."""
    out = np.empty((len(rows), raster.shape[2]), dtype=np.float64)
    for r0 in range(0, int(rows.max(initial=-1)) + 1, band):
        members = np.flatnonzero((rows >= r0) & (rows < r0 + band))
        if len(members):
            block = np.asarray(raster[r0:r0 + band])
            out[members] = block[rows[members] - r0, cols[members]]
    return out


def run_scores(explorer: RunExplorer, seed: int = 0) -> dict[str, np.ndarray]:
    """Scale -> (predictions, add-on genes) calibration scores of one run, NaN where a gene was
    not measured; a scale the run's model cannot give is left out."""
    results = explorer.results
    genes = results.addon_genes
    measured_columns = [genes.index(g) for g in results.measured_genes]
    if not measured_columns:
        raise InputError(f"the run in {results.path} measured none of the model's add-on genes, so it cannot "
                         "calibrate it: calibrate on runs of samples that measured the add-on panel")
    out: dict[str, np.ndarray] = {}
    if "prediction_log_variance" in results.outputs:
        scores = np.full(results.predictions.shape, np.nan)
        scores[:, measured_columns] = tile_scores(results.measured_log1p, results.predictions[:, measured_columns],
                                                  results.output("prediction_log_variance")[:, measured_columns])
        out["tile"] = scores
    if explorer.has_token_maps:
        rows, cols = np.nonzero(explorer.token_grid.covered)
        if len(rows) > MAX_TOKENS:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_TOKENS, replace=False))
            rows, cols = rows[keep], cols[keep]
        rate = np.expm1(results.token_maps["predicted"].at_tokens(rows, cols).astype(np.float64))
        counts = _at_tokens(results.measured_token_counts, rows, cols)
        scores = np.full(rate.shape, np.nan)
        scores[:, measured_columns] = count_scores(counts, rate[:, measured_columns])
        out["token"] = scores
        if explorer.cell_view_refusal() is None and "measured" in explorer.cells.layers:
            cells = explorer.cells
            scores = np.full(cells.shape, np.nan)
            scores[:, measured_columns] = count_scores(np.expm1(cells.layers["measured"][:, measured_columns]),
                                                       np.expm1(np.asarray(cells.X[:, measured_columns],
                                                                           dtype=np.float64)))
            out["cell"] = scores
    return out


def _quantiles(scores: np.ndarray, previous: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(levels, genes) conformal quantiles of each gene's finite scores, the ``previous`` ones
    (or unbounded) for genes with fewer than MIN_PREDICTIONS; and the most predictions of a gene."""
    counts = np.isfinite(scores).sum(axis=0)
    quantiles = np.full((len(CALIBRATED_LEVELS), scores.shape[1]), np.inf) if previous is None else previous.copy()
    for gene in np.flatnonzero(counts >= MIN_PREDICTIONS):
        column = scores[:, gene]
        quantiles[:, gene] = conformal_quantiles(column[np.isfinite(column)][:, None])[:, 0]
    return quantiles, int(counts.max(initial=0))


def calibrate_on_runs(explorers: Sequence[RunExplorer], card, samples: Sequence[str]) -> Calibration:
    """The card's calibration made again from finished runs of its model over held-out samples.

    Parameters
    ----------
    explorers
        One :class:`RunExplorer` per run (``explore_run``), each of the card's model over a
        sample it was not trained on, which measured the add-on panel.
    card
        The model's card (its calibration, if any, is the fallback for genes the runs lack).
    samples
        The runs' sample names, recorded in the card.

    Returns
    -------
    Calibration
        Quantiles per gene for the tile, token and cell scales the runs give, and the outlier
        threshold from the runs' tiles (when the model has an outlier reference).
    """
    if not explorers:
        raise InputError("give at least one finished run of a held-out sample to calibrate on")
    for explorer in explorers:
        if explorer.results.route != card.model.default_route:
            raise InputError(f"the run in {explorer.results.path} gave the model {explorer.results.route} inputs "
                             f"only; calibrate on runs with every input it reads ({card.model.default_route}): the "
                             "image-only route keeps the calibration it had at training time")
    per_run = [run_scores(explorer) for explorer in explorers]
    old = card.calibration
    scales = {}
    for scale in ("tile", "token", "cell"):
        parts = [scores[scale] for scores in per_run if scale in scores]
        if not parts:
            continue
        previous = old.scales[scale].quantiles if old is not None and scale in old.scales else None
        quantiles, n = _quantiles(np.concatenate(parts), previous)
        scales[scale] = ScaleCalibration(quantiles, n)
    outliers = None
    if all("outlier_score" in explorer.results.outputs for explorer in explorers):
        tiles = np.concatenate([explorer.results.output("outlier_score")[:, 0] for explorer in explorers])
        outliers = OutlierThreshold(float(np.quantile(tiles, OUTLIER_LEVEL)), OUTLIER_LEVEL,
                                    old.outliers.n_training_tiles if old is not None and old.outliers else 0,
                                    card.model.outlier_reference_tokens)
    return dataclasses.replace(old or Calibration({}, None), scales=scales, outliers=outliers,
                               samples=tuple(samples), levels=CALIBRATED_LEVELS)
