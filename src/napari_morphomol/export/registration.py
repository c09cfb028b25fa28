"""The H&E -> ``global`` registration a prediction run used, as recorded in its results store.

A run records either the sample's alignment matrix (``{"model": "affine", "matrix": ...}``) or
a full registration record (``registration.registration_record``: landmarks, model, per-region
affines). Exports need the map itself (tile boxes to ``global``), one affine for places that
hold one (SpatialData element transforms), and the landmarks when there are any.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.errors import InputError
from napari_morphomol.registration import LandmarkPairs, fitted_from_record


@dataclass(frozen=True)
class RunRegistration:
    model: str
    best_affine: np.ndarray
    """3 x 3 H&E px -> ``global`` px; the fit itself for translation/similarity/affine models."""
    apply_xy: Callable[[np.ndarray], np.ndarray]
    """The full map, H&E px (x, y) -> ``global`` px (per-region models included)."""
    landmarks: LandmarkPairs | None
    record: dict


def run_registration(metadata: dict) -> RunRegistration:
    record = metadata.get("registration")
    if not isinstance(record, dict):
        raise InputError("the results store records no H&E -> global registration; re-run `morphomol predict`")
    if "landmarks" in record:
        fitted = fitted_from_record(record)
        return RunRegistration(fitted.model, fitted.best_affine, fitted.apply_xy, fitted.pairs, record)
    matrix = record.get("matrix")
    if matrix is None:
        raise InputError("the results store's registration has no matrix; re-run `morphomol predict` with an alignment")
    matrix = np.asarray(matrix, dtype=np.float64)
    return RunRegistration(record.get("model", "affine"), matrix, lambda xy: apply_affine_xy(matrix, xy), None, record)
