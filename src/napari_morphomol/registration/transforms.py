"""Point transforms from H&E px to ``global`` px, and their inverses.

Three kinds share one interface (``map_columns``, ``apply_xy``, ``inverse_apply_xy``,
``best_affine``, ``linear_parts``):

- :class:`AffineXY`: one 3 x 3 matrix (translation, similarity and affine fits).
- :class:`PerRegionAffine`: one affine per region, blended with a partition of unity.
  At an H&E point p the result is ``sum_k w_k(p) A_k p`` with ``w_k >= 0`` and
  ``sum_k w_k = 1``; the weights vary smoothly, so the mapping is continuous and smooth and no
  transcript jumps at a region border. Inside a region, far from its borders, it is that
  region's affine. Two weightings:

  * automatic regions (:class:`SoftVoronoiWeights`): ``w_k`` is proportional to
    ``exp(-|p - c_k|^2 / (2 sigma^2))`` around region centres ``c_k``. The ``|p|^2`` term is the
    same for every region, so the weights are a softmax of functions linear in p: a "soft
    Voronoi" whose border between two centres a distance d apart blends over a band about
    ``4 sigma^2 / d`` wide (weights 12 % -> 88 %), the same width all along the border.
  * user polygons (:class:`PolygonWeights`): each polygon's indicator, painted on a coarse
    grid (cells outside every polygon go to the nearest polygon), Gaussian-blurred with
    ``sigma`` and read back bilinearly. Blurring is linear, so the weights still sum to 1.

  The inverse has no closed form; it is solved per point by Newton steps with the local blended
  matrix as the Jacobian, until no point moves by more than ``INVERSE_TOLERANCE_PX``.
- :class:`ThinPlateSplineXY`: scikit-image's thin-plate spline through the landmarks; its
  inverse is solved the same way, with the best single affine as the Jacobian.

``best_affine`` is the least-squares single affine of the same landmarks. It is what a
SpatialData element or a 3 x 3 CSV can carry when the model itself is not one affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as paint_polygon
from skimage.transform import ThinPlateSplineTransform

from napari_morphomol.coords import apply_affine_xy, as_points_xy
from napari_morphomol.errors import InputError

INVERSE_TOLERANCE_PX = 1e-4
"""Newton iterations of a non-affine inverse stop when no point moves by more than this; each
step shrinks the error about a hundredfold, so the result is good to ~1e-6 px."""

INVERSE_MAX_ITERATIONS = 50

POLYGON_GRID_MAX_CELLS = 512
"""Polygon weights are painted on at most this many cells per side."""


@dataclass(frozen=True, eq=False)
class AffineXY:
    """A single affine; ``matrix`` maps [x, y, 1] in H&E px to [x, y, 1] in ``global`` px."""

    matrix: np.ndarray

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (3, 3) or not np.all(np.isfinite(m)):
            raise InputError(f"an affine must be a finite 3 x 3 matrix, got shape {m.shape}")
        if not np.allclose(m[2], [0.0, 0.0, 1.0], atol=1e-12):
            raise InputError(f"the last row of an affine matrix must be [0, 0, 1], got {m[2]}")
        if abs(np.linalg.det(m[:2, :2])) < 1e-12:
            raise InputError("the affine matrix is singular (determinant 0); it cannot be inverted")
        m = m.copy()
        m.flags.writeable = False
        object.__setattr__(self, "matrix", m)

    @property
    def best_affine(self) -> np.ndarray:
        return self.matrix

    @property
    def inverse_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)

    def map_columns(self, x: np.ndarray, y: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Map x and y columns (H&E px -> ``global`` px, or back with ``inverse``).

        In-place arithmetic on whole columns: no (N, 2) temporaries; float32 stays float32.
        """
        m = self.inverse_matrix if inverse else self.matrix
        dtype = np.result_type(x.dtype, np.float32)
        out_x = np.multiply(x, m[0, 0], dtype=dtype)
        tmp = np.multiply(y, m[0, 1], dtype=dtype)
        out_x += tmp
        out_x += m[0, 2]
        out_y = np.multiply(x, m[1, 0], dtype=dtype)
        np.multiply(y, m[1, 1], out=tmp)
        out_y += tmp
        out_y += m[1, 2]
        return out_x, out_y

    def apply_xy(self, points_he_px: np.ndarray) -> np.ndarray:
        return apply_affine_xy(self.matrix, points_he_px)

    def inverse_apply_xy(self, points_global_px: np.ndarray) -> np.ndarray:
        return apply_affine_xy(self.inverse_matrix, points_global_px)

    def linear_parts(self) -> np.ndarray:
        """The 2 x 2 linear part(s) to check for mirrors and extreme scale or shear."""
        return self.matrix[None, :2, :2]


@dataclass(frozen=True, eq=False)
class SoftVoronoiWeights:
    """Partition of unity around region centres (H&E px); see the module docstring."""

    centres_he_px: np.ndarray
    sigma_px: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "centres_he_px", as_points_xy(self.centres_he_px))
        if not self.sigma_px > 0:
            raise InputError(f"the blend width sigma must be > 0 px, got {self.sigma_px}")

    @property
    def n_regions(self) -> int:
        return len(self.centres_he_px)

    def __call__(self, x_he_px: np.ndarray, y_he_px: np.ndarray) -> np.ndarray:
        """Weights (K, N) of the K regions at N points given as x and y columns."""
        c = self.centres_he_px
        logits = (c @ np.stack([x_he_px, y_he_px]) - 0.5 * np.sum(c * c, axis=1)[:, None]) / self.sigma_px**2
        logits -= logits.max(axis=0)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=0)
        return logits


class PolygonWeights:
    """Partition of unity from user polygons (H&E px), blurred by ``sigma_px`` across borders."""

    def __init__(self, polygons_he_px: list[np.ndarray], sigma_px: float, extent_he_px: np.ndarray):
        if len(polygons_he_px) < 1:
            raise InputError("per-region registration with polygons needs at least one polygon")
        if not sigma_px > 0:
            raise InputError(f"the blend width sigma must be > 0 px, got {sigma_px}")
        self.polygons_he_px = [as_points_xy(p) for p in polygons_he_px]
        for i, poly in enumerate(self.polygons_he_px):
            if len(poly) < 3:
                raise InputError(f"region polygon {i} has {len(poly)} vertices; a polygon needs >= 3")
        self.sigma_px = float(sigma_px)
        pts = np.vstack([*self.polygons_he_px, as_points_xy(extent_he_px)])
        margin = 3.0 * self.sigma_px
        self.origin = pts.min(axis=0) - margin
        span = pts.max(axis=0) + margin - self.origin
        self.cell_px = max(self.sigma_px / 4.0, float(span.max()) / POLYGON_GRID_MAX_CELLS)
        shape_rc = (np.ceil(span[::-1] / self.cell_px).astype(int) + 1).tolist()
        labels = np.full(shape_rc, -1, dtype=np.int32)
        for k, poly in enumerate(self.polygons_he_px):
            grid = (poly - self.origin) / self.cell_px
            rr, cc = paint_polygon(grid[:, 1], grid[:, 0], shape=labels.shape)
            labels[rr, cc] = k
        if np.all(labels < 0):
            raise InputError("the region polygons cover no area; draw them around the tissue")
        # cells outside every polygon belong to the nearest painted cell's region
        nearest = ndimage.distance_transform_edt(labels < 0, return_distances=False, return_indices=True)
        labels = labels[tuple(nearest)]
        sigma_cells = self.sigma_px / self.cell_px
        self.weight_maps = np.stack(
            [
                ndimage.gaussian_filter((labels == k).astype(np.float64), sigma_cells, mode="nearest")
                for k in range(len(self.polygons_he_px))
            ]
        )
        self.centres_he_px = np.array([p.mean(axis=0) for p in self.polygons_he_px])

    @property
    def n_regions(self) -> int:
        return len(self.polygons_he_px)

    def __call__(self, x_he_px: np.ndarray, y_he_px: np.ndarray) -> np.ndarray:
        """Weights (K, N) of the K regions at N points given as x and y columns."""
        coords_rc = np.stack([(y_he_px - self.origin[1]) / self.cell_px, (x_he_px - self.origin[0]) / self.cell_px])
        w = np.stack([ndimage.map_coordinates(m, coords_rc, order=1, mode="nearest") for m in self.weight_maps])
        w /= w.sum(axis=0)
        return w


def _newton_inverse(forward_with_jacobian, x: np.ndarray, y: np.ndarray, target_x: np.ndarray, target_y: np.ndarray):
    """Solve forward(x, y) = target per point (columns); the Jacobian need only be approximate.

    ``forward_with_jacobian(x, y)`` returns the mapped columns and the Jacobian's entries
    ``a, b, c, d`` (rows [a, b], [c, d]), each a column or a scalar.
    """
    x, y = x.copy(), y.copy()
    for _ in range(INVERSE_MAX_ITERATIONS):
        mx, my, a, b, c, d = forward_with_jacobian(x, y)
        mx -= target_x
        my -= target_y
        det = a * d - b * c
        step_x = (d * mx - b * my) / det
        step_y = (a * my - c * mx) / det
        x -= step_x
        y -= step_y
        if not len(x) or max(np.max(np.abs(step_x)), np.max(np.abs(step_y))) < INVERSE_TOLERANCE_PX:
            return x, y
    raise InputError(
        "the inverse of the registration did not converge; the fitted deformation folds over "
        "itself. Check the landmarks (residuals, leave-one-out errors) or use a simpler model."
    )


class _NewtonInverted:
    """Smooth non-affine maps: forward from ``_forward_with_jacobian``, inverse by Newton steps
    started at the inverse of ``best_affine``."""

    def map_columns(self, x: np.ndarray, y: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if not inverse:
            return self._forward_with_jacobian(x, y)[:2]
        inv = np.linalg.inv(self.best_affine)
        first_x = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]
        first_y = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
        return _newton_inverse(self._forward_with_jacobian, first_x, first_y, x, y)

    def apply_xy(self, points_he_px: np.ndarray) -> np.ndarray:
        pts = as_points_xy(points_he_px)
        return np.column_stack(self.map_columns(pts[:, 0], pts[:, 1]))

    def inverse_apply_xy(self, points_global_px: np.ndarray) -> np.ndarray:
        pts = as_points_xy(points_global_px)
        return np.column_stack(self.map_columns(pts[:, 0], pts[:, 1], inverse=True))


@dataclass(frozen=True, eq=False)
class PerRegionAffine(_NewtonInverted):
    """One affine per region (``region_matrices``, K x 3 x 3), blended by ``weights``."""

    region_matrices: np.ndarray
    weights: SoftVoronoiWeights | PolygonWeights
    best_affine: np.ndarray

    def _forward_with_jacobian(self, x: np.ndarray, y: np.ndarray):
        """Mapped columns and, per point, the blended matrix ``sum_k w_k A_k`` (its 2 x 2 part)."""
        coef = self.region_matrices[:, :2, :].reshape(-1, 6).T @ self.weights(x, y)
        out_x = coef[0] * x + coef[1] * y + coef[2]
        out_y = coef[3] * x + coef[4] * y + coef[5]
        return out_x, out_y, coef[0], coef[1], coef[3], coef[4]

    def linear_parts(self) -> np.ndarray:
        return self.region_matrices[:, :2, :2]


@dataclass(frozen=True, eq=False)
class ThinPlateSplineXY(_NewtonInverted):
    """Thin-plate spline through the landmarks (scikit-image), H&E px -> ``global`` px."""

    spline: ThinPlateSplineTransform
    best_affine: np.ndarray

    def _forward_with_jacobian(self, x: np.ndarray, y: np.ndarray):
        """Mapped columns and the best affine's 2 x 2 part, a good enough Jacobian for Newton."""
        mapped = self.spline(np.column_stack([x, y])) if len(x) else np.empty((0, 2))
        (a, b), (c, d) = self.best_affine[:2, :2]
        return mapped[:, 0], mapped[:, 1], a, b, c, d

    def linear_parts(self) -> np.ndarray:
        return self.best_affine[None, :2, :2]


@runtime_checkable
class HeGlobalTransform(Protocol):
    """The interface every transform here has, as the rest of the package uses it: H&E px ->
    ``global`` px and back, vectorised on (N, 2) (x, y) points; per-region transforms included."""

    def apply_xy(self, points_he_px: np.ndarray) -> np.ndarray: ...

    def inverse_apply_xy(self, points_global_px: np.ndarray) -> np.ndarray: ...


def as_he_global_transform(transform: np.ndarray | HeGlobalTransform) -> HeGlobalTransform:
    """Accept a 3 x 3 H&E px -> global px matrix, a registration transform or a fitted one."""
    if isinstance(transform, HeGlobalTransform):
        return transform
    if isinstance(getattr(transform, "transform", None), HeGlobalTransform):  # registration.FittedTransform
        return transform.transform
    return AffineXY(np.asarray(transform, dtype=np.float64))
