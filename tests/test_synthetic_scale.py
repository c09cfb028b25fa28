"""The scale sample: one synthetic block repeated on a grid (synthetic.scale), and the repeated OME-TIFF writer."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.cli import main
from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM, apply_affine_xy
from napari_morphomol.elements import HE_IMAGE, MORPHOLOGY, TRANSCRIPTS
from napari_morphomol.errors import InputError
from napari_morphomol.io.sample import find_sample_parts, load_sample, summarize_sample
from napari_morphomol.registration.formats import read_alignment_csv
from napari_morphomol.synthetic import (
    SCALE_HE_PIXEL_SIZE_UM,
    ScaleSample,
    load_ground_truth,
    write_scale_sample,
    write_synthetic_sample,
)
from napari_morphomol.synthetic.bundle import MORPHOLOGY_FOCUS, TRANSCRIPT_ROW_GROUP_ROWS
from napari_morphomol.synthetic.scale import _Cell, _grid
from napari_morphomol.synthetic.writers import (
    JPEG,
    LOSSLESS,
    write_pyramidal_ome_tiff,
    write_repeated_ome_tiff,
)

GRID = (2, 3)
COPY = (1, 2)
"""The copy compared with the block: column 1, row 2."""
SAME_COLUMNS = ["z_location", "qv", "feature_name", "codeword_index", "codeword_category", "is_gene",
                "overlaps_nucleus", "nucleus_distance"]


@pytest.fixture(scope="module")
def scale(tmp_path_factory) -> ScaleSample:
    """A 0.4 mm block written with the sample, its cell repeated 2 x 3."""
    return write_scale_sample(tmp_path_factory.mktemp("scale") / "s", grid=GRID, block_size_mm=(0.4, 0.4), seed=1)


@pytest.fixture(scope="module")
def block_cell_transcripts(scale):
    """The block's transcripts inside the cell, in file order."""
    table = pq.read_table(scale.block_root / "xenium" / "transcripts.parquet").to_pandas()
    x0, y0, width, height = scale.cell_global_px
    x_px = table["x_location"].to_numpy(np.float64) / XENIUM_PIXEL_SIZE_UM
    y_px = table["y_location"].to_numpy(np.float64) / XENIUM_PIXEL_SIZE_UM
    return table[(x_px >= x0) & (x_px < x0 + width) & (y_px >= y0) & (y_px < y0 + height)].reset_index(drop=True)


@pytest.fixture(scope="module")
def transcripts(scale):
    return pq.read_table(scale.xenium_dir / "transcripts.parquet").to_pandas()


def _copy_rows(transcripts, scale, column: int, row: int):
    k = row * scale.grid[0] + column
    n = scale.transcripts_per_copy
    return transcripts.iloc[k * n : (k + 1) * n].reset_index(drop=True)


def test_load_sample_opens_it(scale):
    parts = find_sample_parts(scale.root)
    assert (parts.xenium_dir, parts.he_path, parts.alignment_csv) == (scale.xenium_dir, scale.he_path,
                                                                       scale.alignment_csv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pixel-size or scale warning
        sdata = load_sample(parts.xenium_dir, parts.he_path, parts.alignment_csv)
    assert {HE_IMAGE, MORPHOLOGY} <= set(sdata.images) and TRANSCRIPTS in sdata.points
    summary = summarize_sample(sdata)
    assert summary["transcripts"]["count"] == scale.n_transcripts
    assert summary["he"]["pixel_size_um"] == pytest.approx(SCALE_HE_PIXEL_SIZE_UM)
    assert ScaleSample.at(scale.root) == scale
    experiment = json.loads((scale.xenium_dir / "experiment.xenium").read_text())
    assert experiment["num_transcripts"] == scale.n_transcripts and experiment["num_cells"] == 0
    assert not (scale.xenium_dir / "cells.parquet").exists()  # no cell segmentation
    with pytest.raises(InputError):
        load_sample(parts.xenium_dir, cells=True)


def test_transcript_count_is_the_cells_times_the_copies(scale, block_cell_transcripts, transcripts):
    assert scale.transcripts_per_copy == len(block_cell_transcripts) > 10_000
    assert len(transcripts) == scale.n_transcripts == len(block_cell_transcripts) * GRID[0] * GRID[1]
    metadata = pq.ParquetFile(scale.xenium_dir / "transcripts.parquet").metadata
    assert metadata.num_row_groups >= GRID[0] * GRID[1]
    assert all(metadata.row_group(i).num_rows <= TRANSCRIPT_ROW_GROUP_ROWS for i in range(metadata.num_row_groups))


def test_columns_and_dtypes_are_the_generators(scale):
    assert pq.read_schema(scale.xenium_dir / "transcripts.parquet") == pq.read_schema(
        scale.block_root / "xenium" / "transcripts.parquet")


def test_a_copy_is_the_block_shifted(scale, block_cell_transcripts, transcripts):
    copy = _copy_rows(transcripts, scale, *COPY)
    dx, dy = scale.copy_offset_um(*COPY)
    assert dx == pytest.approx((COPY[0] * scale.cell_global_px[2] - scale.cell_global_px[0]) * XENIUM_PIXEL_SIZE_UM)
    np.testing.assert_allclose(copy["x_location"], block_cell_transcripts["x_location"].astype(np.float64) + dx,
                               atol=1e-3)
    np.testing.assert_allclose(copy["y_location"], block_cell_transcripts["y_location"].astype(np.float64) + dy,
                               atol=1e-3)
    for name in SAME_COLUMNS:
        assert (copy[name].astype(str) == block_cell_transcripts[name].astype(str)).all(), name
    assert (copy["cell_id"] == "UNASSIGNED").equals(block_cell_transcripts["cell_id"] == "UNASSIGNED")


def test_ids_are_unique_per_copy(scale, transcripts):
    assert transcripts["transcript_id"].is_unique
    first, other = _copy_rows(transcripts, scale, 0, 0), _copy_rows(transcripts, scale, *COPY)
    ids = [set(c["cell_id"][c["cell_id"] != "UNASSIGNED"]) for c in (first, other)]
    assert ids[0] and len(ids[0]) == len(ids[1]) and not ids[0] & ids[1]


def test_he_maps_onto_a_copy_as_the_blocks_does(scale, block_cell_transcripts, transcripts):
    big = read_alignment_csv(scale.alignment_csv)
    block = read_alignment_csv(scale.block_root / "he_imagealignment.csv")
    copy = _copy_rows(transcripts, scale, *COPY)
    big_he = apply_affine_xy(np.linalg.inv(big), copy[["x_location", "y_location"]].to_numpy(np.float64)
                             / XENIUM_PIXEL_SIZE_UM)
    block_he = apply_affine_xy(np.linalg.inv(block), block_cell_transcripts[["x_location", "y_location"]]
                               .to_numpy(np.float64) / XENIUM_PIXEL_SIZE_UM)
    hx, hy, he_w, he_h = scale.cell_he_px
    np.testing.assert_allclose(big_he - block_he, np.broadcast_to([COPY[0] * he_w - hx, COPY[1] * he_h - hy],
                                                                  big_he.shape), atol=0.01)
    # the pixels there are the block's (JPEG re-encoded): compare a crop of the copy with the block's
    big_image, block_image = tifffile.imread(scale.he_path), tifffile.imread(scale.block_root / "he_image.ome.tif")
    r, c, n = 100, 150, 400
    crop = big_image[COPY[1] * he_h + r : COPY[1] * he_h + r + n, COPY[0] * he_w + c : COPY[0] * he_w + c + n]
    same = block_image[hy + r : hy + r + n, hx + c : hx + c + n]
    moved = block_image[hy + r + 9 : hy + r + 9 + n, hx + c + 9 : hx + c + 9 + n]
    error = np.abs(crop.astype(int) - same).mean()
    assert error < 2.5 and np.abs(crop.astype(int) - moved).mean() > 4 * error


def test_dapi_repeats_the_blocks_exactly(scale):
    big_dapi = tifffile.imread(scale.xenium_dir / MORPHOLOGY_FOCUS)
    block_dapi = tifffile.imread(scale.block_root / "xenium" / MORPHOLOGY_FOCUS)
    x0, y0, width, height = scale.cell_global_px
    column, row = COPY
    np.testing.assert_array_equal(big_dapi[row * height : (row + 1) * height, column * width : (column + 1) * width],
                                  block_dapi[y0 : y0 + height, x0 : x0 + width])


def test_images_cover_the_transcripts(scale, transcripts):
    dapi_h, dapi_w = tifffile.TiffFile(scale.xenium_dir / MORPHOLOGY_FOCUS).pages[0].shape
    he_h, he_w = tifffile.TiffFile(scale.he_path).pages[0].shape[:2]
    big = read_alignment_csv(scale.alignment_csv)
    he_extent_px = apply_affine_xy(big, np.array([[he_w, he_h]]))[0]
    np.testing.assert_allclose(he_extent_px, [dapi_w, dapi_h], atol=1e-6)  # H&E and DAPI cover the same area
    assert (dapi_w, dapi_h) == (GRID[0] * scale.cell_global_px[2], GRID[1] * scale.cell_global_px[3])
    x_px = transcripts["x_location"].to_numpy(np.float64) / XENIUM_PIXEL_SIZE_UM
    y_px = transcripts["y_location"].to_numpy(np.float64) / XENIUM_PIXEL_SIZE_UM
    assert x_px.min() >= 0 and y_px.min() >= 0 and x_px.max() < dapi_w and y_px.max() < dapi_h
    assert x_px.max() > dapi_w - 10 and y_px.max() > dapi_h - 10  # and no wider than they are


def test_refuses_a_non_empty_target_and_leaves_nothing(tmp_path, scale):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        write_scale_sample(target, grid=(1, 1), block_dir=scale.block_root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["mine.txt"] and (target / "mine.txt").read_text() == "keep"


def test_refuses_a_block_that_cannot_repeat(tmp_path):
    rotated = write_synthetic_sample(tmp_path / "rotated", size_mm=(0.3, 0.3), deformation=False)
    with pytest.raises(InputError, match="axis_aligned=True"):
        write_scale_sample(tmp_path / "out", grid=(1, 1), block_dir=rotated.root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rotated"]
    with pytest.raises(InputError, match="exactly one"):
        write_scale_sample(tmp_path / "out", grid=(1, 1), n_transcripts=10, block_dir=rotated.root)


def test_cli_writes_a_scale_sample_from_a_block(tmp_path, scale, capsys):
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--scale-grid", "1", "2", "--block", str(scale.block_root),
                 "--dapi-compression", "deflate"]) == 0
    assert "no cell segmentation" in capsys.readouterr().out
    written = ScaleSample.at(out)
    assert written.grid == (1, 2) and written.block_root == scale.block_root
    assert written.n_transcripts == 2 * scale.transcripts_per_copy
    assert tifffile.TiffFile(written.xenium_dir / MORPHOLOGY_FOCUS).pages[0].compression == 8  # deflate
    assert load_ground_truth(written.block_root).transform.warp.size == 0


@pytest.mark.parametrize(("extra", "flag"), [
    (["--scale-grid", "1", "1", "--stain", "unseen"], "--stain does not apply to a scale sample"),
    (["--scale-grid", "1", "1", "--tissue", "sarcomatoid"], "--tissue does not apply"),
    (["--scale-transcripts", "1e6", "--tissue-region-um", "0", "0", "1", "1"], "--tissue-region-um does not apply"),
    (["--scale-size-mm", "1", "1", "--registration-offset-um", "5", "0"], "--registration-offset-um does not apply"),
    (["--block", "somewhere"], "--block applies only to a scale sample"),
    (["--dapi-compression", "deflate"], "--dapi-compression applies only to a scale sample"),
])
def test_cli_refuses_an_option_the_kind_of_sample_does_not_take(tmp_path, capsys, extra, flag):
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--size-mm", "0.2", "0.2", *extra]) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


@settings(max_examples=50, deadline=None)
@given(per_copy=st.integers(1, 10**7), target=st.floats(1, 1e9))
def test_the_grid_for_a_transcript_count_is_the_fewest_copies_near_square(per_copy, target):
    cell = _Cell(global_px=(0, 0, 1152, 1152), he_px=(0, 0, 896, 896), he_scale=9 / 7)
    columns, rows = _grid(cell, per_copy, target, None, None)
    copies = -(-target // per_copy)
    assert columns * rows * per_copy >= target
    assert columns * rows < copies + columns  # one row fewer would be too few
    assert columns - 1 <= rows <= columns


@pytest.mark.parametrize("compression", [LOSSLESS, JPEG])
def test_repeated_tiff_is_the_pyramid_of_the_tiled_image(tmp_path, compression):
    rng = np.random.default_rng(0)
    shape = (512, 640) if compression == LOSSLESS else (640, 512, 3)
    dtype = np.uint16 if compression == LOSSLESS else np.uint8
    cell = rng.integers(0, 200, shape).astype(dtype)
    cell[:, :20] = 255  # an edge that shows when a copy is misplaced
    repeats = (2, 3)
    tiled = np.tile(cell, repeats + (1,) * (cell.ndim - 2))
    samples = 1 if cell.ndim == 2 else 3
    levels = write_repeated_ome_tiff(tmp_path / "r.ome.tif", cell, repeats, 0.5, "c", compression)
    assert levels == write_pyramidal_ome_tiff(tmp_path / "p.ome.tif", lambda row0, n: tiled[row0 : row0 + n],
                                              *tiled.shape[:2], samples, dtype, 0.5, "c", tmp_path, compression)
    assert len(levels) == 2
    with tifffile.TiffFile(tmp_path / "r.ome.tif") as repeated, tifffile.TiffFile(tmp_path / "p.ome.tif") as plain:
        for mine, theirs in zip(repeated.series[0].levels, plain.series[0].levels, strict=True):
            np.testing.assert_array_equal(mine.asarray(), theirs.asarray())
        if compression == LOSSLESS:
            np.testing.assert_array_equal(repeated.series[0].levels[0].asarray(), tiled)
    with pytest.raises(InputError, match="multiples of 2 px: give fewer repeats"):
        write_repeated_ome_tiff(tmp_path / "odd.ome.tif", cell[:511], repeats, 0.5, "c", compression)
