"""Which tiles hold tissue: a low-resolution tissue mask and per-tile background fractions."""

from __future__ import annotations

import numpy as np
import shapely

from napari_morphomol.errors import InputError
from napari_morphomol.tiling.geometry import TileGeometry


def pick_mask_level(level_shapes_yx: list[tuple[int, int]], he_pixel_size_um: float,
                    mask_pixel_size_um: float = 8.0) -> int:
    """Finest pyramid level at or coarser than ``mask_pixel_size_um`` (the last level when none is)."""
    full_h, full_w = level_shapes_yx[0]
    for index, (h, w) in enumerate(level_shapes_yx):
        if he_pixel_size_um * max(full_w / w, full_h / h) >= mask_pixel_size_um:
            return index
    return len(level_shapes_yx) - 1


def tissue_mask(rgb_yxc: np.ndarray, *, min_saturation: float = 0.08, max_brightness: int = 250) -> np.ndarray:
    """Stained tissue is coloured; glass is white-grey and scanner padding black or white.

    A pixel is tissue when its HSV-like saturation (max - min) / max reaches ``min_saturation``
    and it is not near-white.
    """
    rgb = np.asarray(rgb_yxc)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise InputError(f"a tissue mask needs an RGB image (height x width x 3), got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int16)
    hi = rgb.max(axis=2)
    lo = rgb.min(axis=2)
    saturation = (hi - lo) / np.maximum(hi, 1)
    return (saturation >= min_saturation) & (lo < max_brightness)


def tile_background_fraction(mask_yx: np.ndarray, mask_he_px_per_px_xy: tuple[float, float],
                             boxes_he_px: np.ndarray) -> np.ndarray:
    """Fraction of background mask pixels per tile box (mask pixels whose centre is in the box).

    ``mask_he_px_per_px_xy`` is the size of one mask pixel in native H&E px (x, y).
    """
    mask = np.asarray(mask_yx, dtype=bool)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    fx, fy = mask_he_px_per_px_xy
    boxes = np.asarray(boxes_he_px, dtype=np.float64)

    def first_index(edge: np.ndarray, factor: float, size: int) -> np.ndarray:
        # first mask pixel whose centre (k + 0.5) * factor lies at or after the edge
        return np.clip(np.ceil(edge / factor - 0.5), 0, size).astype(np.int64)

    x0 = first_index(boxes[:, 0], fx, mask.shape[1])
    x1 = first_index(boxes[:, 2], fx, mask.shape[1])
    y0 = first_index(boxes[:, 1], fy, mask.shape[0])
    y1 = first_index(boxes[:, 3], fy, mask.shape[0])
    tissue = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    return np.where(area > 0, 1.0 - tissue / np.maximum(area, 1), 1.0)


def tiles_in_region(geometry: TileGeometry, rows: np.ndarray, cols: np.ndarray,
                    region_he_px: np.ndarray) -> np.ndarray:
    """Tiles whose centre lies inside a polygon given as (N, 2) (x, y) H&E px vertices."""
    vertices = np.asarray(region_he_px, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3:
        raise InputError(f"a region must be a polygon of at least 3 (x, y) vertices, got shape {vertices.shape}")
    polygon = shapely.Polygon(vertices)
    if not polygon.is_valid:
        polygon = shapely.make_valid(polygon)
    boxes = geometry.tile_box_he_px(rows, cols)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return shapely.contains_xy(polygon, cx, cy)
