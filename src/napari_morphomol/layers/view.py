"""View maths for the docks, in numbers only: contrast limits, what the camera sees, clicks.

napari's world coordinates for our layers are um, in (row, col) = (y, x) order; everything here
takes and returns (x, y) in um (axis order through :mod:`napari_morphomol.coords`), so the docks
hand napari's camera and event values straight in and never swap axes or convert units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_morphomol.coords import napari_to_xy

CLICK_TOLERANCE_SCREEN_PX = 3.0
"""A press and release this far apart on screen (or less) is a click, not a drag."""


def percentile_limits(values, percentiles: tuple[float, float] = (1.0, 99.0), *,
                      symmetric: bool = False) -> tuple[float, float]:
    """Contrast limits from percentiles of the finite ``values`` (any shape).

    Parameters
    ----------
    values
        The pixel or point values shown.
    percentiles
        Low and high percentile; with ``symmetric`` only the high one is used, of ``|values|``.
    symmetric
        Limits ``(-h, h)`` about 0, for signed maps such as residuals.

    Returns
    -------
    tuple of float
        ``(low, high)`` with ``high > low`` always ((0, 1) when nothing is finite), so a flat map
        still gets a usable colour bar.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    if symmetric:
        high = float(np.percentile(np.abs(values), percentiles[1]))
        high = high if high > 0 else 1.0
        return (-high, high)
    low, high = (float(v) for v in np.percentile(values, percentiles))
    return (low, high if high > low else low + 1.0)


def camera_box_xy_um(center_rc_um: Sequence[float], zoom: float, canvas_size_hw: Sequence[int]) -> np.ndarray:
    """The corners (4, 2) of the box in view, as (x, y) um, from napari's camera and canvas.

    Parameters
    ----------
    center_rc_um
        ``viewer.scene.camera.center`` (the last two values are row, col in um).
    zoom
        ``viewer.scene.camera.zoom`` (screen px per um).
    canvas_size_hw
        ``viewer.canvas.size`` (height, width in screen px).

    Returns
    -------
    numpy.ndarray
        Corners in order top-left, top-right, bottom-right, bottom-left.
    """
    cx, cy = napari_to_xy(np.asarray(center_rc_um, dtype=np.float64)[-2:][None])[0]
    height_px, width_px = canvas_size_hw
    half_w, half_h = width_px / zoom / 2, height_px / zoom / 2
    return np.array([[cx - half_w, cy - half_h], [cx + half_w, cy - half_h],
                     [cx + half_w, cy + half_h], [cx - half_w, cy + half_h]])


def event_xy_um(position_rc_um: Sequence[float]) -> tuple[float, float]:
    """A mouse event's ``position`` (row, col in um, maybe with leading axes) as (x, y) um."""
    x, y = napari_to_xy(np.asarray(position_rc_um, dtype=np.float64)[-2:][None])[0]
    return float(x), float(y)


def is_click(press_rc_um: Sequence[float], release_rc_um: Sequence[float], zoom: float) -> bool:
    """Whether a press and a release (world positions, um) are one click rather than a drag."""
    moved_um = np.abs(np.asarray(release_rc_um, dtype=np.float64) - np.asarray(press_rc_um, dtype=np.float64)).max()
    return bool(moved_um * zoom <= CLICK_TOLERANCE_SCREEN_PX)


def rgba_image(values: np.ndarray, limits: tuple[float, float], colormap: str) -> np.ndarray:
    """(h, w) values -> (h, w, 4) contiguous uint8 RGBA through a matplotlib colormap between
    ``limits`` (clipped), e.g. for a small picture a dock draws itself."""
    from matplotlib import colormaps

    low, high = limits
    scaled = np.clip((np.asarray(values, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return np.ascontiguousarray((colormaps[colormap](scaled) * 255).astype(np.uint8))
