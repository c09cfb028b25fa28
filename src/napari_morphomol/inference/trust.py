"""The trust of a run: interval bounds for every tile prediction and the out-of-distribution flag.

Written by ``predict`` after the last chunk into the results store's ``trust`` group, from the
model card's :class:`~napari_morphomol.models.trust.Calibration` (see that module for what the
quantiles and the outlier score mean):

- ``prediction_lower``, ``prediction_upper``: (tiles, add-on genes) float32 log1p bounds at the
  run's level (attribute ``level``, default 0.9), with a variance-head model calibrated at the
  tile scale;
- ``outlier_score`` (tiles,) float32 (the model's output of that name) and ``outlier_flag``
  (tiles,) bool, for a model with an outlier reference;
- attributes: ``level``, ``threshold``, ``token_quantile`` and ``cell_quantile`` (the token and
  cell scales' quantile per gene at that level: token and cell intervals are computed from the
  maps when read; cells use the token quantile when the card has none of their own) and
  ``samples`` (what it was calibrated on).

A run of a model without calibration has no ``trust`` group: :func:`read_trust` then gives a
:class:`RunTrust` whose ``unavailable`` says why, and nothing shows an interval of zero width. A
run takes the calibration of its route (``Calibration.for_route``: an H&E alone the image-only
route's, which a model trained with modality dropout has); a run by a route the card did not
calibrate gets a ``trust`` group holding only that reason (attribute ``unavailable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from napari_morphomol.inference.store import TRUST

NO_CALIBRATION = ("intervals and out-of-distribution flags are unavailable: the model card has no calibration "
                  "(a model trained before calibration existed, or converted from the reference code); retrain "
                  "with held-out samples to calibrate on (morphomol train --calibration SAMPLE)")


OTHER_ROUTE = ("intervals and out-of-distribution flags are unavailable for this run: the model is calibrated "
               "with both the H&E and the transcripts, and this run had {route}; an interval calibrated there would "
               "be too narrow here (a model trained with modality dropout and calibrated since, as the shipped one, "
               "is calibrated on the H&E alone too)")
ROUTE_WORDS = {"image": "the H&E alone", "transcripts": "the transcripts alone", "both": "both"}


@dataclass(frozen=True)
class RunTrust:
    """What a run says about where its predictions can be believed."""

    level: float | None = None
    lower: np.ndarray | None = None
    """(tiles, add-on genes) log1p lower bounds of the tile predictions, or None."""
    upper: np.ndarray | None = None
    outlier_score: np.ndarray | None = None
    outlier_flag: np.ndarray | None = None
    threshold: float | None = None
    token_quantile: np.ndarray | None = None
    """(add-on genes,) conformal quantile of the token scale at ``level`` (None: no token intervals)."""
    cell_quantile: np.ndarray | None = None
    """The same for cells (``morphomol calibrate`` on runs); None: cells use the token quantile."""
    samples: tuple[str, ...] = ()
    unavailable: str | None = NO_CALIBRATION
    """Why there is no trust at all (None when the run has some)."""

    @property
    def has_intervals(self) -> bool:
        return self.lower is not None

    @property
    def has_flags(self) -> bool:
        return self.outlier_flag is not None


def write_trust(root: zarr.Group, card, level: float, route: str | None = None) -> dict | None:
    """Write the ``trust`` group of a finished run from ``card.calibration`` at ``level``; returns
    its summary for the store's attributes (None, writing nothing, when the card has no calibration).
    ``route``: the run's (None: the model's default, the route it was calibrated on)."""
    from napari_morphomol.models.trust import tile_interval

    if card.calibration is None:
        return None
    group = root.require_group(TRUST)
    calibration = card.calibration.for_route(route, card.model.default_route)
    if calibration is None:
        summary = {"unavailable": OTHER_ROUTE.format(route=ROUTE_WORDS[route])}
        group.attrs.update(summary)
        return summary
    n_tiles, n_genes = root["predictions"].shape
    summary: dict = {"level": float(level), "samples": list(calibration.samples),
                     "route": route or card.model.default_route}
    if "tile" in calibration.scales and "prediction_log_variance" in root:
        lower, upper = tile_interval(root["predictions"][:], root["prediction_log_variance"][:],
                                     calibration.quantile("tile", level))
        for name, values in (("prediction_lower", lower), ("prediction_upper", upper)):
            group.create_array(name, data=values, chunks=(max(1, min(n_tiles, 4096)), n_genes), overwrite=True)
        summary["tile_intervals"] = True
    for scale in ("token", "cell"):
        if scale in calibration.scales:
            summary[f"{scale}_quantile"] = [float(q) for q in calibration.quantile(scale, level)]
    if calibration.outliers is not None and "outlier_score" in root:
        scores = root["outlier_score"][:, 0]
        group.create_array("outlier_score", data=scores, overwrite=True)
        group.create_array("outlier_flag", data=scores > calibration.outliers.threshold, overwrite=True)
        summary.update(threshold=calibration.outliers.threshold, n_flagged=int((scores > calibration.outliers.threshold
                                                                                 ).sum()))
    group.attrs.update(summary)
    return summary


def read_trust(root: zarr.Group, attrs: dict) -> RunTrust:
    """The run's :class:`RunTrust` (``unavailable`` set when the run has none, saying why)."""
    if TRUST not in root:
        calibrated = "calibration" in (attrs.get("model_card") or {})
        if calibrated and attrs.get("status") != "complete":
            return RunTrust(unavailable="intervals and out-of-distribution flags are written when the run finishes")
        return RunTrust()
    group = root[TRUST]
    attrs = dict(group.attrs)
    if attrs.get("unavailable"):
        return RunTrust(unavailable=attrs["unavailable"])

    def array(name: str) -> np.ndarray | None:
        return group[name][:] if name in group else None

    token, cell = attrs.get("token_quantile"), attrs.get("cell_quantile")
    return RunTrust(level=attrs.get("level"), lower=array("prediction_lower"), upper=array("prediction_upper"),
                    outlier_score=array("outlier_score"), outlier_flag=array("outlier_flag"),
                    threshold=attrs.get("threshold"), token_quantile=None if token is None else np.asarray(token),
                    cell_quantile=None if cell is None else np.asarray(cell),
                    samples=tuple(attrs.get("samples", ())), unavailable=None)
