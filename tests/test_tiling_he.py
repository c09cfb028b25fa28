"""H&E tile reading: exact area averaging, one decode per stored chunk, geometry equal to the token grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.registration.transforms import AffineXY
from napari_morphomol.tiling import GenePanel, LevelSampler, TileGeometry, TokenMapping, bin_transcripts

XENIUM_PIXEL_SIZE_UM = 0.2125


class CountingArray:
    """A chunked (H, W, 3) array that records how often each stored chunk is decoded."""

    def __init__(self, data: np.ndarray, chunk: int) -> None:
        self.data, self.chunk = data, chunk
        self.shape, self.ndim, self.dtype = data.shape, data.ndim, data.dtype
        self.chunks = (chunk, chunk, data.shape[2])
        self.decodes = np.zeros((-(-data.shape[0] // chunk), -(-data.shape[1] // chunk)), dtype=np.int64)

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        self.decodes[
            ys.start // self.chunk:-(-ys.stop // self.chunk), xs.start // self.chunk:-(-xs.stop // self.chunk)
        ] += 1
        return self.data[key]


def reference_tile(image: np.ndarray, geometry: TileGeometry, i: int, j: int) -> np.ndarray:
    """Area average (float64, unrounded) of the tile's box into 224 x 224, by explicit pixel overlaps."""
    x0, y0, x1, y1 = geometry.tile_box_he_px([i], [j])[0]

    def weights(start: float, stop: float, size: int) -> np.ndarray:
        step = (stop - start) / geometry.image_px
        w = np.zeros((geometry.image_px, size))
        for k in range(geometry.image_px):
            a, b = start + k * step, start + (k + 1) * step
            for m in range(int(np.floor(a)), min(int(np.ceil(b)), size)):
                w[k, m] = (min(b, m + 1) - max(a, m)) / step
        return w

    wy, wx = weights(y0, y1, image.shape[0]), weights(x0, x1, image.shape[1])
    ys, xs = np.flatnonzero(wy.any(axis=0)), np.flatnonzero(wx.any(axis=0))
    crop = image[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1].astype(np.float64)
    out = np.einsum("ky,yxc,lx->klc", wy[:, ys[0]:ys[-1] + 1], crop, wx[:, xs[0]:xs[-1] + 1], optimize=True)
    return out


def noise_image(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


@settings(max_examples=8, deadline=None)
@given(st.floats(0.2, 0.5), st.integers(0, 1000), st.sampled_from([64, 100, 256]))
def test_chunk_reader_equals_reference_and_decodes_each_chunk_once(he_pixel_size_um, seed, chunk):
    shape = (int(600 / he_pixel_size_um), int(500 / he_pixel_size_um))  # 3 x 2 tiles of 256 um
    image = noise_image(shape, seed)
    geometry = TileGeometry(he_pixel_size_um=he_pixel_size_um, he_height_px=shape[0], he_width_px=shape[1])
    rows, cols = np.divmod(np.arange(int(np.prod(geometry.grid_shape))), geometry.grid_shape[1])
    counting = CountingArray(image, chunk)
    sampler = LevelSampler(geometry, [counting])
    got = {}
    for positions, images in sampler.iter_tiles(rows, cols, batch_size=3):
        for p, im in zip(positions, images, strict=True):
            got[(rows[p], cols[p])] = im
    assert len(got) == len(rows)
    assert counting.decodes.max() == 1
    for (i, j), im in got.items():
        ref = reference_tile(image, geometry, i, j)
        off = im != np.rint(ref)
        # float32 sums may round an exact .5 tie the other way, nothing else
        assert np.all(np.abs(ref[off] - np.trunc(ref[off]) - 0.5) < 1e-3)
        assert np.all(np.abs(im[off] - ref[off]) <= 0.5 + 1e-3)
        window = sampler.read_window(i, j).astype(int)
        assert np.all(np.abs(window - ref) <= 0.5 + 1e-3)


def test_per_window_reading_decodes_chunks_repeatedly():
    image = noise_image((2400, 2400), 0)
    geometry = TileGeometry(he_pixel_size_um=0.25, he_height_px=2400, he_width_px=2400)
    counting = CountingArray(image, 256)
    sampler = LevelSampler(geometry, [counting])
    for i in range(geometry.grid_shape[0]):
        for j in range(geometry.grid_shape[1]):
            sampler.read_window(i, j)
    assert counting.decodes.max() >= 4


def test_pyramid_level_at_or_below_half_micron_is_used():
    yy, xx = np.mgrid[0:3000, 0:3000]
    smooth = 127.5 + 100 * np.sin(xx / 90.0) * np.cos(yy / 130.0)
    image = np.repeat(smooth[..., None], 3, axis=2).round().astype(np.uint8)
    half = image.reshape(1500, 2, 1500, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    fine = LevelSampler(TileGeometry(he_pixel_size_um=0.2, he_height_px=3000, he_width_px=3000), [image, half])
    coarse = LevelSampler(TileGeometry(he_pixel_size_um=0.3, he_height_px=3000, he_width_px=3000), [image, half])
    assert fine.level == 1 and coarse.level == 0
    # on a smooth image the 2x level gives the tile of full resolution up to rounding
    full = LevelSampler(fine.geometry, [image], level=0)
    assert np.abs(fine.read_window(1, 1).astype(int) - full.read_window(1, 1)).max() <= 2


@pytest.mark.parametrize(("he_pixel_size_um", "use_half_level"), [(0.2737, False), (0.2, True), (0.3791, False)])
def test_image_pixels_and_tokens_share_one_grid(he_pixel_size_um, use_half_level):
    """Dark 2 x 2 px dots drawn where transcripts are: the transcript's token holds its count, and the
    resized pixel that contains it (16 px per token) is strictly the darkest of its 3 x 3 neighbours."""
    rng = np.random.default_rng(7)
    shape = (int(900 / he_pixel_size_um) // 2 * 2, int(900 / he_pixel_size_um) // 2 * 2)
    image = np.full((*shape, 3), 255, np.uint8)
    corners = np.stack(np.meshgrid(np.arange(20, shape[1] - 20, 30), np.arange(20, shape[0] - 20, 30)), -1)
    corners = (corners.reshape(-1, 2) + rng.integers(-4, 5, size=(corners.size // 2, 2))) // 2 * 2
    for u, v in corners:
        image[v:v + 2, u:u + 2] = 0
    levels = [image]
    if use_half_level:
        levels.append(image.reshape(shape[0] // 2, 2, shape[1] // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    geometry = TileGeometry(he_pixel_size_um=he_pixel_size_um, he_height_px=shape[0], he_width_px=shape[1])
    scale = he_pixel_size_um / XENIUM_PIXEL_SIZE_UM
    matrix = np.array([[scale, 0.0, 17.0], [0.0, scale, -9.0], [0.0, 0.0, 1.0]])
    um = AffineXY(matrix).apply_xy(corners + 1.0) * XENIUM_PIXEL_SIZE_UM  # dot centres
    df = pd.DataFrame({"feature_name": pd.Categorical(["A"] * len(um)), "x_location": um[:, 0],
                       "y_location": um[:, 1], "qv": np.full(len(um), 30.0, np.float32)})
    bins = bin_transcripts(df, geometry, GenePanel(core=("A",)), matrix, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM)
    qx, qy = TokenMapping(geometry, AffineXY(matrix), XENIUM_PIXEL_SIZE_UM).um_to_tokens_xy(um[:, 0], um[:, 1])
    rows, cols = np.divmod(np.arange(int(np.prod(geometry.grid_shape))), geometry.grid_shape[1])
    sampler = LevelSampler(geometry, levels)
    assert sampler.level == (1 if use_half_level else 0)
    s, t, p, n = geometry.stride_tokens, geometry.tokens_per_side, geometry.image_px_per_token, geometry.image_px
    checked = 0
    for positions, images in sampler.iter_tiles(rows, cols):
        tokens = bins.tokens.tile_tokens(geometry, rows[positions], cols[positions])
        for k, pos in enumerate(positions):
            i, j = rows[pos], cols[pos]
            inside = (qx >= s * j) & (qx < s * j + t) & (qy >= s * i) & (qy < s * i + t)
            assert tokens[k].sum() == inside.sum()
            for x, y in zip(qx[inside], qy[inside], strict=True):
                a, b = int(y) - s * i, int(x) - s * j
                assert tokens[k, a, b, 0] >= 1
                fy, fx = y * p - np.floor(y * p), x * p - np.floor(x * p)
                pr, pc = int(np.floor(y * p)) - s * p * i, int(np.floor(x * p)) - s * p * j
                if not (0.05 < fy < 0.95 and 0.05 < fx < 0.95 and 0 < pr < n - 1 and 0 < pc < n - 1):
                    continue  # centre on a pixel edge: two pixels are equally dark
                assert pr // p == a and pc // p == b
                around = images[k, pr - 1:pr + 2, pc - 1:pc + 2, 0].astype(int)
                assert around[1, 1] < np.delete(around.ravel(), 4).min()
                checked += 1
    assert checked > 100
