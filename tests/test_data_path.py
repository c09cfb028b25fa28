"""The data path of a predict task: H&E levels read straight from the TIFF's tiles give the same
pixels, and the same batches bit for bit, as the zarr reading; the torchvision JPEG decoder (the
CUDA path, run here on the CPU) stays within a few grey levels of libjpeg-turbo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.inference.store import chunk_order
from napari_morphomol.inference.worker import RunContext, StoredLevel, TiffLevel, chunk_batches, open_he_levels
from napari_morphomol.io.sample import load_sample
from napari_morphomol.tiling import GenePanel, LevelSampler, TilingOptions, tile_sample
from napari_morphomol.tiling.store import write_token_raster


def zarr_levels(path) -> list[StoredLevel]:
    """The levels as the worker read them before :class:`TiffLevel`: through tifffile's zarr store."""
    series = tifffile.TiffFile(path).series[0]
    group = zarr.open(series.aszarr(), mode="r")
    arrays = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(series.levels))]
    return [StoredLevel(a) for a in arrays]


@pytest.fixture(scope="module")
def he_files(tmp_path_factory, synthetic_sample):
    """The synthetic H&E (pyramidal OME-TIFF, JPEG tiles in YCbCr) and copies of its level 0 in
    other layouts: zlib tiles of 256 px with a predictor, strips, RGBA tiles, odd sizes throughout."""
    folder = tmp_path_factory.mktemp("he_layouts")
    image = tifffile.imread(synthetic_sample.he_path)[:1001, :777]
    files = {"jpeg": synthetic_sample.he_path}
    files["zlib"] = folder / "zlib.tif"
    tifffile.imwrite(files["zlib"], image, tile=(256, 256), compression="zlib", predictor=True, photometric="rgb")
    files["strips"] = folder / "strips.tif"
    tifffile.imwrite(files["strips"], image, rowsperstrip=100, compression="zlib", photometric="rgb")
    files["rgba"] = folder / "rgba.tif"
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    tifffile.imwrite(files["rgba"], rgba, tile=(128, 128), photometric="rgb", extrasamples=[2])
    return files


@pytest.mark.parametrize("kind", ["jpeg", "zlib", "strips", "rgba"])
def test_tiff_levels_are_read_directly_with_the_zarr_levels_shape_and_tiles(he_files, kind):
    direct, stored = open_he_levels(str(he_files[kind])), zarr_levels(he_files[kind])
    assert all(isinstance(level, TiffLevel) for level in direct)
    assert [(d.shape, d.chunks, d.dtype) for d in direct] == [(s.shape, s.chunks, s.dtype) for s in stored]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["jpeg", "zlib", "strips", "rgba"]), st.floats(0, 1), st.floats(0, 1), st.integers(1, 700),
       st.integers(1, 700))
def test_any_window_equals_the_zarr_reading_bit_for_bit(he_files, kind, fy, fx, height, width):
    direct, stored = open_he_levels(str(he_files[kind]))[0], zarr_levels(he_files[kind])[0]
    y0, x0 = int(fy * (direct.shape[0] - 1)), int(fx * (direct.shape[1] - 1))
    window = (slice(y0, y0 + height), slice(x0, x0 + width))
    got = direct[window]
    assert got.dtype == np.uint8 and got.shape[2] == 3
    np.testing.assert_array_equal(got, stored[window])


def test_a_tiff_of_planes_per_channel_is_read_through_zarr(tmp_path):
    path = tmp_path / "planar.tif"
    image = np.random.default_rng(0).integers(0, 256, (3, 300, 200), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", planarconfig="separate")
    levels = open_he_levels(str(path))
    assert isinstance(levels[0], StoredLevel)
    np.testing.assert_array_equal(levels[0][10:250, 5:190], np.moveaxis(image, 0, -1)[10:250, 5:190])


@pytest.fixture(scope="module")
def tiled(synthetic_sample, tmp_path_factory):
    """The synthetic sample's tiles in chunk order and its token raster as predict stores it."""
    s = synthetic_sample
    panel = json.loads(s.panel_json.read_text())
    tiling = tile_sample(load_sample(s.xenium_dir, s.he_path, s.alignment_csv),
                         panel=GenePanel(core=tuple(panel["core"]), addon=tuple(panel["addon"])),
                         options=TilingOptions(min_transcripts=0))
    order = chunk_order(tiling.tiles["row"].to_numpy(), tiling.tiles["col"].to_numpy(), 8)
    group = zarr.open_group(tmp_path_factory.mktemp("tokens") / "inputs.zarr", mode="w")
    write_token_raster(group, "tokens", tiling.bins.tokens, "core_gene")
    return tiling, tiling.tiles["row"].to_numpy()[order], tiling.tiles["col"].to_numpy()[order], group["tokens"]


def context(tiled, levels) -> RunContext:
    tiling, rows, cols, tokens = tiled
    return RunContext(None, rows, cols, 8, tiling.geometry, LevelSampler(tiling.geometry, levels), tokens)


def all_batches(ctx: RunContext, batch_size: int) -> list:
    """Every chunk's batches as a task makes them, positions made global (into ``ctx.rows``)."""
    k = ctx.tiles_per_chunk
    return [(a + positions, images, tokens) for a in range(0, len(ctx.rows), k)
            for positions, images, tokens in chunk_batches(ctx, ctx.rows[a:a + k], ctx.cols[a:a + k], batch_size,
                                                           pin=False)]


def test_batches_equal_those_of_the_zarr_reading_bit_for_bit(tiled, synthetic_sample):
    tiling, rows, cols, tokens = tiled
    assert len(rows) >= 12 and len(rows) > 8  # more than one chunk
    new = all_batches(context(tiled, open_he_levels(str(synthetic_sample.he_path))), 3)
    old = all_batches(context(tiled, zarr_levels(synthetic_sample.he_path)), 3)
    assert len(new) == len(old)
    for (positions, images, token_batch), (old_positions, old_images, old_tokens) in zip(new, old, strict=True):
        np.testing.assert_array_equal(positions, old_positions)
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, 224, 224)
        assert torch.equal(images, old_images) and torch.equal(token_batch, old_tokens)
        # tokens: tile (i, j) is raster[7i:7i+14, 7j:7j+14], row-major, as float32
        assert token_batch.dtype == torch.float32
        for k, p in enumerate(positions):
            i, j = 7 * int(rows[p]), 7 * int(cols[p])
            expected = np.asarray(tokens[i:i + 14, j:j + 14]).reshape(196, -1).astype(np.float32)
            np.testing.assert_array_equal(token_batch[k].numpy(), expected)


def assert_close_to_libjpeg(levels, reference, device: str) -> None:
    """Every level, decoded on ``device`` by torchvision, within a few grey levels of libjpeg-turbo."""
    assert all(level.jpeg_device == device for level in levels)
    for level, ref in zip(levels, reference, strict=True):
        window = (slice(0, min(level.shape[0], 1300)), slice(0, min(level.shape[1], 1300)))
        difference = np.abs(level[window].astype(np.int16) - ref[window].astype(np.int16))
        assert difference.mean() < 1.0 and np.percentile(difference, 99.9) <= 16, (difference.mean(), difference.max())


def test_the_torch_jpeg_decoder_is_within_a_few_levels_of_libjpeg(synthetic_sample):
    pytest.importorskip("torchvision")
    path = str(synthetic_sample.he_path)
    assert_close_to_libjpeg(open_he_levels(path, jpeg_device="cpu"), open_he_levels(path), "cpu")


def test_the_torch_jpeg_decoder_leaves_other_compressions_to_tifffile(he_files):
    levels = open_he_levels(str(he_files["zlib"]), jpeg_device="cpu")
    assert levels[0].jpeg_device is None
    np.testing.assert_array_equal(levels[0][:300, :300], zarr_levels(he_files["zlib"])[0][:300, :300])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_jpeg_tiles_decoded_on_the_gpu_are_within_a_few_levels_of_libjpeg(synthetic_sample):
    pytest.importorskip("torchvision")
    path = str(synthetic_sample.he_path)
    assert_close_to_libjpeg(open_he_levels(path, jpeg_device="cuda"), open_he_levels(path), "cuda")
