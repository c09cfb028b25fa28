"""The one coordinate convention of the project, and the only place axes are swapped.

Core code speaks (x, y): x to the right, y down, as Xenium and SpatialData do. Point arrays
are ``(N, 2)`` in (x, y) order; transforms are 3 x 3 homogeneous matrices acting on column
vectors ``[x, y, 1]``.

Spaces:
- ``global``: Xenium morphology-image pixels (spatialdata-io's coordinate system), usually
  0.2125 um/px.
- H&E px: the H&E image's own full-resolution pixel grid.
- um: micrometres, ``global`` px times the Xenium pixel size. napari shows every layer in um.

The registration is an affine (or one per region) from H&E px to ``global``, the direction of
Xenium's ``he_imagealignment.csv``. napari speaks (row, col) = (y, x): :func:`xy_to_napari`
and :func:`napari_affine` are where the swap happens.
"""

from __future__ import annotations

import numpy as np

XENIUM_PIXEL_SIZE_UM = 0.2125
"""Default Xenium morphology pixel size; read the real one from ``experiment.xenium``."""

GLOBAL = "global"
"""spatialdata-io's coordinate system: Xenium morphology pixels."""

HE_PX = "he_px"
"""Coordinate system of an H&E image's own full-resolution pixels."""

_SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def as_points_xy(points: np.ndarray) -> np.ndarray:
    """Validate an (N, 2) array of (x, y) points and return it as float64."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2) in (x, y) order, got {arr.shape}")
    return arr


def apply_affine_xy(matrix: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """Map (x, y) points through a 3 x 3 homogeneous affine."""
    pts = as_points_xy(points_xy)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:2, :2].T + m[:2, 2]


def scale_matrix(factor: float) -> np.ndarray:
    """Isotropic scaling as a 3 x 3 matrix (e.g. global px -> um with the pixel size)."""
    return np.diag([factor, factor, 1.0])


def global_px_to_um(points_global_px: np.ndarray, xenium_pixel_size_um: float) -> np.ndarray:
    return as_points_xy(points_global_px) * xenium_pixel_size_um


def um_to_global_px(points_um: np.ndarray, xenium_pixel_size_um: float) -> np.ndarray:
    return as_points_xy(points_um) / xenium_pixel_size_um


def xy_to_napari(points_xy: np.ndarray) -> np.ndarray:
    """(x, y) points -> napari (row, col) = (y, x) points."""
    return as_points_xy(points_xy)[:, ::-1].copy()


def napari_to_xy(points_rc: np.ndarray) -> np.ndarray:
    """napari (row, col) points -> (x, y) points."""
    return as_points_xy(points_rc)[:, ::-1].copy()


def napari_affine(matrix_xy: np.ndarray) -> np.ndarray:
    """A 3 x 3 (x, y) affine rewritten for napari's (row, col) axes."""
    return _SWAP @ np.asarray(matrix_xy, dtype=np.float64) @ _SWAP


def xy_affine_from_napari(matrix_rc: np.ndarray) -> np.ndarray:
    """A napari (row, col) affine rewritten as a 3 x 3 (x, y) affine."""
    return _SWAP @ np.asarray(matrix_rc, dtype=np.float64) @ _SWAP


def layer_affine_um(pixel_to_global_xy: np.ndarray, xenium_pixel_size_um: float) -> np.ndarray:
    """napari ``layer.affine`` that shows a layer's pixels in um.

    ``pixel_to_global_xy`` maps the layer's data pixels (x, y) to ``global``; the result maps
    the layer's (row, col) to (y_um, x_um), so every layer overlays and the scale bar reads um.
    """
    return napari_affine(scale_matrix(xenium_pixel_size_um) @ np.asarray(pixel_to_global_xy))
