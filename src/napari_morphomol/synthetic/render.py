"""Rendering of image chunks (DAPI + label masks, H&E) from the synthetic cells.

Every chunk is rendered from the world position (um) of each of its pixel centres, so the H&E
follows the true transform exactly. Nuclei are stamped: each cell touches only a small box
of pixels around its centre, evaluated vectorised per batch of cells. Chunks are rendered with
a margin and cropped after blurring, so chunk seams do not show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_morphomol.synthetic.kernels import beer_lambert_kernel, stamp_kernel
from napari_morphomol.synthetic.tissue import (
    BACKGROUND,
    NECROSIS,
    STROMA,
    Cells,
    TissueFields,
    cells_in_box,
    owning_cell,
)

MARGIN_PX = 6

# Ruifrok & Johnston optical-density vectors, perturbed per slide.
_HEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
_EOSIN_OD = np.array([0.072, 0.990, 0.105])

# Eosin between cells, per region (background, stroma, tumour, immune, necrosis).
_REGION_EOSIN = np.array([0.0, 0.55, 0.3, 0.25, 0.8], dtype=np.float32)
_REGION_HEMATOXYLIN = np.array([0.0, 0.04, 0.06, 0.06, 0.12], dtype=np.float32)


@dataclass(frozen=True)
class Stain:
    """Per-slide H&E appearance."""

    hematoxylin_od: np.ndarray
    eosin_od: np.ndarray
    glass_od: np.ndarray
    hematoxylin_gain: float
    eosin_gain: float
    blur_px: float
    noise: float

    def as_json(self) -> dict:
        return {
            "hematoxylin_od": self.hematoxylin_od.tolist(),
            "eosin_od": self.eosin_od.tolist(),
            "glass_od": self.glass_od.tolist(),
            "hematoxylin_gain": self.hematoxylin_gain,
            "eosin_gain": self.eosin_gain,
            "blur_px": self.blur_px,
            "noise": self.noise,
        }


def random_stain(rng: np.random.Generator) -> Stain:
    def perturb(v):
        w = v * np.exp(rng.normal(0, 0.08, 3))
        return w / np.linalg.norm(w)

    return Stain(
        hematoxylin_od=perturb(_HEMATOXYLIN_OD),
        eosin_od=perturb(_EOSIN_OD),
        glass_od=rng.uniform(0.02, 0.05, 3),
        hematoxylin_gain=float(rng.uniform(0.85, 1.15)),
        eosin_gain=float(rng.uniform(0.3, 0.45)),
        blur_px=float(rng.uniform(0.6, 1.0)),
        noise=float(rng.uniform(2.0, 4.0)),
    )


#: A stain no cohort sample has: brown hematoxylin (absorbing blue, like an over-oxidised or
#: DAB-like counterstain) and a strong magenta eosin.
_UNSEEN_HEMATOXYLIN_OD = np.array([0.30, 0.55, 0.78])
_UNSEEN_EOSIN_OD = np.array([0.45, 0.85, 0.25])


def unseen_stain(rng: np.random.Generator) -> Stain:
    """A slide stained unlike any of :func:`random_stain`'s (the trust benchmark's stain shift)."""
    return Stain(
        hematoxylin_od=_UNSEEN_HEMATOXYLIN_OD / np.linalg.norm(_UNSEEN_HEMATOXYLIN_OD),
        eosin_od=_UNSEEN_EOSIN_OD / np.linalg.norm(_UNSEEN_EOSIN_OD),
        glass_od=rng.uniform(0.02, 0.05, 3),
        hematoxylin_gain=float(rng.uniform(1.3, 1.5)),
        eosin_gain=float(rng.uniform(0.8, 0.9)),
        blur_px=float(rng.uniform(0.6, 1.0)),
        noise=float(rng.uniform(2.0, 4.0)),
    )


def _stamp(
    cells: Cells, rows: np.ndarray, centre_px: np.ndarray, wx: np.ndarray, wy: np.ndarray, px_um: float,
    weight: np.ndarray,
):
    """Nuclei of ``rows`` drawn into the chunk: weighted intensity, coverage, labels (row + 1)."""
    intensity = np.zeros(wx.shape, dtype=np.float32)
    cover = np.zeros(wx.shape, dtype=np.float32)
    labels = np.zeros(wx.shape, dtype=np.uint32)
    stamp_kernel(
        wx,
        wy,
        np.ascontiguousarray(centre_px[:, 0], dtype=np.float64),
        np.ascontiguousarray(centre_px[:, 1], dtype=np.float64),
        cells.x_um[rows].astype(np.float32),
        cells.y_um[rows].astype(np.float32),
        cells.nucleus_a_um[rows],
        cells.nucleus_b_um[rows],
        cells.nucleus_angle[rows],
        weight[rows].astype(np.float32),
        cells.vesicular[rows],
        (rows + 1).astype(np.uint32),
        np.float32(px_um),
        intensity,
        cover,
        labels,
    )
    return intensity, np.minimum(cover, np.float32(1.0)), labels


def _coarse(a: np.ndarray, step: int) -> np.ndarray:
    """One sample per step x step block (its centre, clipped at the edges)."""
    rows = np.minimum(np.arange(0, a.shape[0], step) + step // 2, a.shape[0] - 1)
    cols = np.minimum(np.arange(0, a.shape[1], step) + step // 2, a.shape[1] - 1)
    return a[np.ix_(rows, cols)]


def _upsample(a: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(a, step, axis=0), step, axis=1)[: shape[0], : shape[1]]


def _texture(rng: np.random.Generator, shape: tuple[int, int], amount: float) -> np.ndarray:
    """Chromatin grain: pixel noise around 1 (the optical blur that follows smooths it)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(amount)
    noise += np.float32(1.0)
    return noise


def render_morphology_chunk(
    cells: Cells,
    fields: TissueFields,
    pixel_size_um: float,
    col0: int,
    row0: int,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DAPI (uint16) and nucleus / cell label images (uint32, label = cell row + 1)."""
    m = MARGIN_PX
    cols = np.arange(col0 - m, col0 + width + m)
    rows = np.arange(row0 - m, row0 + height + m)
    wx = np.broadcast_to(((cols + 0.5) * pixel_size_um).astype(np.float32)[None, :], (len(rows), len(cols)))
    wy = np.broadcast_to(((rows + 0.5) * pixel_size_um).astype(np.float32)[:, None], (len(rows), len(cols)))
    wx, wy = np.ascontiguousarray(wx), np.ascontiguousarray(wy)
    shape = wx.shape

    box = cells_in_box(cells, float(wx[0, 0]), float(wy[0, 0]), float(wx[-1, -1]), float(wy[-1, -1]))
    centre_px = np.column_stack(
        [cells.x_um[box] / pixel_size_um - (col0 - m), cells.y_um[box] / pixel_size_um - (row0 - m)]
    )
    nuclei, _, nucleus_labels = _stamp(cells, box, centre_px, wx, wy, pixel_size_um, cells.dapi)

    step = 2
    owner = owning_cell(cells, _coarse(wx, step), _coarse(wy, step))
    cell_labels = _upsample((owner + 1).astype(np.uint32), step, shape)
    cell_labels = np.where(nucleus_labels > 0, nucleus_labels, cell_labels)

    region_step = 8
    region = fields.region(_coarse(wx, region_step), _coarse(wy, region_step))
    background = _upsample(np.where(region == BACKGROUND, 0.015, 0.05).astype(np.float32), region_step, shape)
    signal = ndimage.gaussian_filter(nuclei * _texture(rng, shape, 0.25) + background, 1.1)
    dapi = np.float32(120.0) + np.float32(1800.0) * signal
    dapi += rng.standard_normal(shape, dtype=np.float32) * np.sqrt(dapi) * np.float32(1.5)
    crop = (slice(m, m + height), slice(m, m + width))
    return (
        np.clip(dapi[crop], 0, 65535).astype(np.uint16),
        np.ascontiguousarray(nucleus_labels[crop]),
        np.ascontiguousarray(cell_labels[crop]),
    )


def render_he_chunk(
    cells: Cells,
    fields: TissueFields,
    transform,
    xenium_pixel_size_um: float,
    he_pixel_size_um: float,
    stain: Stain,
    col0: int,
    row0: int,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """RGB uint8 H&E chunk (Beer-Lambert mix of hematoxylin and eosin) of the H&E pixel grid."""
    m = MARGIN_PX
    cols = np.arange(col0 - m, col0 + width + m)
    rows = np.arange(row0 - m, row0 + height + m)
    wx, wy = transform.he_grid_to_world_um(cols, rows, xenium_pixel_size_um)
    shape = wx.shape

    box = cells_in_box(cells, float(wx.min()), float(wy.min()), float(wx.max()), float(wy.max()))
    centres_global = np.column_stack([cells.x_um[box], cells.y_um[box]]) / xenium_pixel_size_um
    centre_px = transform.global_to_he_px(centres_global) - np.array([col0 - m, row0 - m])
    nuclear_h, nuclear_cover, _ = _stamp(cells, box, centre_px, wx, wy, he_pixel_size_um, cells.darkness)

    step = 2
    cx, cy = _coarse(wx, step), _coarse(wy, step)
    region = fields.region(cx, cy)
    owner = owning_cell(cells, cx, cy)
    eosin = np.where(owner >= 0, cells.eosin[np.maximum(owner, 0)], _REGION_EOSIN[region])
    loose = (owner < 0) & (region == STROMA)
    fibres = np.float32(0.5) + np.float32(0.5) * np.sin(fields.fibre_phase(cx[loose], cy[loose]))
    eosin[loose] *= np.float32(0.7) + np.float32(0.5) * fibres * fibres
    debris = (region == NECROSIS) & (rng.random(cx.shape, dtype=np.float32) < 0.08)
    hema_bg = np.where(owner >= 0, cells.cytoplasm_hematoxylin[np.maximum(owner, 0)], _REGION_HEMATOXYLIN[region])
    hema_bg = hema_bg + np.where(debris, np.float32(0.6), np.float32(0.0))

    eosin = _upsample(eosin.astype(np.float32), step, shape) * (np.float32(1.0) - np.float32(0.7) * nuclear_cover)
    hema = _upsample(hema_bg.astype(np.float32), step, shape) + nuclear_h * _texture(rng, shape, 0.3)
    hema = ndimage.gaussian_filter(hema, stain.blur_px) * np.float32(stain.hematoxylin_gain)
    eosin = ndimage.gaussian_filter(eosin, stain.blur_px) * np.float32(stain.eosin_gain)
    crop = (slice(m, m + height), slice(m, m + width))
    hema, eosin = hema[crop], eosin[crop]
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    beer_lambert_kernel(
        np.ascontiguousarray(hema),
        np.ascontiguousarray(eosin),
        stain.hematoxylin_od.astype(np.float32),
        stain.eosin_od.astype(np.float32),
        stain.glass_od.astype(np.float32),
        np.float32(stain.noise),
        int(rng.integers(1, 2**32 - 1)),
        rgb,
    )
    return rgb
