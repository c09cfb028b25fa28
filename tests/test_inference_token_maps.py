"""The stitched token maps predict writes into a results store: block by block, equal to the
in-memory stitching, a pyramid that keeps its quantity, and placed through the registration."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.inference import token_maps
from napari_morphomol.inference.token_maps import level_pixel_to_global, read_token_maps, write_token_maps
from napari_morphomol.models import ADDON_TOKEN_HEAD
from napari_morphomol.tiling import TileGeometry, TokenGrid

GENES = ["A", "B", "C"]


def _store(tmp_path, rows, cols, shape_tiles, values, he_to_global, measured_rng=None):
    """A results store holding only what write_token_maps reads: tile rows / cols, the token head's
    output, (with ``measured_rng``) a random measured token raster of two genes, and the
    attributes naming genes, geometry and registration."""
    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=256 * shape_tiles[0] + 256,
                            he_width_px=256 * shape_tiles[1] + 256)
    measured = None if measured_rng is None else \
        measured_rng.poisson(2.0, (*geometry.raster_shape, 2)).astype(np.uint32)
    root = zarr.open_group(tmp_path / "run.zarr", mode="w", zarr_format=3)
    tiles = root.create_group("tiles")
    tiles.create_array("row", data=np.asarray(rows, np.int64))
    tiles.create_array("col", data=np.asarray(cols, np.int64))
    root.create_array(ADDON_TOKEN_HEAD, data=values, chunks=(5, 196, len(GENES)))
    if measured is not None:
        root.create_array("measured_token_counts", data=measured, chunks=(32, 32, measured.shape[2]))
    attrs = {"geometry_args": {"he_pixel_size_um": 0.5, "he_height_px": geometry.he_height_px,
                               "he_width_px": geometry.he_width_px},
             "registration": {"matrix": np.asarray(he_to_global).tolist()}, "addon_genes": GENES,
             "measured_genes": GENES[:2] if measured is not None else []}
    return root, attrs, TokenGrid.from_tiles(rows, cols, geometry, he_to_global)


def _random_tiles(seed, n_rows=40, n_cols=36, keep=0.6):
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(rng.random((n_rows, n_cols)) < keep)
    return rows, cols, rng


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32 tokens and levels down to 64 px, so a 40 x 36 tile sample spans many blocks and levels."""
    monkeypatch.setattr(token_maps, "MAP_CHUNK_TOKENS", 32)
    monkeypatch.setattr(token_maps, "COARSEST_SIDE_TOKENS", 64)


@pytest.mark.parametrize("seed", [0, 1])
def test_written_maps_equal_the_in_memory_stitching_block_by_block(tmp_path, small_blocks, seed):
    rows, cols, rng = _random_tiles(seed)
    log_rate = rng.normal(size=(len(rows), 196, len(GENES))).astype(np.float32)
    root, attrs, grid = _store(tmp_path, rows, cols, (40, 36), log_rate, np.eye(3), measured_rng=rng)
    assert write_token_maps(root, attrs) == ["predicted", "measured"]
    maps = read_token_maps(zarr.open_group(tmp_path / "run.zarr", mode="r"))
    predicted, measured = maps["predicted"], maps["measured"]
    assert predicted.genes == GENES and measured.genes == GENES[:2]
    assert [level.shape[1:] for level in predicted.levels] == [tuple(-(-n // 2**level) for n in grid.shape)
                                                               for level in range(4)]
    assert max(predicted.levels[-1].shape[1:]) <= 64 < max(predicted.levels[-2].shape[1:])
    assert predicted.levels[0].chunks == (1, 32, 32)
    for g, gene in enumerate(GENES):
        reference = grid.token_map(np.logaddexp(0.0, log_rate[:, :, g]))
        np.testing.assert_allclose(predicted.plane(gene), reference, rtol=1e-5, atol=1e-6, equal_nan=True)
    counts = np.asarray(root["measured_token_counts"][...], np.float32)
    expected = np.where(grid.covered, np.log1p(counts[..., 1]), np.nan)
    np.testing.assert_allclose(measured.plane("B"), expected, rtol=1e-6, equal_nan=True)
    # a coarser level holds log1p of the mean count of the covered tokens under each pixel
    fine, coarse = predicted.plane("C", 0), predicted.plane("C", 1)
    i, j = 10, 17
    square = fine[2 * i:2 * i + 2, 2 * j:2 * j + 2]
    if np.isfinite(square).any():
        np.testing.assert_allclose(coarse[i, j], np.log1p(np.nanmean(np.expm1(square))), rtol=1e-5)
    assert np.isnan(coarse).sum() < np.isnan(fine).sum() / 3


def test_a_constant_field_stays_that_constant_at_every_level(tmp_path, small_blocks):
    rows, cols, _ = _random_tiles(3, keep=0.5)
    value = 0.7
    log_rate = np.full((len(rows), 196, len(GENES)), np.log(np.expm1(value)), np.float32)  # softplus -> value
    root, attrs, grid = _store(tmp_path, rows, cols, (40, 36), log_rate, np.eye(3))
    write_token_maps(root, attrs)
    image = read_token_maps(root)["predicted"]
    for level in range(len(image.levels)):
        plane = image.plane("A", level)
        assert np.isfinite(plane).any()
        np.testing.assert_allclose(plane[np.isfinite(plane)], value, rtol=1e-5)
    np.testing.assert_array_equal(np.isfinite(image.plane("A")), grid.covered)


def test_a_point_source_lands_where_the_registration_puts_it(tmp_path):
    """One token of one tile lit: the written map has it at the raster token the tile geometry says,
    and every level's placement (rotated, scaled registration) puts that token's centre there."""
    angle, scale = 0.4, 1.1
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    he_to_global = np.array([[c, -s, 500.0], [s, c, -200.0], [0.0, 0.0, 1.0]])
    rows, cols = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    log_rate = np.full((4, 196, len(GENES)), -30.0, np.float32)
    log_rate[3, 5 * 14 + 9, 0] = 2.0  # tile (1, 1), its token (5, 9): raster token (7 + 5, 7 + 9)
    root, attrs, grid = _store(tmp_path, rows, cols, (2, 2), log_rate, he_to_global)
    write_token_maps(root, attrs)
    image = read_token_maps(root)["predicted"]
    plane = image.plane("A")
    (r, col), = np.argwhere(plane > 0.01)
    assert (r, col) == (12, 16)
    # tiles (0, 1) and (1, 1) cover that token: the mean of the lit token and a dark one
    np.testing.assert_allclose(plane[r, col], (np.logaddexp(0.0, 2.0) + np.logaddexp(0.0, -30.0)) / 2, rtol=1e-6)
    centre_he = (np.array([col, r]) + 0.5) * grid.token_he_px
    np.testing.assert_allclose(apply_affine_xy(image.pixel_to_global[0], [[col, r]]),
                               apply_affine_xy(he_to_global, [centre_he]), atol=1e-9)
    np.testing.assert_allclose(image.pixel_to_global[0], level_pixel_to_global(grid, 0))
    # level 1 pixel (6, 8) covers raster tokens rows 12-13, cols 16-17: its centre is their centre
    np.testing.assert_allclose(apply_affine_xy(level_pixel_to_global(grid, 1), [[8, 6]]),
                               apply_affine_xy(he_to_global, [(np.array([17.0, 13.0])) * grid.token_he_px]),
                               atol=1e-9)


def test_a_tile_model_writes_no_token_maps(tmp_path):
    root = zarr.open_group(tmp_path / "run.zarr", mode="w", zarr_format=3)
    assert write_token_maps(root, {}) == [] and read_token_maps(root) == {}
