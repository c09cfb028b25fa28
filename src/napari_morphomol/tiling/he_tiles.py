"""H&E tiles for the model: 512 px at 0.5 um/px resized to 224 px by area averaging, uint8.

Tiles overlap 4x, so instead of decoding a window per tile we resample the image once onto the
global grid of resized pixels (16 per token, see :mod:`.geometry`): each stored chunk of the chosen
pyramid level is decoded once and area-averaged straight from its native pixels into that grid,
and tile ``(i, j)`` is a plain slice of it. Rows of the grid are kept only until the last tile
that needs them has been cut, so memory is a few tile rows, whatever the slide size.

Output pixel ``k`` covers tokens ``[k / 16, (k + 1) / 16)``; its value is the exact area average
of the level pixels it overlaps (fractional overlaps weighted), rounded to uint8 once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from napari_morphomol.errors import InputError
from napari_morphomol.tiling.geometry import TileGeometry, pick_pyramid_level


def area_weights(out_start: int, out_count: int, step: float, in_start: int, in_count: int) -> sp.csr_array:
    """(out_count x in_count) weights of input pixels ``[in_start, in_start + in_count)`` in output
    pixels ``[out_start, out_start + out_count)`` of size ``step`` input px: overlap / step."""
    k = np.arange(out_start, out_start + out_count, dtype=np.float64)
    lo, hi = k * step, (k + 1) * step
    width = int(np.ceil(step)) + 1
    first = np.floor(lo).astype(np.int64)
    m = first[:, None] + np.arange(width)[None, :]
    overlap = np.minimum(hi[:, None], m + 1) - np.maximum(lo[:, None], m)
    keep = (overlap > 0) & (m >= in_start) & (m < in_start + in_count)
    rows = np.broadcast_to(np.arange(out_count)[:, None], m.shape)[keep]
    return sp.csr_array(
        ((overlap[keep] / step).astype(np.float32), (rows, m[keep] - in_start)), shape=(out_count, in_count)
    )


def resample_block(block_yxc: np.ndarray, wy: sp.csr_array, wx: sp.csr_array) -> np.ndarray:
    """Weighted sums ``wy @ block @ wx.T`` per channel: (out rows, out cols, channels) float32."""
    h, w, c = block_yxc.shape
    cols = wx @ np.ascontiguousarray(block_yxc.transpose(1, 0, 2), dtype=np.float32).reshape(w, h * c)
    cols = cols.reshape(wx.shape[0], h, c).transpose(1, 0, 2).reshape(h, wx.shape[0] * c)
    return (wy @ cols).reshape(wy.shape[0], wx.shape[0], c)


def _chunk_edges(array, axis: int, default: int = 1024) -> np.ndarray:
    """Boundaries of the stored chunks along an axis (dask or zarr), or regular blocks."""
    size = array.shape[axis]
    chunks = getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], tuple):  # dask
        return np.concatenate([[0], np.cumsum(chunks[axis])])
    step = chunks[axis] if isinstance(chunks, tuple) else default
    return np.unique(np.append(np.arange(0, size, step), size))


class LevelSampler:
    """The resampling of one pyramid level onto the resized-pixel grid of ``geometry``."""

    def __init__(self, geometry: TileGeometry, levels_yxc: Sequence, *, level: int | None = None) -> None:
        if not levels_yxc:
            raise InputError("no H&E image levels given")
        shapes = [tuple(int(s) for s in lv.shape[:2]) for lv in levels_yxc]
        full_h, full_w = shapes[0]
        if (full_h, full_w) != (geometry.he_height_px, geometry.he_width_px):
            raise InputError(
                f"the H&E image is {full_w} x {full_h} px but the tile geometry was made for "
                f"{geometry.he_width_px} x {geometry.he_height_px} px"
            )
        for lv in levels_yxc:
            if lv.ndim != 3 or lv.shape[2] != 3:
                raise InputError(f"H&E levels must be (height, width, 3) RGB arrays, got shape {lv.shape}")
        self.geometry = geometry
        self.level = pick_pyramid_level(shapes, geometry.he_pixel_size_um,
                                        geometry.tile_pixel_size_um) if level is None else level
        self.array = levels_yxc[self.level]
        h, w = shapes[self.level]
        # size of one resized pixel in level px, per axis
        per_cell = geometry.image_px_per_token * geometry.tokens_per_he_px
        self.step_x = 1.0 / (per_cell * full_w / w)
        self.step_y = 1.0 / (per_cell * full_h / h)
        self.level_shape = (h, w)

    def out_span_px(self, tile_index: int) -> tuple[int, int]:
        """Resized-grid pixels [start, stop) of tile row/col ``tile_index``."""
        per_stride = self.geometry.image_px_per_token * self.geometry.stride_tokens
        start = tile_index * per_stride
        return start, start + self.geometry.image_px

    def in_span(self, out_start: int, out_stop: int, step: float, size: int) -> tuple[int, int]:
        return max(0, int(np.floor(out_start * step))), min(size, int(np.ceil(out_stop * step)))

    def read_window(self, row: int, col: int) -> np.ndarray:
        """One tile decoded from its own window (the per-window way; for comparison and single tiles)."""
        r0, r1 = self.out_span_px(row)
        c0, c1 = self.out_span_px(col)
        y0, y1 = self.in_span(r0, r1, self.step_y, self.level_shape[0])
        x0, x1 = self.in_span(c0, c1, self.step_x, self.level_shape[1])
        block = np.asarray(self.array[y0:y1, x0:x1])
        out = resample_block(block, area_weights(r0, r1 - r0, self.step_y, y0, y1 - y0),
                             area_weights(c0, c1 - c0, self.step_x, x0, x1 - x0))
        return _to_uint8(out)

    def iter_tiles(self, rows: np.ndarray, cols: np.ndarray, *, batch_size: int = 64
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, images)``: indices into ``rows``/``cols`` and (B, 224, 224, 3) uint8,
        tile rows in increasing order, each stored chunk decoded once."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if len(rows) == 0:
            return
        order = np.lexsort((cols, rows))
        tile_rows = np.unique(rows)
        c_lo, _ = self.out_span_px(int(cols.min()))
        _, c_hi = self.out_span_px(int(cols.max()))
        x0, x1 = self.in_span(c_lo, c_hi, self.step_x, self.level_shape[1])
        n_out_cols = c_hi - c_lo
        y_edges = _chunk_edges(self.array, 0)
        x_edges = _chunk_edges(self.array, 1)
        x_blocks = []  # (input cols, output cols relative to c_lo, weights) per chunk column
        for xa, xb in zip(x_edges[:-1], x_edges[1:], strict=True):
            oc0 = max(c_lo, int(np.floor(xa / self.step_x)))
            oc1 = min(c_hi, int(np.ceil(xb / self.step_x)))
            if xb > x0 and xa < x1 and oc1 > oc0:
                wx = area_weights(oc0, oc1 - oc0, self.step_x, int(xa), int(xb - xa))
                x_blocks.append((int(xa), int(xb), oc0 - c_lo, oc1 - c_lo, wx))

        acc_lo = self.out_span_px(int(tile_rows[0]))[0]  # first resized row held in ``acc``
        acc = np.zeros((0, n_out_cols, 3), dtype=np.float32)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        n_pending = 0
        next_row = 0  # index into tile_rows of the next tile row to cut
        for ya, yb in zip(y_edges[:-1], y_edges[1:], strict=True):
            if next_row >= len(tile_rows):
                break
            r_first = self.out_span_px(int(tile_rows[next_row]))[0]
            r_need = self.in_span(r_first, r_first + 1, self.step_y, self.level_shape[0])[0]
            if yb <= r_need:
                continue  # no remaining tile touches this chunk row
            lo = max(int(np.floor(ya / self.step_y)), acc_lo)
            hi = int(np.ceil(yb / self.step_y))
            if hi > acc_lo + len(acc):
                acc = np.concatenate([acc, np.zeros((hi - acc_lo - len(acc), n_out_cols, 3), np.float32)])
            if hi > lo:
                wy = area_weights(lo, hi - lo, self.step_y, int(ya), int(yb - ya))
                for xa, xb, oc0, oc1, wx in x_blocks:
                    block = np.asarray(self.array[ya:yb, xa:xb])
                    acc[lo - acc_lo:hi - acc_lo, oc0:oc1] += resample_block(block, wy, wx)
            # cut every tile row whose resized rows are now complete
            while next_row < len(tile_rows):
                i = int(tile_rows[next_row])
                r0, r1 = self.out_span_px(i)
                if self.in_span(r0, r1, self.step_y, self.level_shape[0])[1] > yb:
                    break
                band = _to_uint8(acc[r0 - acc_lo:r1 - acc_lo])
                members = order[rows[order] == i]
                for position in members:
                    cc0 = self.out_span_px(int(cols[position]))[0] - c_lo
                    pending.append((np.array([position]), band[:, cc0:cc0 + self.geometry.image_px][None]))
                    n_pending += 1
                    if n_pending >= batch_size:
                        yield _stack(pending)
                        pending, n_pending = [], 0
                next_row += 1
                if next_row < len(tile_rows):
                    keep_from = self.out_span_px(int(tile_rows[next_row]))[0]
                    if keep_from > acc_lo:
                        acc = acc[keep_from - acc_lo:].copy() if keep_from - acc_lo < len(acc) else acc[:0]
                        acc_lo = keep_from
        if pending:
            yield _stack(pending)


def _stack(pending: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p for p, _ in pending]), np.concatenate([im for _, im in pending])


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
