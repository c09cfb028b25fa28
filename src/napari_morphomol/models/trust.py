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
- *outlier score* of a tile (``ModelOutput.outlier_score`` of a calibrated model,
  :func:`~napari_morphomol.models.fusion.token_outlier_score`): each of its tokens' outlier
  features (the token feature and the patch embedding, ``FusionModel.outlier_features``),
  standardised, at its mean distance to the nearest tokens of the model's reference set (those
  of training tiles, kept in the checkpoint), and the 90th percentile of those over the tile.
  A tile is *flagged* when its score is above ``threshold``, the ``threshold_level`` quantile of
  held-out in-distribution tiles' scores.

A calibration holds for the route (``models.config.ROUTES``) it was made on: the model's default
(every input it reads), and for a model trained with modality dropout the image-only route too
(``Calibration.routes['image']``: its own quantiles, its own outlier reference and threshold).

Invariant: intervals are only ever given at one of :data:`CALIBRATED_LEVELS`, the levels whose
quantiles the card holds, and only for a route calibrated as such; a card without a calibration
gives no interval (never a zero width).

Entry points: :func:`fit_calibration` (at training time, on held-out samples),
:func:`tile_interval`, :func:`token_interval`; the outlier score is the model's own output.
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
OUTLIER_REFERENCE_TOKENS = 8192
OUTLIER_REFERENCE_BYTES = 4 << 20
"""The reference keeps up to OUTLIER_REFERENCE_TOKENS training tokens' outlier features, and no
more than 4 MB of them (1,365 tokens of ViT-S's 384 + 384 float32)."""
OUTLIER_LEVEL = 0.99
"""Held-out in-distribution tiles flagged: about 1 - this fraction."""
SCALES = ("tile", "token", "cell")
SPREADS = {"tile": "variance head: exp(log_variance / 2), log1p units",
           "token": f"Poisson: sqrt(rate + {TOKEN_SPREAD_OFFSET}), counts",
           "cell": f"Poisson: sqrt(rate + {TOKEN_SPREAD_OFFSET}), counts (the cell's token rate x its area)"}


@dataclass(frozen=True)
class ScaleCalibration:
    """Conformal quantiles of one scale: ``quantiles[l, g]`` for level ``CALIBRATED_LEVELS[l]``, gene ``g``."""

    quantiles: np.ndarray
    n_calibration: int
    """Calibration predictions per gene (tiles, or tokens)."""


@dataclass(frozen=True)
class OutlierThreshold:
    """Where a calibrated model's outlier score flags a tile (its reference lives in the model)."""

    threshold: float
    threshold_level: float
    n_training_tiles: int
    n_reference_tokens: int


@dataclass(frozen=True)
class Calibration:
    """What a card holds to put an interval on every prediction and a flag on every tile."""

    scales: Mapping[str, ScaleCalibration]
    outliers: OutlierThreshold | None
    samples: tuple[str, ...] = ()
    """The held-out samples it was calibrated on."""
    levels: tuple[float, ...] = CALIBRATED_LEVELS
    routes: Mapping[str, Calibration] = dataclasses.field(default_factory=dict)
    """The calibrations of routes other than the model's default, by route (``image`` for a model
    trained with modality dropout): what :meth:`for_route` gives for them."""

    def for_route(self, route: str | None, default_route: str) -> Calibration | None:
        """The calibration of ``route`` (None: the default route), or None when it was not calibrated."""
        if route is None or route == default_route:
            return self
        return self.routes.get(route)

    def quantile(self, scale: str, level: float) -> np.ndarray:
        """(genes,) conformal quantiles of ``scale`` at ``level`` (one of :data:`CALIBRATED_LEVELS`)."""
        if scale not in self.scales:
            raise InputError(f"The model is not calibrated at the {scale} scale (it has {', '.join(self.scales)}).")
        return self.scales[scale].quantiles[level_index(level, self.levels)]

    def to_card(self) -> dict[str, Any]:
        """The card's JSON (quantiles as float64 lists, exact through JSON)."""
        values: dict[str, Any] = {
            "method": "split-conformal, scores |measured - predicted| / spread, per gene and scale",
            "levels": list(self.levels), "samples": list(self.samples),
            "scales": {name: {"spread": SPREADS[name], "n_calibration": int(scale.n_calibration),
                              "quantiles": [[None if math.isinf(q) else q for q in row]
                                            for row in np.asarray(scale.quantiles, dtype=np.float64).tolist()]}
                       for name, scale in self.scales.items()},
        }
        if self.outliers is not None:
            values["outliers"] = {"score": "90th percentile over the tile's tokens of each token's mean distance to "
                                           "its nearest standardised training tokens (ModelOutput.outlier_score)",
                                  **dataclasses.asdict(self.outliers)}
        if self.routes:
            values["routes"] = {route: calibration.to_card() for route, calibration in self.routes.items()}
        return values

    @classmethod
    def from_card(cls, values: Any, n_genes: int) -> Calibration:
        """Read a card's calibration (untrusted), checking every field's type and shape."""
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
        if "outliers" in values:
            o = _dict(values["outliers"], "calibration.outliers")
            if not all(_is_number(o.get(key)) for key in ("threshold", "threshold_level")):
                raise InputError("Model card calibration.outliers needs a numeric threshold and threshold_level.")
            outliers = OutlierThreshold(float(o["threshold"]), float(o["threshold_level"]),
                                        int(o.get("n_training_tiles", 0)), int(o.get("n_reference_tokens", 0)))
        samples = values.get("samples", [])
        routes = {}
        for route, nested in _dict(values.get("routes", {}), "calibration.routes").items():
            if route not in ("image", "transcripts"):
                raise InputError(f"Model card calibration route {route!r} is unknown (known: image, transcripts).")
            if isinstance(nested, dict) and "routes" in nested:
                raise InputError("Model card calibration.routes entries cannot hold routes of their own.")
            routes[route] = cls.from_card(nested, n_genes)
        return cls(scales, outliers, tuple(str(s) for s in samples), tuple(float(v) for v in levels), routes)


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


LOG_VARIANCE_RANGE = (-14.0, 3.0)
"""Log variances of the variance head are clamped to this range (log1p targets vary by far less
than e^3 and more than e^-14), in its loss and in its spread, so one tile cannot blow either up."""


def tile_spread(log_variance: np.ndarray) -> np.ndarray:
    """The variance head's standard deviation, log1p units."""
    return np.exp(0.5 * np.clip(np.asarray(log_variance, dtype=np.float64), *LOG_VARIANCE_RANGE))


def token_spread(rate: np.ndarray) -> np.ndarray:
    """The Poisson spread of a count at ``rate`` (with the offset of :data:`TOKEN_SPREAD_OFFSET`)."""
    return np.sqrt(np.asarray(rate, dtype=np.float64) + TOKEN_SPREAD_OFFSET)


def tile_scores(measured_log1p: np.ndarray, predicted_log1p: np.ndarray, log_variance: np.ndarray) -> np.ndarray:
    """Calibration scores of tile predictions: ``|measured - predicted| / tile_spread``."""
    return np.abs(np.asarray(measured_log1p, np.float64) - predicted_log1p) / tile_spread(log_variance)


def count_scores(counts: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Calibration scores of token or cell predictions: ``|counts - rate| / token_spread(rate)``."""
    return np.abs(np.asarray(counts, np.float64) - rate) / token_spread(rate)


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


def fit_calibration(model, calibration_dataset, training_dataset, *, samples: tuple[str, ...] = (),
                    batch_size: int = 64, device: str = "cpu", seed: int = 0):
    """Calibrate a trained model on held-out samples (at training time).

    Parameters
    ----------
    model
        A trained model: with a variance head (tile intervals), the add-on token head (token
        intervals) and a token sequence (the outlier reference).
    calibration_dataset
        Tiles of samples the model was not trained on (neither trained nor early-stopped on, ideally).
    training_dataset
        The training tiles: their token features make the outlier reference.
    samples
        The calibration samples' names, recorded in the card.
    batch_size, device, seed
        How the model runs, and the seed of the reference's sample of training tokens.

    Returns
    -------
    model, Calibration
        The model with its outlier reference (``config.outlier_reference_tokens`` set, the same
        weights), and per-gene conformal quantiles at every calibrated level for the tile and
        token scales the model has, with the threshold of the outlier score. A model trained with
        modality dropout is calibrated on its image-only route as well (``Calibration.routes``),
        with an outlier reference of image-only tokens: the route an H&E alone takes.
    """
    if model.config.variant_spec.has_token_sequence:
        model = with_outlier_reference(model, training_dataset, batch_size=batch_size, device=device, seed=seed)
    routes = ("image",) if model.config.unimodal_inputs and model.config.uses_image else ()
    calibration = _route_calibration(model, calibration_dataset, None, len(training_dataset), samples,
                                     batch_size=batch_size, device=device, seed=seed)
    others = {route: _route_calibration(model, calibration_dataset, route, len(training_dataset), samples,
                                        batch_size=batch_size, device=device, seed=seed) for route in routes}
    return model, dataclasses.replace(calibration, routes=others)


def _route_calibration(model, calibration_dataset, route: str | None, n_training_tiles: int,
                       samples: tuple[str, ...], *, batch_size: int, device: str, seed: int) -> Calibration:
    """The conformal quantiles and outlier threshold of one route (None: the model's default)."""
    from napari_morphomol.models.training import model_outputs  # torch stays out of card reading

    tile_parts, token_parts, outlier = [], [], []
    rng = np.random.default_rng(seed)
    for batch, output in model_outputs(model, calibration_dataset, batch_size=batch_size, device=device, route=route):
        if "prediction_log_variance" in output:
            tile_parts.append(tile_scores(batch["target"].numpy(), output["predictions"],
                                          output["prediction_log_variance"]))
        if "token_rate" in output:
            rate = output["token_rate"]
            scores = count_scores(batch["token_target"].numpy(), rate).reshape(-1, rate.shape[-1])
            token_parts.append(scores[rng.random(len(scores)) < 0.25])  # a quarter of the tokens is plenty
        if "outlier_score" in output:
            outlier.append(output["outlier_score"][:, 0])
    scales = {name: ScaleCalibration(conformal_quantiles(np.concatenate(parts)), sum(map(len, parts)))
              for name, parts in (("tile", tile_parts), ("token", token_parts)) if parts}
    outliers = None
    scores = np.concatenate(outlier) if outlier else np.zeros(0)
    if np.isfinite(scores).any():
        outliers = OutlierThreshold(float(np.nanquantile(scores, OUTLIER_LEVEL)), OUTLIER_LEVEL, n_training_tiles,
                                    model.config.outlier_reference_tokens)
    return Calibration(scales, outliers, tuple(samples))


def with_outlier_reference(model, training_dataset, *, batch_size: int = 64, device: str = "cpu", seed: int = 0):
    """A copy of ``model`` holding, for each of its outlier routes (``FusionModel.outlier_routes``:
    the default, and the image alone for a model trained with modality dropout), a random sample of
    its training tiles' tokens' outlier features on that route (``FusionModel.outlier_features``,
    standardised)."""
    import dataclasses as dc

    import torch

    from napari_morphomol.models.checkpoint import build_model

    config = model.config
    n_tokens = model.n_tokens * len(training_dataset)
    size = int(min(OUTLIER_REFERENCE_TOKENS, OUTLIER_REFERENCE_BYTES // (4 * model.outlier_dim), n_tokens))
    calibrated = build_model(dc.replace(config, outlier_reference_tokens=size))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("outlier_")}
    missing = [k for k in calibrated.load_state_dict(state, strict=False).missing_keys if not k.startswith("outlier_")]
    if missing:
        raise InputError(f"the calibrated model lacks weights of the trained one: {', '.join(missing[:5])}")
    model = model.to(device).eval()
    for route in calibrated.outlier_routes:
        pool = _reference_pool(model, training_dataset, route, size, batch_size=batch_size, device=device, seed=seed)
        centre, scale = pool.mean(dim=0), pool.std(dim=0).clamp_min(1e-6)
        reference, reference_centre, reference_scale = calibrated.outlier_reference_of(route)
        with torch.no_grad():
            reference_centre.copy_(centre)
            reference_scale.copy_(scale)
            reference.copy_((pool - centre) / scale)
    return calibrated.to(device).eval()


def _reference_pool(model, training_dataset, route: str, size: int, *, batch_size: int, device: str, seed: int):
    """``size`` training tokens' outlier features on ``route``, drawn at random batch by batch (a 4x
    oversample: memory stays small)."""
    import torch
    from torch.utils.data import DataLoader

    reads_image, reads_tokens = model.config.route_reads(route)
    keep = min(1.0, 4.0 * size / (model.n_tokens * len(training_dataset)))
    generator = torch.Generator().manual_seed(seed)
    kept = []
    with torch.inference_mode():
        for batch in DataLoader(training_dataset, batch_size=batch_size, shuffle=False):
            images = batch["image"].to(device) if reads_image else None
            tokens = batch["tokens"].to(device) if reads_tokens else None
            features = model.outlier_features(images, model.forward_tokens(model.forward_features(images, tokens)))
            features = features.float().cpu()
            features = features.reshape(-1, features.shape[-1])
            kept.append(features[torch.rand(len(features), generator=generator) < keep])
    pool = torch.cat(kept)
    return pool[torch.randperm(len(pool), generator=generator)[:size]]
