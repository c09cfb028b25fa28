"""The true H&E px -> global px map of a synthetic sample: an affine plus a smooth warp.

    global = A @ [u, v, 1] + sum_k a_k * sin(2 pi (f_k . (u, v)) + phase_k)

(u, v) are continuous H&E pixel coordinates (pixel (row r, col c) covers [c, c + 1) x
[r, r + 1), so its centre is (c + 0.5, r + 0.5)); a_k are (x, y) amplitudes in global px and
f_k spatial frequencies in cycles per H&E px. The same formula renders the H&E image and is
written to ground_truth.json, so tests score registrations against the exact truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_morphomol.coords import apply_affine_xy, as_points_xy

_INVERSE_ITERATIONS = 8


@dataclass(frozen=True)
class TrueTransform:
    affine: np.ndarray
    """3 x 3, H&E px -> global px: the affine part, written as he_imagealignment.csv."""
    warp: np.ndarray
    """(K, 5) rows [amp_x_px, amp_y_px, freq_u, freq_v, phase]; empty for no deformation."""

    def displacement_px(self, points_he_px: np.ndarray) -> np.ndarray:
        pts = as_points_xy(points_he_px)
        out = np.zeros_like(pts)
        for amp_x, amp_y, fu, fv, phase in self.warp:
            s = np.sin(2 * np.pi * (fu * pts[:, 0] + fv * pts[:, 1]) + phase)
            out[:, 0] += amp_x * s
            out[:, 1] += amp_y * s
        return out

    def he_to_global_px(self, points_he_px: np.ndarray) -> np.ndarray:
        pts = as_points_xy(points_he_px)
        return apply_affine_xy(self.affine, pts) + self.displacement_px(pts)

    def global_to_he_px(self, points_global_px: np.ndarray) -> np.ndarray:
        """Inverse by fixed-point iteration (the warp's slope is far below 1)."""
        target = as_points_xy(points_global_px)
        inv = np.linalg.inv(self.affine)
        pts = apply_affine_xy(inv, target)
        for _ in range(_INVERSE_ITERATIONS if len(self.warp) else 0):
            pts = apply_affine_xy(inv, target - self.displacement_px(pts))
        return pts

    def he_grid_to_world_um(
        self, cols: np.ndarray, rows: np.ndarray, xenium_pixel_size_um: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """World um (x, y) of the pixel centres of an H&E pixel grid, as two float32 (rows, cols) arrays.

        he_to_global_px times the Xenium pixel size on every pixel centre (to float32 precision),
        computed separably (sin(a + b) = sin a cos b + cos a sin b): a few products per pixel.
        """
        u = np.asarray(cols, dtype=np.float64) + 0.5
        v = np.asarray(rows, dtype=np.float64) + 0.5
        m = self.affine * xenium_pixel_size_um
        wx = ((m[0, 0] * u + m[0, 2])[None, :] + (m[0, 1] * v)[:, None]).astype(np.float32)
        wy = ((m[1, 0] * u + m[1, 2])[None, :] + (m[1, 1] * v)[:, None]).astype(np.float32)
        for amp_x, amp_y, fu, fv, phase in self.warp:
            au = 2 * np.pi * fu * u
            bv = 2 * np.pi * fv * v + phase
            s = np.sin(au).astype(np.float32)[None, :] * np.cos(bv).astype(np.float32)[:, None]
            s += np.cos(au).astype(np.float32)[None, :] * np.sin(bv).astype(np.float32)[:, None]
            wx += np.float32(amp_x * xenium_pixel_size_um) * s
            wy += np.float32(amp_y * xenium_pixel_size_um) * s
        return wx, wy


def random_transform(
    rng: np.random.Generator,
    size_global_px: tuple[float, float],
    he_pixel_size_um: float,
    xenium_pixel_size_um: float,
    margin_he_px: float,
    deformation: bool,
    axis_aligned: bool = False,
) -> tuple[TrueTransform, tuple[int, int]]:
    """A non-trivial affine (rotation, scale error, slight shear, shift) placing the H&E so
    that it covers the whole morphology image, and the H&E image size (width, height).

    ``axis_aligned``: the affine is the pixel-size ratio and a shift of whole global px only (no
    rotation, scale error or shear), the block that :mod:`.scale` repeats."""
    angle = np.deg2rad(rng.choice([-1, 1]) * rng.uniform(4.0, 20.0))
    scale = he_pixel_size_um / xenium_pixel_size_um * rng.uniform(0.985, 1.015)
    aniso = rng.uniform(0.99, 1.01)
    shear = rng.uniform(-0.01, 0.01)
    if axis_aligned:
        angle, scale, aniso, shear = 0.0, he_pixel_size_um / xenium_pixel_size_um, 1.0, 0.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = rot @ np.array([[scale * aniso, shear * scale], [0.0, scale / aniso]])
    inv_linear = np.linalg.inv(linear)
    w, h = size_global_px
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float)
    he_corners = corners @ inv_linear.T
    lo = he_corners.min(axis=0)
    hi = he_corners.max(axis=0)
    extra = margin_he_px + rng.uniform(0, margin_he_px, 2)
    if axis_aligned:  # the shift (scale * extra) a whole number of global px
        extra = np.round(extra * scale) / scale
    he_size = np.ceil(hi - lo + extra + margin_he_px).astype(int)
    # he = inv(linear) @ global - lo + extra  <=>  global = linear @ he + linear @ (lo - extra)
    translation = linear @ (lo - extra)
    affine = np.eye(3)
    affine[:2, :2] = linear
    affine[:2, 2] = translation

    warp = np.zeros((0, 5))
    if deformation:
        n = 4
        wavelength_he_px = 1000.0 / he_pixel_size_um * rng.uniform(0.7, 1.4, n)
        direction = rng.uniform(0, 2 * np.pi, n)
        freq = np.column_stack([np.cos(direction), np.sin(direction)]) / wavelength_he_px[:, None]
        amp_um = rng.uniform(2.0, 5.0, n)
        amp_dir = rng.uniform(0, 2 * np.pi, n)
        amp = np.column_stack([np.cos(amp_dir), np.sin(amp_dir)]) * (amp_um / xenium_pixel_size_um)[:, None]
        warp = np.column_stack([amp, freq, rng.uniform(0, 2 * np.pi, n)])
    return TrueTransform(affine=affine, warp=warp), (int(he_size[0]), int(he_size[1]))
