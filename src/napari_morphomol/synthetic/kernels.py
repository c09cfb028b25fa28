"""Compiled inner loops of the synthetic sample generator (per point and per stamped pixel)."""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def owner_kernel(x, y, lx, ly, lr2, lcell, row_len, nx, ny, reach, node_um, out):
    """Nearest cell centre among the (2 reach + 1)^2 nodes around each point, if within its radius."""
    for i in range(x.shape[0]):
        jx = min(max(int(math.floor(x[i] / node_um)), 0), nx - 1)
        jy = min(max(int(math.floor(y[i] / node_um)), 0), ny - 1)
        best = np.float32(3e38)
        best_k = (jy + reach) * row_len + jx + reach
        for oy in range(-reach, reach + 1):
            base = (jy + reach + oy) * row_len + jx + reach
            for ox in range(-reach, reach + 1):
                k = base + ox
                dx = x[i] - lx[k]
                dy = y[i] - ly[k]
                d2 = dx * dx + dy * dy
                if d2 < best:
                    best = d2
                    best_k = k
        out[i] = lcell[best_k] if best < lr2[best_k] else -1


@numba.njit(cache=True, nogil=True)
def stamp_kernel(
    wx, wy, centre_col, centre_row, cx, cy, a, b, angle, weight, vesicular, label, px_um, intensity, cover, labels
):
    """Add each nucleus (an ellipse with a one-pixel soft edge) into the chunk images.

    wx, wy: world um of every pixel centre; centre_col/row: nucleus centre in chunk px.
    intensity += coverage * weight * (1 - vesicular * (1 - rho^2)), rho the normalised radius
    (a lighter centre for open chromatin); cover += coverage; labels = label where coverage >= 0.5.
    """
    height, width = wx.shape
    for i in range(cx.shape[0]):
        half = int(math.ceil(a[i] / px_um)) + 2
        c0 = int(math.floor(centre_col[i]))
        r0 = int(math.floor(centre_row[i]))
        cos_a = math.cos(angle[i])
        sin_a = math.sin(angle[i])
        edge = b[i] / px_um
        for r in range(max(r0 - half, 0), min(r0 + half + 1, height)):
            for c in range(max(c0 - half, 0), min(c0 + half + 1, width)):
                dx = wx[r, c] - cx[i]
                dy = wy[r, c] - cy[i]
                along = (dx * cos_a + dy * sin_a) / a[i]
                across = (-dx * sin_a + dy * cos_a) / b[i]
                rho = math.sqrt(along * along + across * across)
                value = (1.0 - rho) * edge + 0.5
                if value <= 0.0:
                    continue
                if value > 1.0:
                    value = 1.0
                intensity[r, c] += value * weight[i] * (1.0 - vesicular[i] * (1.0 - rho * rho))
                cover[r, c] += value
                if value >= 0.5:
                    labels[r, c] = label[i]


@numba.njit(cache=True, nogil=True, inline="always")
def _xorshift32(state):
    state ^= (state << 13) & 0xFFFFFFFF
    state ^= state >> 17
    state ^= (state << 5) & 0xFFFFFFFF
    return state


@numba.njit(cache=True, nogil=True)
def beer_lambert_kernel(hema, eosin, h_od, e_od, glass_od, noise, seed, out):
    """RGB = 255 * 10^-(hema * h_od + eosin * e_od + glass_od) plus sensor noise, as uint8.

    The noise is a sum of two uniforms (triangular, sd ``noise``) from a xorshift stream
    seeded per chunk, so chunks are reproducible and cheap.
    """
    state = (seed & 0xFFFFFFFF) | 1
    scale = noise * math.sqrt(6.0) / 4294967296.0
    height, width = hema.shape
    for r in range(height):
        for c in range(width):
            h = hema[r, c]
            e = eosin[r, c]
            for k in range(3):
                state = _xorshift32(state)
                u1 = float(state)
                state = _xorshift32(state)
                u2 = float(state)
                od = h * h_od[k] + e * e_od[k] + glass_od[k]
                v = 255.0 * math.exp(-2.302585092994046 * od) + (u1 + u2 - 4294967296.0) * scale
                out[r, c, k] = np.uint8(min(max(v + 0.5, 0.0), 255.0))
