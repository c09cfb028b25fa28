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

Bulk inverse (transcripts, tens of millions of points): ``bulk_inverse_columns`` of the two
non-affine kinds interpolates an :class:`InverseGrid`, the exact Newton inverse solved once at the
nodes of a regular grid in ``global`` px over the model's extent (its landmarks or polygons and a
margin), bilinearly. The grid's pitch is chosen from the error measured against the exact inverse
at every cell's centre and edge midpoints, so every point inside it lands within
``INVERSE_GRID_TOLERANCE_PX`` of the exact inverse; points outside it are solved exactly. The
grid is built on first use, once per transform object, and is not part of any record.

``best_affine`` is the least-squares single affine of the same landmarks. It is what a
SpatialData element or a 3 x 3 CSV can carry when the model itself is not one affine.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import numba
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

INVERSE_GRID_TOLERANCE_PX = 0.01
"""The bulk inverse puts every point inside its grid within this many H&E px of the exact
Newton inverse (a token is 36.6 px at 0.5 um/px)."""
INVERSE_GRID_CHECK_FRACTION = 0.5
"""The grid is refined until the largest error measured at its cells' centres and edge midpoints
is at most this fraction of the tolerance; the rest is headroom for the points between them."""
INVERSE_GRID_MARGIN = 0.25
"""The grid reaches beyond the model's extent (landmarks, polygons) by this fraction of it on
every side; points further out are solved exactly."""
INVERSE_GRID_FIRST_CELLS = 32
INVERSE_GRID_MAX_CELLS = 1024
"""Cells per side of the grid's longer side: refinement starts at the first figure and may not
pass the second (16 MB of nodes); a model that would need more (a thin-plate spline through noisy
landmarks bends sharply at each of them) is inverted exactly, point by point."""
POLYGON_START_GRID_CELLS = 128
"""Cells per side of the coarse inverse grid that starts the Newton steps of polygon regions."""
EXACT_CHUNK_POINTS = 1 << 14
"""Points per chunk of an exact non-affine map: its per-point work (K region weights, Newton
steps) then stays in cache, which is several times faster than 1 M-point chunks."""


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

    @property
    def extent_he_px(self) -> np.ndarray:
        """Corners (2, 2) [[x0, y0], [x1, y1]] of the centres' box widened by sigma: about where
        the landmarks are (sigma is 0.6 x the distance between neighbouring centres)."""
        c = self.centres_he_px
        return np.array([c.min(axis=0) - self.sigma_px, c.max(axis=0) + self.sigma_px])

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

    @property
    def extent_he_px(self) -> np.ndarray:
        """Corners (2, 2) [[x0, y0], [x1, y1]] of the painted grid (polygons, landmarks, 3 sigma)."""
        return np.array([self.origin, self.origin + self.cell_px * (np.array(self.weight_maps.shape[:0:-1]) - 1)])

    def blended(self, region_matrices: np.ndarray) -> np.ndarray:
        """The blended 2 x 3 matrices ``sum_k w_k A_k`` at the weight grid's nodes, (rows, cols, 6):
        read bilinearly they give the blended matrix anywhere (blending and bilinear reads are
        both linear)."""
        w = self.weight_maps / self.weight_maps.sum(axis=0)
        return np.ascontiguousarray(np.einsum("krc,kj->rcj", w, region_matrices[:, :2, :].reshape(-1, 6)))

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
    raise InputError(_NOT_CONVERGED)


_NOT_CONVERGED = ("the inverse of the registration did not converge; the fitted deformation folds over "
                  "itself. Check the landmarks (residuals, leave-one-out errors) or use a simpler model.")


def map_columns_chunked(
    mapping: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None],
    x: np.ndarray,
    y: np.ndarray,
    dtype: np.dtype,
    chunk_points: int,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map x and y columns chunk by chunk on a thread pool into new columns of ``dtype``.

    Parameters
    ----------
    mapping
        ``(x, y, out_x, out_y)``: maps one chunk of the columns into that chunk of the outputs.
    x, y
        1-D columns of equal length.
    dtype
        The output columns' dtype.
    chunk_points
        Points per chunk.
    workers
        Threads; None: one per CPU.

    Returns
    -------
    tuple of numpy.ndarray
        The mapped x and y columns.
    """
    out_x = np.empty(x.shape, dtype=dtype)
    out_y = np.empty(x.shape, dtype=dtype)

    def run(start: int) -> None:
        sl = slice(start, start + chunk_points)
        mapping(x[sl], y[sl], out_x[sl], out_y[sl])

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(run, range(0, len(x), chunk_points)))
    return out_x, out_y


def filling(columns: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """A columns map ``(x, y) -> (x, y)`` as a mapping for :func:`map_columns_chunked`.

    Parameters
    ----------
    columns
        Maps x and y columns to new x and y columns (e.g. ``transform.map_columns``).

    Returns
    -------
    callable
        ``(x, y, out_x, out_y)``: writes ``columns(x, y)`` into ``out_x`` and ``out_y``.
    """

    def fill(x: np.ndarray, y: np.ndarray, out_x: np.ndarray, out_y: np.ndarray) -> None:
        out_x[:], out_y[:] = columns(x, y)

    return fill


@numba.njit(cache=True, nogil=True, inline="always")
def _bilinear(grid, row, col, fu, fv, k):
    """Channel ``k`` of a (rows, cols, channels) grid read bilinearly in cell (row, col) at (fu, fv)."""
    top = grid[row, col, k] + fu * (grid[row, col + 1, k] - grid[row, col, k])
    bottom = grid[row + 1, col, k] + fu * (grid[row + 1, col + 1, k] - grid[row + 1, col, k])
    return top + fv * (bottom - top)


@numba.njit(cache=True, nogil=True)
def _bilinear_kernel(x, y, x0, y0, inv_pitch, nodes, out_x, out_y, outside):
    """Bilinear interpolation of ``nodes`` (rows, cols, 2) at the points; the indices of points
    off the grid (NaN included) go to ``outside`` and their count is returned."""
    n_rows, n_cols = nodes.shape[0], nodes.shape[1]
    last_u = np.float64(n_cols - 1)
    last_v = np.float64(n_rows - 1)
    n_outside = 0
    for i in range(x.shape[0]):
        u = (np.float64(x[i]) - x0) * inv_pitch
        v = (np.float64(y[i]) - y0) * inv_pitch
        if not (u >= 0.0 and v >= 0.0 and u <= last_u and v <= last_v):
            outside[n_outside] = i
            n_outside += 1
            continue
        c = min(int(u), n_cols - 2)
        r = min(int(v), n_rows - 2)
        fu = u - c
        fv = v - r
        out_x[i] = _bilinear(nodes, r, c, fu, fv, 0)
        out_y[i] = _bilinear(nodes, r, c, fu, fv, 1)
    return n_outside


@numba.njit(cache=True, nogil=True)
def _blended_newton_kernel(x, y, x0, y0, inv_cell, coefficients, affine, tolerance, max_iterations, out_x, out_y):
    """The exact inverse of ``p -> C(p) p``, C the 2 x 3 blended matrix read bilinearly from
    ``coefficients`` (rows, cols, 6) with edge values beyond the grid: Newton steps per point from
    where ``out_x``, ``out_y`` start (where NaN: from the ``affine`` 2 x 3 inverse), the local
    2 x 2 part as Jacobian, until a step is below ``tolerance``. Returns the number of points
    that did not converge."""
    n_rows, n_cols = coefficients.shape[0], coefficients.shape[1]
    c = np.empty(6)
    failed = 0
    for i in range(x.shape[0]):
        gx = np.float64(x[i])
        gy = np.float64(y[i])
        px = out_x[i]
        py = out_y[i]
        if not np.isfinite(px):
            px = affine[0, 0] * gx + affine[0, 1] * gy + affine[0, 2]
            py = affine[1, 0] * gx + affine[1, 1] * gy + affine[1, 2]
        converged = False
        for _ in range(max_iterations):
            u = min(max((px - x0) * inv_cell, 0.0), n_cols - 1.0)
            v = min(max((py - y0) * inv_cell, 0.0), n_rows - 1.0)
            col = min(int(u), n_cols - 2)
            row = min(int(v), n_rows - 2)
            fu = u - col
            fv = v - row
            for k in range(6):
                c[k] = _bilinear(coefficients, row, col, fu, fv, k)
            mx = c[0] * px + c[1] * py + c[2] - gx
            my = c[3] * px + c[4] * py + c[5] - gy
            det = c[0] * c[4] - c[1] * c[3]
            step_x = (c[4] * mx - c[1] * my) / det
            step_y = (c[0] * my - c[3] * mx) / det
            px -= step_x
            py -= step_y
            if abs(step_x) < tolerance and abs(step_y) < tolerance:
                converged = True
                break
        failed += not converged
        out_x[i] = px
        out_y[i] = py
    return failed


@dataclass(frozen=True, eq=False)
class InverseGrid:
    """The exact inverse (``global`` px -> H&E px) at the nodes of a square grid, for bilinear reads.

    Node (r, c) sits at ``origin_global_px + pitch_global_px * (c, r)``; ``nodes_he_px[r, c]`` is
    its H&E (x, y). ``max_error_px`` is the largest distance between the bilinear read and the
    exact inverse measured at every cell's centre and edge midpoints.
    """

    origin_global_px: tuple[float, float]
    pitch_global_px: float
    nodes_he_px: np.ndarray
    max_error_px: float

    @property
    def nbytes(self) -> int:
        """Bytes the grid's nodes take in memory."""
        return self.nodes_he_px.nbytes

    def interpolate(self, x: np.ndarray, y: np.ndarray, out_x: np.ndarray, out_y: np.ndarray) -> np.ndarray:
        """Bilinear read at points given as ``global`` px columns (float32 or float64).

        Parameters
        ----------
        x, y
            1-D columns of equal length.
        out_x, out_y
            float64 columns of the same length for the H&E px x and y (left as they are off the grid).

        Returns
        -------
        numpy.ndarray
            The indices of the points off the grid.
        """
        outside = np.empty(len(x), dtype=np.int64)
        n = _bilinear_kernel(x, y, self.origin_global_px[0], self.origin_global_px[1], 1.0 / self.pitch_global_px,
                             self.nodes_he_px, out_x, out_y, outside)
        return outside[:n]


_GRID_LOCK = threading.Lock()


class _NewtonInverted:
    """Smooth non-affine maps: forward from ``_forward_with_jacobian``, inverse by Newton steps
    started at the inverse of ``best_affine`` (exact), or read from an :class:`InverseGrid` (bulk)."""

    def map_columns(self, x: np.ndarray, y: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if not inverse:
            return self._forward_with_jacobian(x, y)[:2]
        inv = np.linalg.inv(self.best_affine)
        first_x = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]
        first_y = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
        return _newton_inverse(self._forward_with_jacobian, first_x, first_y, x, y)

    def bulk_inverse_columns(
        self, x: np.ndarray, y: np.ndarray, out_x: np.ndarray | None = None, out_y: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``global`` px -> H&E px for many points, within ``INVERSE_GRID_TOLERANCE_PX`` of the exact inverse.

        Points on the :meth:`inverse_grid` are read from it; the others (and all of them when the
        model has no grid) are solved exactly.

        Parameters
        ----------
        x, y
            1-D ``global`` px columns of equal length (float32 or float64).
        out_x, out_y
            float64 columns to write the result into; None: new ones.

        Returns
        -------
        tuple of numpy.ndarray
            The H&E px x and y columns, float64.
        """
        out_x = np.empty(len(x)) if out_x is None else out_x
        out_y = np.empty(len(x)) if out_y is None else out_y
        grid = self.inverse_grid()
        outside = np.arange(len(x)) if grid is None else grid.interpolate(x, y, out_x, out_y)
        for start in range(0, len(outside), EXACT_CHUNK_POINTS):
            idx = outside[start:start + EXACT_CHUNK_POINTS]
            out_x[idx], out_y[idx] = self.map_columns(x[idx], y[idx], inverse=True)
        return out_x, out_y

    def inverse_grid(self) -> InverseGrid | None:
        """The grid of the bulk inverse, built on the first call (once per object; thread-safe).

        Returns
        -------
        InverseGrid or None
            None when no grid of at most ``INVERSE_GRID_MAX_CELLS`` cells per side meets the
            tolerance, or the exact inverse fails on the grid's extent (the model folds there).
        """
        if "_inverse_grid" not in self.__dict__:
            with _GRID_LOCK:
                if "_inverse_grid" not in self.__dict__:
                    self.__dict__["_inverse_grid"] = self._build_inverse_grid()
        return self.__dict__["_inverse_grid"]

    def _exact_inverse_chunked(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return map_columns_chunked(filling(partial(self.map_columns, inverse=True)), x, y, np.float64,
                                   EXACT_CHUNK_POINTS)

    def _build_inverse_grid(self) -> InverseGrid | None:
        origin, span = self._grid_box_global()
        target = INVERSE_GRID_CHECK_FRACTION * INVERSE_GRID_TOLERANCE_PX
        cells = INVERSE_GRID_FIRST_CELLS
        while True:
            pitch = float(span.max()) / cells
            n_x, n_y = (np.ceil(span / pitch).astype(int) + 1).tolist()
            try:
                grid = self._grid_with_measured_error(origin, pitch, n_x, n_y)
            except InputError:
                return None
            if grid.max_error_px <= target:
                return grid
            # the bilinear error shrinks with the square of the pitch
            cells = math.ceil(1.1 * cells * math.sqrt(grid.max_error_px / target))
            if cells > INVERSE_GRID_MAX_CELLS:
                return None

    def _grid_box_global(self) -> tuple[np.ndarray, np.ndarray]:
        """Origin and span (global px) of the box the grid covers."""
        lo, hi = self._extent_he_px()
        lo, hi = lo - INVERSE_GRID_MARGIN * (hi - lo), hi + INVERSE_GRID_MARGIN * (hi - lo)
        # the box's outline in global px: its bounding box is the grid's extent
        t = np.linspace(0.0, 1.0, 257)
        outline_x = np.concatenate([lo[0] + t * (hi[0] - lo[0]), np.full_like(t, hi[0]),
                                    hi[0] - t * (hi[0] - lo[0]), np.full_like(t, lo[0])])
        outline_y = np.concatenate([np.full_like(t, lo[1]), lo[1] + t * (hi[1] - lo[1]),
                                    np.full_like(t, hi[1]), hi[1] - t * (hi[1] - lo[1])])
        gx, gy = self.map_columns(outline_x, outline_y)
        origin = np.array([gx.min(), gy.min()])
        return origin, np.array([gx.max(), gy.max()]) - origin

    def _grid_with_measured_error(self, origin: np.ndarray, pitch: float, n_x: int, n_y: int) -> InverseGrid:
        """Solve the exact inverse on the grid at half pitch: the even nodes are the grid, the
        odd ones its cells' centres and edge midpoints, where the bilinear read is checked."""
        half_x = origin[0] + 0.5 * pitch * np.arange(2 * n_x - 1)
        half_y = origin[1] + 0.5 * pitch * np.arange(2 * n_y - 1)
        xx, yy = np.meshgrid(half_x, half_y)
        hx, hy = self._exact_inverse_chunked(xx.ravel(), yy.ravel())
        fine = np.stack([hx, hy], axis=-1).reshape(2 * n_y - 1, 2 * n_x - 1, 2)
        nodes = np.ascontiguousarray(fine[::2, ::2])
        centres = 0.25 * (nodes[:-1, :-1] + nodes[:-1, 1:] + nodes[1:, :-1] + nodes[1:, 1:])
        along_x = 0.5 * (nodes[:, :-1] + nodes[:, 1:])
        along_y = 0.5 * (nodes[:-1] + nodes[1:])
        error = max(
            float(np.max(np.hypot(*np.moveaxis(read - fine[rows, cols], -1, 0))))
            for read, rows, cols in [(centres, slice(1, None, 2), slice(1, None, 2)),
                                     (along_x, slice(0, None, 2), slice(1, None, 2)),
                                     (along_y, slice(1, None, 2), slice(0, None, 2))]
        )
        return InverseGrid((float(origin[0]), float(origin[1])), pitch, nodes, error)

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

    def _extent_he_px(self) -> np.ndarray:
        return self.weights.extent_he_px

    def bulk_inverse_columns(
        self, x: np.ndarray, y: np.ndarray, out_x: np.ndarray | None = None, out_y: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``global`` px -> H&E px for many points (see :meth:`_NewtonInverted.bulk_inverse_columns`).

        Polygon regions blend weights read bilinearly from a grid, so the map bends at every
        cell's edge and no coarser grid of its inverse follows it within the tolerance; their
        inverse is solved exactly instead, by the same Newton steps compiled, on the blended
        matrices at the weight grid's nodes (:meth:`PolygonWeights.blended`), started from a coarse
        grid of the inverse (``POLYGON_START_GRID_CELLS``; both built once; where the exact
        inverse fails somewhere on that grid's extent, every point starts at the best affine's inverse).
        """
        if not isinstance(self.weights, PolygonWeights):
            return super().bulk_inverse_columns(x, y, out_x, out_y)
        out_x = np.empty(len(x)) if out_x is None else out_x
        out_y = np.empty(len(x)) if out_y is None else out_y
        if "_polygon_start" not in self.__dict__:
            with _GRID_LOCK:
                if "_polygon_start" not in self.__dict__:
                    origin, span = self._grid_box_global()
                    pitch = float(span.max()) / POLYGON_START_GRID_CELLS
                    n_x, n_y = (np.ceil(span / pitch).astype(int) + 1).tolist()
                    try:
                        start = self._grid_with_measured_error(origin, pitch, n_x, n_y)
                    except InputError:  # the exact inverse fails somewhere on the grid's extent
                        start = None
                    self.__dict__["_polygon_start"] = (start, self.weights.blended(self.region_matrices))
        start, blended = self.__dict__["_polygon_start"]
        out_x.fill(np.nan)  # off the start grid (or with none): start at the best affine's inverse
        if start is not None:
            start.interpolate(x, y, out_x, out_y)
        w = self.weights
        failed = _blended_newton_kernel(x, y, w.origin[0], w.origin[1], 1.0 / w.cell_px, blended,
                                        np.linalg.inv(self.best_affine)[:2], INVERSE_TOLERANCE_PX,
                                        INVERSE_MAX_ITERATIONS, out_x, out_y)
        if failed:
            raise InputError(_NOT_CONVERGED)
        return out_x, out_y

    def inverse_grid(self) -> InverseGrid | None:
        """The grid of the bulk inverse (None for polygon regions, which are solved exactly)."""
        return None if isinstance(self.weights, PolygonWeights) else super().inverse_grid()

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

    def _extent_he_px(self) -> np.ndarray:
        return np.array([self.spline.src.min(axis=0), self.spline.src.max(axis=0)])

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
    if isinstance(getattr(transform, "transform", None), HeGlobalTransform):  # registration.FittedTransform
        return transform.transform  # the model itself, with its bulk inverse
    if isinstance(transform, HeGlobalTransform):
        return transform
    return AffineXY(np.asarray(transform, dtype=np.float64))
