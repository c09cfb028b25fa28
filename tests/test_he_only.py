"""H&E alone: the image-only route, from the files a pathologist has, through predict, export and Explore."""

from __future__ import annotations

import dataclasses

import anndata
import numpy as np
import pytest
import spatialdata
import tifffile

from napari_morphomol.analysis import explore_run
from napari_morphomol.analysis.run_explorer import IMAGE_ROUTE_NOTE
from napari_morphomol.cli import main
from napari_morphomol.elements import HE_IMAGE, TRANSCRIPTS, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.export import open_export
from napari_morphomol.inference import PredictOptions, open_results, predict, run_route
from napari_morphomol.io.sample import load_sample
from napari_morphomol.models import save_checkpoint
from napari_morphomol.tiling.pipeline import HE_FRAME_PIXEL_SIZE_UM

FORMATS = ("ome-tiff", "svs", "tiff")


def write_he(path, image: np.ndarray, pixel_size_um: float, form: str) -> None:
    """``image`` (y, x, 3 uint8) as a pathologist's file: a JPEG-tiled OME-TIFF pyramid with its
    physical pixel size, an Aperio SVS (baseline, thumbnail, reduced level; MPP in the description)
    or a plain tiled TIFF whose resolution tags hold the pixel size."""
    tile = (256, 256)
    if form == "ome-tiff":
        with tifffile.TiffWriter(path, ome=True) as tif:
            tif.write(image, subifds=1, tile=tile, photometric="rgb", compression="jpeg",
                      metadata={"axes": "YXS", "PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um,
                                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
            tif.write(image[::2, ::2], subfiletype=1, tile=tile, photometric="rgb", compression="jpeg")
    elif form == "svs":
        height, width = image.shape[:2]
        aperio = "Aperio Image Library v12.0.15 \n"
        with tifffile.TiffWriter(path) as tif:
            tif.write(image, tile=tile, photometric="rgb", compression="jpeg", metadata=None,
                      description=f"{aperio}{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=70|AppMag = "
                                  f"20|MPP = {pixel_size_um}")
            tif.write(image[::8, ::8], photometric="rgb", compression="jpeg", metadata=None,
                      description=f"{aperio}thumbnail")
            tif.write(image[::4, ::4], tile=tile, photometric="rgb", compression="jpeg", metadata=None,
                      description=f"{aperio}level 1")
    else:
        tifffile.imwrite(path, image, photometric="rgb", tile=tile, resolution=(1e4 / pixel_size_um,) * 2,
                         resolutionunit="CENTIMETER")


@pytest.fixture(scope="session")
def he_files(tmp_path_factory, synthetic_sample):
    """The synthetic sample's H&E at half resolution in each form, with its pixel size."""
    image = np.asarray(tifffile.imread(synthetic_sample.he_path, level=0))[::2, ::2]
    pixel_size_um = 2 * sample_info(load_sample(he_path=synthetic_sample.he_path)).he_pixel_size_um
    folder = tmp_path_factory.mktemp("he_files")
    paths = {}
    for form, name in zip(FORMATS, ("slide.ome.tif", "slide.svs", "slide.tif"), strict=True):
        write_he(folder / name, image, pixel_size_um, form)
        paths[form] = folder / name
    return paths, pixel_size_um


@pytest.fixture(scope="session")
def he_only_store(tmp_path_factory, he_files, dropout_checkpoint):
    """A finished image-only run over the OME-TIFF, from the command line."""
    out = tmp_path_factory.mktemp("he_only") / "RESULTS.zarr"
    assert main(["predict", "--he", str(he_files[0]["ome-tiff"]), "--checkpoint", str(dropout_checkpoint),
                 "--out", str(out), "--device", "cpu", "--batch-size", "8"]) == 0
    return out


@pytest.mark.parametrize("form", FORMATS)
def test_each_form_opens_with_its_pixel_size(he_files, form):
    paths, pixel_size_um = he_files
    sdata = load_sample(he_path=paths[form])
    info = sample_info(sdata)
    assert info.he_pixel_size_um == pytest.approx(pixel_size_um, rel=1e-6)
    assert info.xenium_dir is None and TRANSCRIPTS not in sdata.points
    levels = len(sdata.images[HE_IMAGE].children)
    assert levels == (1 if form == "tiff" else 2)


@pytest.mark.parametrize("form", FORMATS)
def test_predict_from_each_form_runs_image_only(he_files, dropout_checkpoint, tmp_path, capsys, form):
    paths, pixel_size_um = he_files
    out = tmp_path / "R.zarr"
    assert main(["predict", "--he", str(paths[form]), "--checkpoint", str(dropout_checkpoint), "--out", str(out),
                 "--device", "cpu", "--batch-size", "8"]) == 0
    assert "from the H&E alone" in capsys.readouterr().out
    results = open_results(out)
    assert results.route == "image" and results.measured_genes == [] and results.measured_counts is None
    assert len(results.tiles) > 0 and np.isfinite(results.predictions).all()
    # tiles lie in H&E um: a tile's centre is its H&E px box centre times the pixel size
    tiles = results.tiles
    centre_px = (tiles["he_x0"] + tiles["he_x1"]) / 2
    assert results.frame_pixel_size_um == HE_FRAME_PIXEL_SIZE_UM
    np.testing.assert_allclose(tiles["um_x"], centre_px * pixel_size_um, rtol=1e-9)
    np.testing.assert_allclose(tiles["global_x"], tiles["um_x"])
    assert results.metadata["sample"]["xenium_dir"] is None


def test_the_same_slide_by_both_routes_differs_only_in_inputs(synthetic_sample, dropout_checkpoint, tmp_path):
    """With its Xenium run the model gets both inputs; the H&E alone gives the same tiles, image-only."""
    s = synthetic_sample
    both = predict(load_sample(s.xenium_dir, s.he_path, s.alignment_csv),
                   PredictOptions(checkpoint=dropout_checkpoint, store=tmp_path / "both.zarr", device="cpu",
                                  dtype="float32", batch_size=8, max_background=0.3))
    image = predict(load_sample(he_path=s.he_path),
                    PredictOptions(checkpoint=dropout_checkpoint, store=tmp_path / "image.zarr", device="cpu",
                                   dtype="float32", batch_size=8))
    both, image = open_results(both), open_results(image)
    assert (both.route, image.route) == ("both", "image")
    assert both.measured_genes and not image.measured_genes
    same = both.tiles.merge(image.tiles, on=["row", "col"], suffixes=("_both", "_image"))
    assert len(same) == len(both.tiles)  # the tissue filter does not depend on the transcripts
    first = both.tiles.set_index(["row", "col"]).index.get_indexer(image.tiles.set_index(["row", "col"]).index)
    assert not np.allclose(both.predictions[first], image.predictions)  # transcripts change the prediction
    # side by side (the demo's screenshot), the H&E alone is carried into the Xenium frame: the same
    # tile lands on the same place
    from napari_morphomol.layers.run import he_alone_in_frame_of

    affine = he_alone_in_frame_of(explore_run(both.path), explore_run(image.path))
    centres_rc = np.c_[image.tiles["um_y"], image.tiles["um_x"], np.ones(len(image.tiles))]
    moved = (affine @ centres_rc.T).T[:, :2]
    np.testing.assert_allclose(moved, both.tiles[["um_y", "um_x"]].to_numpy()[first], atol=1e-6)
    assert he_alone_in_frame_of(explore_run(image.path), explore_run(both.path)) is None


def test_a_model_without_dropout_refuses_the_he_alone_before_any_work(he_files, tmp_path, tiny_checkpoint, capsys):
    checkpoint = tiny_checkpoint
    out = tmp_path / "R.zarr"
    code = main(["predict", "--he", str(he_files[0]["svs"]), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--device", "cpu"])
    message = capsys.readouterr().err
    assert code != 0 and "trained without modality dropout" in message and "--modality-dropout" in message
    assert not out.exists() and not out.with_name("R.zarr.partial").exists()
    with pytest.raises(InputError, match="cannot predict from the H&E alone"):
        run_route(load_sample(he_path=he_files[0]["svs"]), checkpoint)


def test_an_alignment_without_a_xenium_run_is_refused(he_files, dropout_checkpoint, tmp_path, capsys,
                                                       synthetic_sample):
    code = main(["predict", "--he", str(he_files[0]["tiff"]), "--alignment", str(synthetic_sample.alignment_csv),
                 "--checkpoint", str(dropout_checkpoint), "--out", str(tmp_path / "R.zarr")])
    assert code != 0 and "give the sample (SAMPLE) too" in capsys.readouterr().err


def test_he_only_results_export_and_reopen(he_only_store, he_files, tmp_path):
    paths, pixel_size_um = he_files
    h5ad, sdata_path = tmp_path / "run.h5ad", tmp_path / "run.zarr"
    assert main(["export", str(he_only_store), "--h5ad", str(h5ad), "--spatialdata", str(sdata_path)]) == 0
    adata = anndata.read_h5ad(h5ad)
    results = open_results(he_only_store)
    np.testing.assert_allclose(adata.obsm["spatial"], results.tiles[["um_x", "um_y"]].to_numpy())
    assert "H&E um" in adata.uns["morphomol"]["spatial_units"] and "measured" not in adata.layers
    sdata = open_export(sdata_path)  # the H&E the default export refers to, attached from its file
    assert {HE_IMAGE, "predicted_expression", "predicted_expression_tokens"} <= set(sdata.images)
    assert "measured_expression" not in sdata.images
    # the H&E and the maps share the global frame, in um
    matrix = spatialdata.transformations.get_transformation(sdata.images[HE_IMAGE], "global").to_affine_matrix(
        ("x", "y"), ("x", "y"))
    np.testing.assert_allclose(matrix[:2, :2], np.eye(2) * pixel_size_um)
    explorer = explore_run(he_only_store)
    assert explorer.route_note == IMAGE_ROUTE_NOTE and explorer.map_kinds == ("predicted",)
    assert explorer.metrics.empty
    assert "no Xenium" in explorer.cell_view_refusal() or "Xenium folder" in explorer.cell_view_refusal()


def test_a_calibration_of_the_fused_route_alone_is_not_applied_to_the_image_route(he_files,
                                                                                dropout_trusted_checkpoint, tmp_path):
    """Intervals calibrated with both inputs would be too narrow for the image alone: a card that
    calibrated only the fused route (as before routes were calibrated) shows none on an H&E alone."""
    from napari_morphomol.models import load_checkpoint

    model, card = load_checkpoint(dropout_trusted_checkpoint)
    fused_only = dataclasses.replace(card, calibration=dataclasses.replace(card.calibration, routes={}))
    checkpoint = save_checkpoint(model, fused_only, tmp_path / "fused-only.safetensors")
    out = predict(load_sample(he_path=he_files[0]["ome-tiff"]),
                  PredictOptions(checkpoint=checkpoint, store=tmp_path / "R.zarr", device="cpu", batch_size=8))
    trust = open_results(out).trust
    assert trust.unavailable and "the H&E alone" in trust.unavailable and not trust.has_intervals
    assert explore_run(out).map_kinds == ("predicted",)


@pytest.fixture
def viewer_with_he_alone(make_napari_viewer, qtbot, he_files):
    """The SVS opened in the Load sample dock with nothing else, as a user with an H&E alone would."""
    from napari_morphomol.layers.sample import HE_LAYER
    from napari_morphomol.widgets.load_sample import LoadSampleWidget

    viewer = make_napari_viewer()
    load = LoadSampleWidget(viewer)
    viewer.window.add_dock_widget(load, name="Load sample")
    load.he_path.value = he_files[0]["svs"]
    load.load_button.clicked.emit()
    qtbot.waitUntil(lambda: HE_LAYER in viewer.layers and load.load_button.enabled, timeout=60_000)
    assert "H&E alone" in load.status.value
    return viewer


def test_the_docks_predict_an_he_alone_and_explore_says_why_maps_are_missing(viewer_with_he_alone, qtbot,
                                                                            dropout_checkpoint, tmp_path):
    from napari_morphomol.layers.run import PREDICTED_LAYER
    from napari_morphomol.widgets.predict import WHOLE_SLIDE, PredictWidget

    viewer = viewer_with_he_alone
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Predict")
    widget.checkpoint.value = dropout_checkpoint
    widget.region.value = WHOLE_SLIDE
    widget.device.value = "cpu"
    widget.batch_size.value = 8
    widget.store.value = tmp_path / "RESULTS.zarr"
    widget.run_button.clicked.emit()
    assert "from the H&E alone" in widget.status.value
    qtbot.waitUntil(lambda: widget.results_path is not None, timeout=300_000)
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=10_000)
    explore = widget.explore_widget
    assert explore.explorer.results.route == "image"
    assert set(explore.map_layers) == {"predicted"} and PREDICTED_LAYER in viewer.layers
    assert "H&E alone" in explore.status.text() and "no measured or residual maps" in explore.status.text()
    assert "predicted from the H&E alone" in viewer.canvas.overlays.text.text
    assert explore.metrics_table.rowCount() == 0


def test_the_predict_dock_refuses_a_model_without_dropout_at_once(viewer_with_he_alone, tiny_checkpoint, tmp_path):
    from napari_morphomol.widgets.predict import WHOLE_SLIDE, PredictWidget

    widget = PredictWidget(viewer_with_he_alone)
    widget.checkpoint.value = tiny_checkpoint
    widget.region.value = WHOLE_SLIDE
    widget.store.value = tmp_path / "RESULTS.zarr"
    assert widget.run() is None  # no worker started
    assert "trained without modality dropout" in widget.status.value
    assert not (tmp_path / "RESULTS.zarr").exists()


def test_calibrating_on_an_he_alone_run_is_refused(he_only_store, dropout_checkpoint):
    from napari_morphomol.analysis.calibration import calibrate_on_runs
    from napari_morphomol.models import read_model_card

    with pytest.raises(InputError, match="gave the model image inputs only; calibrate on runs with every input"):
        calibrate_on_runs([explore_run(he_only_store)], read_model_card(dropout_checkpoint), ["slide"])
