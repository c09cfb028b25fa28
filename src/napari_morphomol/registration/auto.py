"""Automatic starting landmarks: H&E hematoxylin vs Xenium DAPI, no clicks.

1. Coarse: both images at one low resolution (``coarse_um`` per px, from pyramid levels, never
   full resolution), hematoxylin from ``skimage.color.rgb2hed``. The H&E is rotated through a
   full turn; for each angle ``skimage.registration.phase_cross_correlation`` finds the shift
   and the Pearson correlation of the overlap scores it. The best angle is refined finely.
   H&E px scale comes from the two pixel sizes; mirror images are not searched.
2. Fine: on a grid over the Xenium image, a DAPI patch (at the pyramid level nearest
   ``fine_um``) and the H&E warped onto it by the coarse transform are phase-correlated again
   (sub-pixel). Each confident match becomes a landmark pair; weak matches are dropped.

The pairs are proposals: fit them like clicked pairs, inspect their residuals, edit them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.registration import phase_cross_correlation
from skimage.transform import rescale

from napari_morphomol.coords import napari_affine
from napari_morphomol.elements import HE_IMAGE, MORPHOLOGY, element_levels_cyx, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.registration.fit import FitOptions, fit_transform
from napari_morphomol.registration.landmarks import LandmarkPairs

COARSE_MAX_SIDE_PX = 320
"""The coarse resolution is lowered until the larger image is at most this many px across."""
MIN_MATCH_CORRELATION = 0.3
"""Local matches whose correlation after alignment is below this are not proposed."""
MIN_COARSE_CORRELATION = 0.15
MIN_OVERLAP = 0.25
"""A shift that overlaps less than this share of the smaller image's tissue is not a match
(tiny overlaps correlate well by chance)."""
MAX_COARSE_READ_PX = 8192 * 8192
"""The coarse step refuses to read a level larger than this (an image without a pyramid)."""
REFINEMENT_ROUNDS = 2
"""Local matching is redone from the affine of the previous round: the residual motion in each
patch is then almost a pure shift, which phase correlation measures without bias."""


@dataclass(frozen=True, eq=False)
class AutoRegistration:
    """Proposed landmark pairs, the coarse transform they refine, and how well each matched."""

    pairs: LandmarkPairs
    coarse_matrix: np.ndarray
    """H&E px -> ``global`` px from the rotation search alone."""
    angle_deg: float
    coarse_correlation: float
    match_correlation: np.ndarray
    """Per proposed pair: correlation of the two patches after the local shift."""


def _level_index(levels: list, full_px_um: float, target_um: float) -> int:
    """Coarsest pyramid level whose pixels are no larger than ``target_um``."""
    full_width = levels[0].shape[-1]
    best = 0
    for i, level in enumerate(levels):
        if full_px_um * full_width / level.shape[-1] <= target_um * 1.001:
            best = i
    return best


def _index_scaling(from_shape_yx, to_shape_yx) -> np.ndarray:
    """Pixel-index map between two grids of one image (edges aligned): index i <-> (i + .5) s - .5."""
    sy, sx = to_shape_yx[0] / from_shape_yx[0], to_shape_yx[1] / from_shape_yx[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def _hematoxylin(rgb_cyx: np.ndarray) -> np.ndarray:
    hema = rgb2hed(np.moveaxis(np.asarray(rgb_cyx)[:3], 0, -1))[..., 0]
    return np.clip(hema - np.percentile(hema, 5), 0.0, None)


def _dapi(dapi: np.ndarray) -> np.ndarray:
    img = np.asarray(dapi, dtype=np.float64)
    return np.clip(img - np.percentile(img, 5), 0.0, None)


def _standardise(img: np.ndarray, smooth_px: float) -> np.ndarray:
    img = ndimage.gaussian_filter(img, smooth_px) if smooth_px > 0 else img
    scale = img.std()
    return img / scale if scale > 0 else img


def _correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if mask.sum() < 16:
        return -1.0
    x, y = a[mask], b[mask]
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else -1.0


def _rotation(angle_deg: float, about_xy, to_xy) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return _translation(to_xy) @ rot @ _translation(-np.asarray(about_xy))


def _translation(xy) -> np.ndarray:
    m = np.eye(3)
    m[:2, 2] = xy
    return m


def _warp(img: np.ndarray, out_to_in_xy: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resample ``img`` on a grid of ``shape``; ``out_to_in_xy`` maps output px to input px (x, y)."""
    return ndimage.affine_transform(img, napari_affine(out_to_in_xy), output_shape=shape, order=order, cval=0.0)


def _match(fixed: np.ndarray, moving: np.ndarray, valid: np.ndarray, upsample: int) -> tuple[np.ndarray, float]:
    """Shift (x, y) that moves ``moving`` onto ``fixed``, and the correlation it achieves."""
    shift_rc = phase_cross_correlation(fixed, moving, upsample_factor=upsample, normalization="phase")[0]
    moved = ndimage.shift(moving, shift_rc, order=1, cval=0.0)
    moved_valid = ndimage.shift(valid.astype(float), shift_rc, order=0, cval=0.0) > 0.5
    overlap = moved_valid & (fixed > 0)
    if overlap.sum() < MIN_OVERLAP * min(valid.sum(), (fixed > 0).sum()):
        return shift_rc[::-1].copy(), -1.0
    return shift_rc[::-1].copy(), _correlation(fixed, moved, overlap)


def propose_landmarks(
    he_levels_cyx: list,
    he_pixel_size_um: float,
    dapi_levels_cyx: list,
    xenium_pixel_size_um: float,
    *,
    coarse_um: float = 8.0,
    fine_um: float = 2.0,
    grid: tuple[int, int] = (4, 4),
    patch_um: float = 400.0,
    angle_step_deg: float = 3.0,
) -> AutoRegistration:
    """Landmark pairs found automatically between an H&E pyramid and a DAPI pyramid.

    Levels are (c, y, x) arrays (numpy or dask; only the levels used are read), full
    resolution first: the H&E as RGB, the morphology image with DAPI as channel 0.
    """
    he_full = he_levels_cyx[0].shape[-2:]
    dapi_full = dapi_levels_cyx[0].shape[-2:]
    extent_um = max(max(he_full) * he_pixel_size_um, max(dapi_full) * xenium_pixel_size_um)
    coarse_um = max(coarse_um, extent_um / COARSE_MAX_SIDE_PX)

    def coarse_image(levels, px_um, prepare):
        i = _level_index(levels, px_um, coarse_um)
        if np.prod(levels[i].shape[-2:]) > MAX_COARSE_READ_PX:
            raise InputError(
                f"the image has no pyramid level near {coarse_um:g} um/px (coarsest is "
                f"{levels[-1].shape[-1]} px wide); write it as a pyramidal OME-TIFF first, e.g. "
                "`vips tiffsave in.tif out.ome.tif --tile --pyramid`"
            )
        level = np.asarray(levels[i])
        img = prepare(level)
        level_um = px_um * levels[0].shape[-1] / level.shape[-1]
        img = rescale(img, level_um / coarse_um, anti_aliasing=True, preserve_range=True)
        to_coarse = _index_scaling(levels[0].shape[-2:], img.shape)
        return _standardise(img, 1.0), to_coarse

    he_img, he_to_coarse = coarse_image(he_levels_cyx, he_pixel_size_um, _hematoxylin)
    dapi_img, dapi_to_coarse = coarse_image(dapi_levels_cyx, xenium_pixel_size_um, lambda lv: _dapi(lv[0]))

    side = int(np.ceil(1.2 * max(np.hypot(*he_img.shape), np.hypot(*dapi_img.shape))))
    canvas_centre = np.array([side / 2 - 0.5, side / 2 - 0.5])
    dapi_offset = canvas_centre - (np.array(dapi_img.shape[::-1]) / 2 - 0.5)
    fixed = np.zeros((side, side))
    oy, ox = np.round(dapi_offset[::-1]).astype(int)
    dapi_offset = np.array([ox, oy], dtype=float)
    fixed[oy : oy + dapi_img.shape[0], ox : ox + dapi_img.shape[1]] = dapi_img
    he_centre = np.array(he_img.shape[::-1]) / 2 - 0.5

    def try_angle(angle: float, upsample: int):
        m = _rotation(angle, he_centre, canvas_centre)
        inverse = np.linalg.inv(m)
        moving = _warp(he_img, inverse, fixed.shape)
        valid = _warp(np.ones_like(he_img), inverse, fixed.shape) > 0.5
        shift_xy, score = _match(fixed, moving, valid, upsample)
        return score, m, shift_xy

    angles = np.arange(0.0, 360.0, angle_step_deg)
    scores = [try_angle(a, 1)[0] for a in angles]
    best = float(angles[int(np.argmax(scores))])
    for step in (angle_step_deg / 4, angle_step_deg / 16):
        fine = best + step * np.arange(-4, 5)
        best = float(fine[int(np.argmax([try_angle(a, 1)[0] for a in fine]))])
    score, rot, shift_xy = try_angle(best, 20)
    if score < MIN_COARSE_CORRELATION:
        raise InputError(
            f"automatic registration found no convincing match (best correlation {score:.2f} at "
            f"{best:.1f} deg): the H&E may be mirrored, of another section, or the pixel sizes "
            "wrong. Click landmark pairs by hand instead."
        )
    coarse = (
        np.linalg.inv(dapi_to_coarse) @ _translation(-dapi_offset) @ _translation(shift_xy) @ rot @ he_to_coarse
    )
    start = coarse
    for _ in range(REFINEMENT_ROUNDS):
        pairs, match_scores = _refine_on_grid(
            start, he_levels_cyx, he_pixel_size_um, dapi_levels_cyx, xenium_pixel_size_um, fine_um, grid, patch_um
        )
        start = fit_transform(pairs, FitOptions("affine"), leave_one_out=False).matrix
    return AutoRegistration(
        pairs=pairs, coarse_matrix=coarse, angle_deg=best % 360.0, coarse_correlation=score,
        match_correlation=match_scores,
    )


def _refine_on_grid(coarse, he_levels, he_px_um, dapi_levels, xen_px_um, fine_um, grid, patch_um):
    di = _level_index(dapi_levels, xen_px_um, fine_um)
    hi = _level_index(he_levels, he_px_um, fine_um)
    dapi_level, he_level = dapi_levels[di], he_levels[hi]
    dapi_from_full = _index_scaling(dapi_levels[0].shape[-2:], dapi_level.shape[-2:])
    he_from_full = _index_scaling(he_levels[0].shape[-2:], he_level.shape[-2:])
    level_um = xen_px_um * dapi_levels[0].shape[-1] / dapi_level.shape[-1]
    half = int(round(patch_um / level_um / 2))
    height, width = dapi_level.shape[-2:]
    # grid of patch centres in the DAPI level, each patch inside the image
    xs = np.linspace(half, width - half - 1, grid[0]) if width > 2 * half + 1 else np.array([])
    ys = np.linspace(half, height - half - 1, grid[1]) if height > 2 * half + 1 else np.array([])
    level_to_he = he_from_full @ np.linalg.inv(coarse) @ np.linalg.inv(dapi_from_full)
    he_pts, glob_pts, scores = [], [], []
    for cy in np.round(ys).astype(int):
        for cx in np.round(xs).astype(int):
            y0, x0 = cy - half, cx - half
            dapi_patch = _dapi(np.asarray(dapi_level[0, y0 : y0 + 2 * half, x0 : x0 + 2 * half]))
            if dapi_patch.max() <= 0:
                continue
            # H&E window that covers the patch once mapped, read alone from its level
            corners = np.array(
                [[x0, y0, 1], [x0 + 2 * half, y0, 1], [x0, y0 + 2 * half, 1], [x0 + 2 * half, y0 + 2 * half, 1]], float
            )
            he_corners = (level_to_he @ corners.T)[:2].T
            lo = np.floor(he_corners.min(axis=0)).astype(int) - 4
            hi_ = np.ceil(he_corners.max(axis=0)).astype(int) + 4
            if np.any(lo < 0) or hi_[0] >= he_level.shape[-1] or hi_[1] >= he_level.shape[-2]:
                continue
            he_window = _hematoxylin(np.asarray(he_level[:, lo[1] : hi_[1], lo[0] : hi_[0]]))
            patch_to_window = _translation(-lo) @ level_to_he @ _translation([x0, y0])
            moving = _warp(he_window, patch_to_window, dapi_patch.shape)
            fixed = _standardise(dapi_patch, 1.0)
            moving = _standardise(moving, 1.0)
            shift_xy, score = _match(fixed, moving, np.ones_like(moving, dtype=bool), 20)
            if score < MIN_MATCH_CORRELATION or np.abs(shift_xy).max() > half / 2:
                continue
            centre_level = np.array([cx, cy, 1.0])
            g_full = np.linalg.inv(dapi_from_full) @ centre_level
            # the H&E feature seen at (centre - shift) in the warped patch sits at centre in DAPI
            he_full = np.linalg.inv(coarse) @ np.linalg.inv(dapi_from_full) @ (centre_level - np.r_[shift_xy, 0.0])
            glob_pts.append(g_full[:2])
            he_pts.append(he_full[:2])
            scores.append(score)
    if len(he_pts) < 3:
        raise InputError(
            f"automatic registration matched only {len(he_pts)} places well enough (need 3): "
            "the images may show little tissue in common. Click landmark pairs by hand instead."
        )
    names = [f"auto-{i}" for i in range(len(he_pts))]
    return LandmarkPairs.from_arrays(np.array(he_pts), np.array(glob_pts), names), np.array(scores)


def propose_landmarks_for_sample(
    sdata, *, he_key: str = HE_IMAGE, morphology_key: str = MORPHOLOGY, **kwargs
) -> AutoRegistration:
    """:func:`propose_landmarks` on a sample opened by ``napari_morphomol.io.load_sample``."""
    info = sample_info(sdata)
    for key in (he_key, morphology_key):
        if key not in sdata.images:
            raise InputError(f"automatic registration needs the image {key!r}; the sample has {list(sdata.images)}")
    if info.he_pixel_size_um is None or info.xenium_pixel_size_um is None:
        raise InputError("automatic registration needs both pixel sizes; load the sample with the H&E pixel size")

    return propose_landmarks(element_levels_cyx(sdata.images[he_key]), info.he_pixel_size_um,
                             element_levels_cyx(sdata.images[morphology_key]), info.xenium_pixel_size_um, **kwargs)
