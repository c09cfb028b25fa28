"""The Predict dock, driven as a user would, under Xvfb: region from a Shapes layer, run, explore."""

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_morphomol.inference import open_results
from napari_morphomol.io.sample import load_sample
from napari_morphomol.layers.run import PREDICTED_LAYER
from napari_morphomol.layers.sample import sample_layers
from napari_morphomol.widgets.predict import WHOLE_SLIDE, PredictWidget


@pytest.fixture
def viewer_with_sample(make_napari_viewer, synthetic_sample):
    viewer = make_napari_viewer()
    s = synthetic_sample
    sdata = load_sample(s.xenium_dir, s.he_path, s.alignment_csv)
    for data, kwargs, kind in sample_layers(sdata, with_density=False):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    return viewer


def test_run_on_a_drawn_region_opens_the_maps(viewer_with_sample, qtbot, results_store, tmp_path):
    """With the shipped model (preselected), on the synthetic sample."""
    viewer = viewer_with_sample
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Predict")
    whole = open_results(results_store).tiles
    # a rectangle (um) around the upper half of the tiles of a whole-slide run
    x_um, y_um = whole["um_x"].to_numpy(), whole["um_y"].to_numpy()
    cut = float(np.median(y_um))
    region = viewer.add_shapes(name="region")
    region.add_rectangles(np.array([[y_um.min() - 5, x_um.min() - 5], [cut, x_um.max() + 5]]))
    widget.region.value = "region"
    widget.device.value = "cpu"
    widget.batch_size.value = 8
    widget.interval_level.value = 0.8
    widget.store.value = tmp_path / "RESULTS.zarr"
    widget.run_button.clicked.emit()
    assert not widget.run_button.enabled and widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget.explore_widget is not None and widget.explore_widget.explorer is not None,
                    timeout=300_000)
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=10_000)
    tiles = widget.explore_widget.explorer.results.tiles
    assert 0 < len(tiles) < len(whole)
    assert (tiles["um_y"] <= cut + 1e-6).all()  # tiles are kept by their centre
    assert PREDICTED_LAYER in viewer.layers
    assert "chunks" in widget.status.value or "done" in widget.status.value
    qtbot.waitUntil(lambda: widget.explore_widget.explorer.trust.unavailable is None, timeout=60_000)
    assert widget.explore_widget.explorer.trust.level == 0.8  # the shipped model is calibrated
    assert "80% intervals" in widget.explore_widget.trust_note.text()


def test_missing_checkpoint_is_a_message_not_a_traceback(viewer_with_sample, tmp_path):
    widget = PredictWidget(viewer_with_sample)
    widget.region.value = WHOLE_SLIDE
    widget.checkpoint.value = tmp_path / "missing.safetensors"
    widget.store.value = tmp_path / "RESULTS.zarr"
    assert widget.run() is None
    assert "checkpoint" in widget.status.value


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there: nothing to refuse")
def test_a_missing_gpu_is_explained_in_the_docks_words(viewer_with_sample, qtbot, tiny_checkpoint, tmp_path):
    """The refusal names the dock's device box, not the command line's --device flag (issue 18, 10)."""
    widget = PredictWidget(viewer_with_sample)
    widget.region.value = WHOLE_SLIDE
    widget.checkpoint.value = tiny_checkpoint
    widget.device.value = "cuda"
    widget.store.value = tmp_path / "RESULTS.zarr"
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "CUDA" in widget.status.value, timeout=60_000)
    assert "choose device auto" in widget.status.value.lower() and "--device" not in widget.status.value


def test_no_sample_is_a_message(make_napari_viewer, tiny_checkpoint, tmp_path):
    widget = PredictWidget(make_napari_viewer())
    widget.checkpoint.value = tiny_checkpoint
    widget.store.value = tmp_path / "RESULTS.zarr"
    assert widget.run() is None
    assert "Load sample" in widget.status.value


def test_the_shipped_model_is_preselected(make_napari_viewer):
    from napari_morphomol.inference import default_checkpoint_path

    widget = PredictWidget(make_napari_viewer())
    assert Path(widget.checkpoint.value) == default_checkpoint_path()


def test_maps_fill_in_mid_run_then_cancel_and_run_again_resumes(viewer_with_sample, qtbot, tmp_path, monkeypatch):
    """The real predict in chunks of 4 tiles. Chunks after the first to start wait until the test
    has seen the partial maps and pressed Cancel, so events come in a user's order, not a race's."""
    from napari_morphomol import inference
    from napari_morphomol.inference import partial_path, predict, scheduling

    cancel_pressed = threading.Event()
    started, lock = [], threading.Lock()
    run_chunk = scheduling.run_chunk

    def run_chunk_after_the_first_waits(spec, chunk):
        with lock:  # whichever chunk the scheduler starts first runs; the others wait
            started.append(chunk)
            first = len(started) == 1
        if not first:
            cancel_pressed.wait(120)
        return run_chunk(spec, chunk)

    monkeypatch.setattr(scheduling, "run_chunk", run_chunk_after_the_first_waits)
    monkeypatch.setattr(inference, "predict", lambda sample, options, **kwargs: predict(
        sample, dataclasses.replace(options, tiles_per_chunk=4), **kwargs))
    viewer = viewer_with_sample
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Predict")
    widget.device.value = "cpu"
    widget.batch_size.value = 2
    store = tmp_path / "RESULTS.zarr"
    widget.store.value = store
    widget.run_button.clicked.emit()

    # the first chunk's tiles (4, or 3 in the last chunk of 15 tiles) are on the map, the others empty
    qtbot.waitUntil(lambda: widget.explore_widget is not None and widget.explore_widget.explorer is not None,
                    timeout=300_000)
    partial = widget.explore_widget.explorer.results.predictions
    finite = np.isfinite(partial).all(axis=1)
    assert finite.sum() in (3, 4)
    assert PREDICTED_LAYER in viewer.layers
    widget.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: (partial_path(store) / scheduling.CANCEL_MARKER).exists(), timeout=30_000)
    cancel_pressed.set()
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=120_000)
    assert widget.status.value.startswith("cancelled")
    assert partial_path(store).exists() and not store.exists()

    widget.run_button.clicked.emit()  # same settings: resumes
    qtbot.waitUntil(lambda: store.exists() and widget.run_button.enabled, timeout=300_000)
    assert widget.status.value.startswith("done")
    finished = open_results(store)
    assert np.isfinite(finished.predictions).all() and len(finished.tiles) == len(partial)
    np.testing.assert_allclose(finished.predictions[finite], partial[finite], rtol=1e-5, atol=1e-5)
