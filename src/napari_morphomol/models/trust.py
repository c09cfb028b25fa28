"""Trust: calibrated intervals for every prediction, and a score of how unlike the training tissue a tile is.

Definitions (what a :class:`Calibration` in a model card means):

- *spread* ``sigma``: the model's own estimate of how far a prediction may be off. At the tile
  scale it is ``exp(log_variance / 2)`` of the variance head (log1p units); at the token scale it
  is the Poisson spread of the token head's rate, ``sqrt(rate + TOKEN_SPREAD_OFFSET)`` (counts).
- *score* of a held-out prediction: ``|measured - predicted| / sigma``, per gene.
- *split-conformal quantile* ``q`` of a gene at level ``1 - alpha``: the ``ceil((n + 1)(1 - alpha))``-th
  smallest of its ``n`` calibration scores. The interval ``predicted +- q * sigma`` then covers a
  new measurement with probability at least ``1 - alpha`` whenever the new tile is exchangeable
  with the calibration tiles (same tissue, same protocol), and is wider where ``sigma`` is.
- *outlier score* of a tile: the mean Euclidean distance of its standardised embedding to its
  ``neighbours`` nearest embeddings in the reference set (training tiles); a tile is *flagged*
  when the score is above ``threshold``, the ``threshold_level`` quantile of held-out
  in-distribution tiles' scores.

Invariant: intervals are only ever given at one of :data:`CALIBRATED_LEVELS`, the levels whose
quantiles the card holds; a card without a calibration gives no interval (never a zero width).

Entry points: :func:`fit_calibration` (at training time, on held-out samples),
:func:`tile_interval`, :func:`token_interval`, :func:`outlier_scores`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_morphomol.errors import InputError

CALIBRATED_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
"""Nominal coverages a card holds quantiles for; predict writes bounds at one of them."""
DEFAULT_LEVEL = 0.9
TOKEN_SPREAD_OFFSET = 0.5
"""Added to a token's rate under the square root of its spread, so tokens predicted empty still
have a spread (a count of 1 at rate 0 scores 1.4, not infinity)."""
OUTLIER_NEIGHBOURS = 10
OUTLIER_REFERENCE_TILES = 2048
"""At most this many training tiles' embeddings are kept in the card (2048 x 384 float32 = 3 MB for ViT-S)."""
OUTLIER_LEVEL = 0.99
"""Held-out in-distribution tiles flagged: about 1 - this fraction."""
SCALES = ("tile", "token")
SPREADS = {"tile": "variance head: exp(log_variance / 2), log1p units",
           "token": f"Poisson: sqrt(rate + {TOKEN_SPREAD_OFFSET}), counts"}
#: Names of the calibration's tensors in a checkpoint file (beside the model's weights).
TENSOR_PREFIX = "calibration."
_TENSORS = ("outlier_reference", "outlier_centre", "outlier_scale")


@dataclass(frozen=True)
class ScaleCalibration:
    """Conformal quantiles of one scale: ``quantiles[l, g]`` for level ``CALIBRATED_LEVELS[l]``, gene ``g``."""

    quantiles: np.ndarray
    n_calibration: int
    """Calibration predictions per gene (tiles, or tokens)."""


@dataclass(frozen=True)
class OutlierReference:
    """Standardised training embeddings and the threshold that flags a tile."""

    reference: np.ndarray
    """(K, E) float32: (embedding - centre) / scale of up to OUTLIER_REFERENCE_TILES training tiles."""
    centre: np.ndarray
    scale: np.ndarray
    neighbours: int
    threshold: float
    threshold_level: float
    n_training_tiles: int


@dataclass(frozen=True)
class Calibration:
    """What a card holds to put an interval on every prediction and a flag on every tile."""

    scales: Mapping[str, ScaleCalibration]
    outliers: OutlierReference | None
    samples: tuple[str, ...] = ()
    """The held-out samples it was calibrated on."""
    levels: tuple[float, ...] = CALIBRATED_LEVELS

    def quantile(self, scale: str, level: float) -> np.ndarray:
        """(genes,) conformal quantiles of ``scale`` at ``level`` (one of :data:`CALIBRATED_LEVELS`)."""
        if scale not in self.scales:
            raise InputError(f"The model is not calibrated at the {scale} scale (it has {', '.join(self.scales)}).")
        return self.scales[scale].quantiles[level_index(level, self.levels)]

    def to_card(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The card's JSON (quantiles as float64 lists, exact through JSON) and the tensors stored beside it."""
        values: dict[str, Any] = {
            "method": "split-conformal, scores |measured - predicted| / spread, per gene and scale",
            "levels": list(self.levels), "samples": list(self.samples),
            "scales": {name: {"spread": SPREADS[name], "n_calibration": int(scale.n_calibration),
                              "quantiles": [[None if math.isinf(q) else q for q in row]
                                            for row in np.asarray(scale.quantiles, dtype=np.float64).tolist()]}
                       for name, scale in self.scales.items()},
        }
        tensors: dict[str, np.ndarray] = {}
        if self.outliers is not None:
            o = self.outliers
            values["outliers"] = {"score": f"mean distance to the {o.neighbours} nearest standardised training "
                                           "embeddings", "neighbours": o.neighbours, "threshold": o.threshold,
                                  "threshold_level": o.threshold_level, "n_training_tiles": o.n_training_tiles,
                                  "n_reference": int(len(o.reference))}
            tensors = {TENSOR_PREFIX + "outlier_reference": o.reference, TENSOR_PREFIX + "outlier_centre": o.centre,
                       TENSOR_PREFIX + "outlier_scale": o.scale}
        return values, tensors

    @classmethod
    def from_card(cls, values: Any, tensors: Mapping[str, np.ndarray] | None, n_genes: int,
                  embedding_dim: int | None) -> Calibration:
        """Read a card's calibration (untrusted) and its tensors, checking every shape. Without
        ``tensors`` (a card copied into a results store) the outlier reference is left out."""
        if not isinstance(values, dict):
            raise InputError("Model card field 'calibration' must be a JSON object.")
        levels = values.get("levels")
        if not isinstance(levels, list) or not levels or not all(_is_number(v) and 0 < v < 1 for v in levels):
            raise InputError("Model card calibration.levels must be a list of coverages between 0 and 1.")
        scales = {}
        for name, scale in _dict(values.get("scales"), "calibration.scales").items():
            if name not in SCALES:
                raise InputError(f"Model card calibration scale {name!r} is unknown (known: {', '.join(SCALES)}).")
            scale = _dict(scale, f"calibration.scales.{name}")
            try:  # null: too few calibration predictions for that level, an unbounded interval
                rows = scale.get("quantiles")
                quantiles = np.asarray([[np.inf if q is None else q for q in row] for row in rows], dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise InputError(f"Model card calibration.scales.{name}.quantiles is not a table of "
                                 "numbers.") from error
            if quantiles.shape != (len(levels), n_genes) or not (quantiles >= 0).all():
                raise InputError(f"Model card calibration.scales.{name}.quantiles must be {len(levels)} levels x "
                                 f"{n_genes} add-on genes of non-negative numbers, got shape {quantiles.shape}.")
            scales[name] = ScaleCalibration(quantiles, int(scale.get("n_calibration", 0)))
        outliers = None
        if "outliers" in values and tensors is not None:
            o = _dict(values["outliers"], "calibration.outliers")
            found = {name: tensors.get(TENSOR_PREFIX + name) for name in _TENSORS}
            if any(t is None for t in found.values()):
                raise InputError("The model card has an outlier reference but the checkpoint lacks its tensors "
                                 f"({', '.join(TENSOR_PREFIX + n for n in _TENSORS)}).")
            reference = np.asarray(found["outlier_reference"], dtype=np.float32)
            if (reference.ndim != 2 or reference.shape[1] != embedding_dim or len(reference) < o.get("neighbours", 0)
                    or found["outlier_centre"].shape != (embedding_dim,)
                    or found["outlier_scale"].shape != (embedding_dim,)):
                raise InputError(f"The checkpoint's outlier reference {reference.shape} does not fit the model's "
                                 f"{embedding_dim}-wide tile embedding.")
            if not all(_is_number(o.get(key)) for key in ("threshold", "threshold_level")) or not (
                    isinstance(o.get("neighbours"), int) and o["neighbours"] >= 1):
                raise InputError("Model card calibration.outliers needs a numeric threshold, threshold_level and a "
                                 "positive integer neighbours.")
            outliers = OutlierReference(reference, np.asarray(found["outlier_centre"], np.float32),
                                        np.asarray(found["outlier_scale"], np.float32), o["neighbours"],
                                        float(o["threshold"]), float(o["threshold_level"]),
                                        int(o.get("n_training_tiles", len(reference))))
        samples = values.get("samples", [])
        return cls(scales, outliers, tuple(str(s) for s in samples), tuple(float(v) for v in levels))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"Model card field {what!r} must be a JSON object.")
    return value


def level_index(level: float, levels: tuple[float, ...] = CALIBRATED_LEVELS) -> int:
    """Index of ``level`` among the calibrated levels; an InputError naming them otherwise."""
    for index, known in enumerate(levels):
        if abs(known - float(level)) < 1e-9:
            return index
    raise InputError(f"Intervals are calibrated at levels {', '.join(f'{v:g}' for v in levels)}; "
                     f"{level!r} is not one of them. Pick one of those.")


def conformal_quantiles(scores: np.ndarray, levels: tuple[float, ...] = CALIBRATED_LEVELS) -> np.ndarray:
    """(levels, genes) split-conformal quantiles of ``scores`` (n, genes): the ceil((n + 1) level)-th
    smallest score per gene (infinite when n is too small for the level)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64), axis=0)
    n = len(scores)
    out = np.full((len(levels), scores.shape[1]), np.inf)
    for i, level in enumerate(levels):
        rank = math.ceil((n + 1) * level)
        if rank <= n:
            out[i] = scores[rank - 1]
    return out


def tile_spread(log_variance: np.ndarray) -> np.ndarray:
    """The variance head's standard deviation, log1p units."""
    return np.exp(0.5 * np.clip(np.asarray(log_variance, dtype=np.float64), -14.0, 3.0))


def token_spread(rate: np.ndarray) -> np.ndarray:
    """The Poisson spread of a count at ``rate`` (with the offset of :data:`TOKEN_SPREAD_OFFSET`)."""
    return np.sqrt(np.asarray(rate, dtype=np.float64) + TOKEN_SPREAD_OFFSET)


def tile_interval(predictions: np.ndarray, log_variance: np.ndarray, quantile: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) log1p bounds of tile predictions: ``predictions +- quantile * spread``, the
    lower bound no less than 0 (no count is negative)."""
    half = np.asarray(quantile)[None, :] * tile_spread(log_variance)
    predictions = np.asarray(predictions, dtype=np.float64)
    return np.maximum(predictions - half, 0.0).astype(np.float32), (predictions + half).astype(np.float32)


def token_interval(predicted_log1p: np.ndarray, quantile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) log1p bounds of token (or cell) predictions given as log1p of the rate, with
    the genes on the last axis: ``rate +- quantile * sqrt(rate + offset)`` in counts."""
    rate = np.expm1(np.asarray(predicted_log1p, dtype=np.float64))
    half = np.asarray(quantile) * token_spread(rate)
    return (np.log1p(np.maximum(rate - half, 0.0)).astype(np.float32),
            np.log1p(rate + half).astype(np.float32))


def outlier_scores(embeddings: np.ndarray, outliers: OutlierReference, batch: int = 4096) -> np.ndarray:
    """(tiles,) mean distance of each standardised embedding to its nearest reference embeddings."""
    reference = outliers.reference.astype(np.float64)
    reference_sq = (reference**2).sum(axis=1)
    n = embeddings.shape[0]  # a numpy or a zarr array
    scores = np.empty(n, dtype=np.float64)
    k = min(outliers.neighbours, len(reference))
    for start in range(0, n, batch):
        x = (np.asarray(embeddings[start:start + batch], dtype=np.float64) - outliers.centre) / outliers.scale
        squared = np.maximum((x**2).sum(axis=1)[:, None] + reference_sq[None, :] - 2.0 * x @ reference.T, 0.0)
        nearest = np.partition(squared, k - 1, axis=1)[:, :k]
        scores[start:start + batch] = np.sqrt(nearest).mean(axis=1)
    return scores.astype(np.float32)


def outlier_reference(training_embeddings: np.ndarray, *, seed: int = 0,
                      size: int = OUTLIER_REFERENCE_TILES, neighbours: int = OUTLIER_NEIGHBOURS) -> OutlierReference:
    """The reference set of a model: up to ``size`` training embeddings, standardised, no threshold yet."""
    embeddings = np.asarray(training_embeddings, dtype=np.float64)
    if len(embeddings) <= neighbours:
        raise InputError(f"An outlier reference needs more than {neighbours} training tiles, got {len(embeddings)}.")
    centre = embeddings.mean(axis=0)
    scale = np.maximum(embeddings.std(axis=0), 1e-6)
    keep = np.sort(np.random.default_rng(seed).permutation(len(embeddings))[:size])
    reference = ((embeddings[keep] - centre) / scale).astype(np.float32)
    return OutlierReference(reference, centre.astype(np.float32), scale.astype(np.float32), neighbours,
                            float("inf"), OUTLIER_LEVEL, len(embeddings))


def with_threshold(outliers: OutlierReference, held_out_embeddings: np.ndarray,
                   level: float = OUTLIER_LEVEL) -> OutlierReference:
    """The reference with its threshold set at the ``level`` quantile of held-out in-distribution tiles."""
    scores = outlier_scores(held_out_embeddings, outliers)
    return dataclasses.replace(outliers, threshold=float(np.quantile(scores, level)), threshold_level=float(level))


def fit_calibration(model, calibration_dataset, training_dataset, *, samples: tuple[str, ...] = (),
                    batch_size: int = 64, device: str = "cpu", seed: int = 0) -> Calibration:
    """Calibrate a trained model on held-out samples (at training time).

    Parameters
    ----------
    model
        A trained model with a variance head (tile intervals) and/or the add-on token head (token intervals).
    calibration_dataset
        Tiles of samples the model was not trained on (validation or a separate split).
    training_dataset
        The training tiles: their embeddings make the outlier reference.
    samples
        The calibration samples' names, recorded in the card.
    batch_size, device, seed
        How the model runs, and the seed of the reference subsample.

    Returns
    -------
    Calibration
        Per-gene conformal quantiles at every calibrated level for the tile and token scales the
        model has, and the outlier reference with its threshold.
    """
    from napari_morphomol.models.training import model_outputs  # torch stays out of card reading

    tile_scores, token_scores, embeddings = [], [], []
    rng = np.random.default_rng(seed)
    for batch, output in model_outputs(model, calibration_dataset, batch_size=batch_size, device=device):
        embeddings.append(output["embeddings"])
        if "prediction_log_variance" in output:
            residual = np.abs(batch["target"].numpy() - output["predictions"])
            tile_scores.append(residual / tile_spread(output["prediction_log_variance"]))
        if "token_rate" in output:
            rate, counts = output["token_rate"], batch["token_target"].numpy()
            scores = (np.abs(counts - rate) / token_spread(rate)).reshape(-1, rate.shape[-1])
            token_scores.append(scores[rng.random(len(scores)) < 0.25])  # a quarter of the tokens is plenty
    scales = {}
    if tile_scores:
        scores = np.concatenate(tile_scores)
        scales["tile"] = ScaleCalibration(conformal_quantiles(scores), len(scores))
    if token_scores:
        scores = np.concatenate(token_scores)
        scales["token"] = ScaleCalibration(conformal_quantiles(scores), len(scores))
    training_embeddings = np.concatenate(
        [output["embeddings"] for _, output in model_outputs(model, training_dataset, batch_size=batch_size,
                                                            device=device)])
    outliers = with_threshold(outlier_reference(training_embeddings, seed=seed), np.concatenate(embeddings))
    return Calibration(scales, outliers, tuple(samples))
