"""The default SpatialData export refers to the sample instead of copying it: the run's elements, an
H&E overview placed under the maps, and the sample's record, which open_export and the napari reader
follow back to the full H&E, DAPI and transcripts; --self-contained keeps the full copy."""

from __future__ import annotations

import shutil

import dask.array as da
import numpy as np
import pytest
import spatialdata as sd
from hypothesis import given, settings
from hypothesis import strategies as st
from spatialdata.models import Image2DModel
from spatialdata.models.pyramids_utils import dask_arrays_to_datatree
from spatialdata.transformations import get_transformation

from napari_morphomol._reader import get_reader
from napari_morphomol.cli import main
from napari_morphomol.coords import HE_PX, apply_affine_xy
from napari_morphomol.elements import HE_IMAGE, MORPHOLOGY, SAMPLE_ATTRS_KEY, TRANSCRIPTS, element_levels_cyx
from napari_morphomol.errors import InputError
from napari_morphomol.export import (
    HE_OVERVIEW,
    MEASURED_IMAGE,
    OVERVIEW_PIXEL_SIZE_UM,
    PREDICTED_IMAGE,
    TILE_TABLE,
    TILES,
    export_results,
    he_overview,
    open_export,
)
from napari_morphomol.export.spatialdata import EXPORT_ATTRS_KEY
from napari_morphomol.inference import open_results
from napari_morphomol.io import load_sample, open_sample
from napari_morphomol.layers.sample import HE_LAYER
from test_reliability_outputs import tree_digest


def matrix_to(element, system: str) -> np.ndarray:
    return get_transformation(element, system).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def sample_of(synthetic_sample):
    return load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, results_store, synthetic_sample):
    """The default and the self-contained export of one run, through the command line, with the
    checksums of the sample's files before and after."""
    out = tmp_path_factory.mktemp("incremental")
    before = tree_digest(synthetic_sample.root)
    assert main(["export", str(results_store), "--spatialdata", str(out / "default.zarr")]) == 0
    assert main(["export", str(results_store), "--spatialdata", str(out / "full.zarr"), "--self-contained"]) == 0
    return {"default": out / "default.zarr", "full": out / "full.zarr", "before": before,
            "after": tree_digest(synthetic_sample.root)}


def test_default_export_holds_the_run_and_an_overview_not_the_sample(exports, results_store):
    sdata = sd.read_zarr(exports["default"])
    assert set(sdata.images) == {HE_OVERVIEW, PREDICTED_IMAGE, MEASURED_IMAGE}
    assert not sdata.points and set(sdata.shapes) == {TILES}
    assert sd.get_element_annotators(sdata, TILES) == {TILE_TABLE}
    for name in (HE_OVERVIEW, PREDICTED_IMAGE, MEASURED_IMAGE, TILES):
        assert "global" in sd.transformations.get_transformation(sdata[name], get_all=True)
    mark = sdata.attrs[EXPORT_ATTRS_KEY]
    assert mark["self_contained"] is False and mark["sample_elements"] == [HE_IMAGE, MORPHOLOGY, TRANSCRIPTS]
    recorded = open_results(results_store).metadata["sample"]
    assert sdata.attrs[SAMPLE_ATTRS_KEY]["he_path"] == recorded["he_path"]
    assert sdata.attrs[SAMPLE_ATTRS_KEY]["xenium_dir"] == recorded["xenium_dir"]
    size = sum(p.stat().st_size for p in exports["default"].rglob("*") if p.is_file())
    full = sum(p.stat().st_size for p in exports["full"].rglob("*") if p.is_file())
    assert size < full / 5


def test_the_overview_lies_under_the_tiles_and_shows_the_he(exports, results_store, synthetic_sample):
    """A tile's H&E px box, taken into the overview's pixels (its he_px scale) and then to global
    (its global transform), is the tiles polygon; and the overview's pixels are the H&E's own."""
    results = open_results(results_store)
    sdata = sd.read_zarr(exports["default"])
    overview = sdata.images[HE_OVERVIEW]
    he_to_overview = np.linalg.inv(matrix_to(overview, HE_PX))
    overview_to_global = matrix_to(overview, "global")
    for k in (0, len(results.tiles) // 2, len(results.tiles) - 1):
        tile = results.tiles.iloc[k]
        corners_he = np.array([[tile.he_x0, tile.he_y0], [tile.he_x1, tile.he_y0], [tile.he_x1, tile.he_y1],
                               [tile.he_x0, tile.he_y1]])
        placed = apply_affine_xy(overview_to_global, apply_affine_xy(he_to_overview, corners_he))
        polygon = np.asarray(sdata.shapes[TILES].loc[int(tile.tile_id)].geometry.exterior.coords)[:4]
        np.testing.assert_allclose(placed, polygon, atol=1e-6)
    levels = element_levels_cyx(sample_of(synthetic_sample).images[HE_IMAGE])
    finest = np.asarray(element_levels_cyx(overview)[0])
    # one of the H&E's own levels, or (this small H&E's pyramid stops at 1.1 um/px) its coarsest averaged
    level = np.asarray(next((level for level in levels if level.shape == finest.shape), levels[-1]))
    block = level.shape[2] // finest.shape[2]
    _, height, width = finest.shape
    blocks = level[:, :height * block, :width * block].reshape(3, height, block, width, block)
    np.testing.assert_array_equal(finest, blocks.mean(axis=(2, 4)).round())
    he_pixel_um = open_results(results_store).metadata["sample"]["he_pixel_size_um"]
    assert matrix_to(overview, HE_PX)[0, 0] * he_pixel_um >= OVERVIEW_PIXEL_SIZE_UM * (1 - 1e-6)


def test_open_export_attaches_the_full_he_dapi_and_transcripts(exports, synthetic_sample, results_store):
    opened = open_export(exports["default"])
    full = sd.read_zarr(exports["full"])
    names = lambda s: {name for _, name, _ in s.gen_elements()}  # noqa: E731
    assert names(opened) == names(full)
    sample = sample_of(synthetic_sample)
    assert opened.images[HE_IMAGE]["scale0"]["image"].shape == sample.images[HE_IMAGE]["scale0"]["image"].shape
    np.testing.assert_allclose(matrix_to(opened.images[HE_IMAGE], "global"),
                               open_results(results_store).metadata["registration"]["matrix"])
    assert len(opened.points[TRANSCRIPTS]) == len(sample.points[TRANSCRIPTS])
    assert opened.images[MORPHOLOGY]["scale0"]["image"].shape == sample.images[MORPHOLOGY]["scale0"]["image"].shape
    assert open_export(exports["full"]).images.keys() == full.images.keys()


def test_no_export_changes_a_byte_of_the_sample(exports):
    assert exports["after"] == exports["before"]


def test_self_contained_keeps_the_full_copy(exports, results_store):
    sdata = sd.read_zarr(exports["full"])
    assert {HE_IMAGE, MORPHOLOGY, PREDICTED_IMAGE, MEASURED_IMAGE} == set(sdata.images)
    assert TRANSCRIPTS in sdata.points
    assert sdata.attrs[EXPORT_ATTRS_KEY]["self_contained"] is True
    np.testing.assert_allclose(matrix_to(sdata.images[HE_IMAGE], "global"),
                               open_results(results_store).metadata["registration"]["matrix"])


def test_a_moved_sample_names_what_is_missing_and_opens_where_it_is(results_store, synthetic_sample, tmp_path):
    copy = tmp_path / "sample"
    shutil.copytree(synthetic_sample.root, copy)
    target = tmp_path / "run.zarr"
    export_results(results_store, spatialdata=target, sample=open_sample(copy))
    moved = tmp_path / "moved"
    copy.rename(moved)
    with pytest.raises(InputError, match=rf"no longer where the export found it \(missing: {copy}.*open_sample"):
        open_export(target)
    opened = open_export(target, sample=open_sample(moved))
    assert opened.images[HE_IMAGE]["scale0"]["image"].shape == (
        sample_of(synthetic_sample).images[HE_IMAGE]["scale0"]["image"].shape)


def test_a_sample_that_records_no_files_needs_self_contained(results_store, synthetic_sample, tmp_path):
    sample = sample_of(synthetic_sample)
    del sample.attrs[SAMPLE_ATTRS_KEY]
    with pytest.raises(InputError, match="self-contained"):
        export_results(results_store, spatialdata=tmp_path / "run.zarr", h5ad=tmp_path / "run.h5ad", sample=sample)
    assert not list(tmp_path.iterdir()), "refused before anything is written"


def test_the_default_export_computes_nothing_of_the_dapi_or_the_transcripts(results_store, synthetic_sample,
                                                                            tmp_path):
    """The sample's DAPI replaced by an image that fails when any pixel is computed: the default export
    writes, the self-contained one (which copies it) fails."""
    sample = sample_of(synthetic_sample)

    def fail(block):
        raise AssertionError("a pixel of the DAPI was computed")

    shape = sample.images[MORPHOLOGY]["scale0"]["image"].shape
    poisoned = da.zeros(shape, dtype=np.uint16, chunks=(1, 1024, 1024)).map_blocks(fail, dtype=np.uint16)
    sample.images[MORPHOLOGY] = Image2DModel.parse(poisoned, dims=("c", "y", "x"))
    export_results(results_store, spatialdata=tmp_path / "run.zarr", sample=sample)
    assert HE_OVERVIEW in sd.read_zarr(tmp_path / "run.zarr").images
    with pytest.raises(AssertionError, match="DAPI was computed"):
        export_results(results_store, spatialdata=tmp_path / "full.zarr", sample=sample, self_contained=True)


def test_overwrite_rules_hold_for_the_default_export(exports, results_store, tmp_path):
    target = tmp_path / "run.zarr"
    shutil.copytree(exports["full"], target)
    with pytest.raises(InputError, match="already exists"):
        export_results(results_store, spatialdata=target)
    export_results(results_store, spatialdata=target, overwrite=True)  # an export of ours: replaced
    assert sd.read_zarr(target).attrs[EXPORT_ATTRS_KEY]["self_contained"] is False
    foreign = tmp_path / "theirs.zarr"
    sd.SpatialData(attrs={"lab": "data"}).write(foreign)
    with pytest.raises(InputError):
        export_results(results_store, spatialdata=foreign, overwrite=True)
    assert sd.read_zarr(foreign).attrs == {"lab": "data"}
    with pytest.raises(InputError, match="input of the run"):
        export_results(results_store, spatialdata=results_store / "inside.zarr")


def test_the_napari_reader_opens_a_default_export_with_the_full_he(exports, synthetic_sample):
    reader = get_reader(str(exports["default"]))
    assert reader is not None
    layers = {attrs["name"]: data for data, attrs, _ in reader(str(exports["default"]))}
    full_shape = sample_of(synthetic_sample).images[HE_IMAGE]["scale0"]["image"].shape
    assert layers[HE_LAYER][0].shape == (*full_shape[1:], 3)


def test_napari_spatialdata_shows_the_maps_over_the_overview(exports, results_store, make_napari_viewer, qtbot):
    from napari_spatialdata import Interactive

    viewer = make_napari_viewer()
    interactive = Interactive(sd.read_zarr(exports["default"]), headless=True)
    assert interactive._viewer is viewer
    for element in (HE_OVERVIEW, PREDICTED_IMAGE, TILES):  # napari-spatialdata adds layers from a worker thread
        interactive.add_element(element, "global")
        qtbot.waitUntil(lambda name=element: interactive.get_layer(name) is not None, timeout=120_000)
    sdata = interactive._sdata[0]
    he, genes = interactive.get_layer(HE_OVERVIEW), interactive.get_layer(PREDICTED_IMAGE)
    centres_global = open_results(results_store).tiles[["global_x", "global_y"]].to_numpy()[[0, -1]]

    def world_of(layer, name):  # where the viewer draws the tile centres through this layer's placement
        xy = apply_affine_xy(np.linalg.inv(matrix_to(sdata[name], "global")), centres_global) - 0.5
        leading = [0] * (layer.ndim - 2)  # napari's pixel i is centred on i, SpatialData's on i + 0.5
        return np.array([np.asarray(layer.data_to_world([*leading, y, x]))[-2:] for x, y in xy])

    np.testing.assert_allclose(world_of(he, HE_OVERVIEW), world_of(genes, PREDICTED_IMAGE), atol=1e-6)
    assert len(interactive.get_layer(TILES).data) == len(sdata.shapes[TILES])


@settings(max_examples=25, deadline=None)
@given(height=st.integers(16, 300), width=st.integers(16, 300), pixel_um=st.floats(0.1, 3.0),
       levels=st.integers(1, 3), x0=st.floats(0, 1), y0=st.floats(0, 1))
def test_the_overview_of_any_pyramid_is_coarse_bounded_and_placed(height, width, pixel_um, levels, x0, y0):
    """Any H&E (one level or a few halvings): the overview's pixel is at least the target size (unless
    the image is smaller than that) and at most twice it (or the H&E's own when that is coarser
    already), it covers the H&E but for one pixel at the far edges, it is placed by he_to_global
    after its scale, and averaged from one level its pixel (i, j) holds the rounded mean of the H&E
    pixels under it."""
    base = np.random.default_rng(0).integers(0, 256, (3, height, width), dtype=np.uint8)
    arrays = [da.from_array(base, chunks=(3, 64, 64))]
    for _ in range(levels - 1):
        arrays.append(arrays[-1][:, ::2, ::2])
    element = dask_arrays_to_datatree(arrays, dims=("c", "y", "x"), channels=["r", "g", "b"])
    he_to_global = np.array([[1.1, -0.2, 5.0], [0.3, 0.9, -7.0], [0, 0, 1]])
    overview = he_overview(element, he_to_global, pixel_um)
    scale = matrix_to(overview, HE_PX)
    step_xy = np.diag(scale)[:2]
    finest = np.asarray(overview["scale0"]["image"].data)
    assert step_xy[0] * pixel_um <= max(pixel_um, 2 * OVERVIEW_PIXEL_SIZE_UM)
    assert step_xy[0] * pixel_um >= OVERVIEW_PIXEL_SIZE_UM * (1 - 1e-6) or min(finest.shape[1:]) == 1
    covered = np.array(finest.shape[:0:-1]) * step_xy
    assert (covered <= np.array([width, height]) + 1e-6).all()
    assert (covered > np.array([width, height]) - step_xy - 1e-6).all()
    np.testing.assert_allclose(matrix_to(overview, "global"), he_to_global @ scale)
    if levels == 1:
        block = round(step_xy[0])
        j, i = int(x0 * (finest.shape[2] - 1)), int(y0 * (finest.shape[1] - 1))
        expected = base[:, i * block:(i + 1) * block, j * block:(j + 1) * block].mean(axis=(1, 2))
        np.testing.assert_allclose(finest[:, i, j], np.round(expected))
