"""The Register H&E to Xenium dock widget, driven as a user would, under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QMessageBox
from spatialdata.transformations import get_transformation

from napari_morphomol.coords import GLOBAL, layer_affine_um, napari_to_xy, xy_to_napari
from napari_morphomol.elements import HE_IMAGE
from napari_morphomol.io.sample import load_sample
from napari_morphomol.layers.sample import DAPI_LAYER, HE_LAYER, sample_layers
from napari_morphomol.registration import read_alignment_csv, read_keypoints_csv
from napari_morphomol.widgets.registration import (
    ALIGNMENT,
    BIGWARP,
    HE_POINTS_LAYER,
    KEYPOINTS,
    OVERLAY,
    SIDE_BY_SIDE,
    XENIUM_POINTS_LAYER,
    RegistrationWidget,
)

PIXEL_UM = 0.2125


@pytest.fixture
def opened(make_napari_viewer, synthetic_sample):
    """A viewer with the sample's H&E (not yet registered) and DAPI, and the widget docked."""
    viewer = make_napari_viewer()
    sdata = load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path)
    for data, kwargs, kind in sample_layers(sdata, with_density=False):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = RegistrationWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Register H&E to Xenium")
    return viewer, widget, sdata


def click(layer, data_xy):
    """What a click in add mode does: the world position under the cursor, back to layer data."""
    world = layer.data_to_world(xy_to_napari(np.atleast_2d(data_xy))[0])
    layer.add(layer.world_to_data(world))


def click_pairs(viewer, widget, he_px, global_px):
    for h, g in zip(he_px, global_px):
        assert viewer.layers.selection.active is widget.he_points
        click(widget.he_points, h)
        assert viewer.layers.selection.active is widget.xenium_points  # clicks alternate
        click(widget.xenium_points, g)


def table_rows(widget):
    value = widget.table.value
    return list(value["index"]), [float(row[0]) for row in value["data"]]


def test_click_fit_apply_undo_redo(opened, synthetic_sample, qtbot):
    viewer, widget, sdata = opened
    assert widget.view.value == SIDE_BY_SIDE  # nothing to overlay before a registration
    he_image, dapi = viewer.layers[HE_LAYER], viewer.layers[DAPI_LAYER]
    assert he_image.extent.world[0][1] > dapi.extent.world[1][1]  # H&E to the right of the DAPI
    truth = read_alignment_csv(synthetic_sample.alignment_csv)
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    he_px = pairs.he_px[:6].copy()
    he_px[4] += [30.0, -20.0]  # one sloppy click
    click_pairs(viewer, widget, he_px, pairs.global_px[:6])
    # side by side, the H&E points still hold H&E px
    np.testing.assert_allclose(napari_to_xy(widget.he_points.data), he_px, atol=1e-6)
    np.testing.assert_allclose(napari_to_xy(widget.xenium_points.data), pairs.global_px[:6], atol=1e-6)
    assert list(widget.he_points.features["name"]) == [f"Pt-{i}" for i in range(6)]
    assert list(widget.xenium_points.features["name"]) == [f"Pt-{i}" for i in range(6)]

    qtbot.waitUntil(lambda: len(widget.table.value["index"]) == 6, timeout=5000)  # live residuals
    names, residuals = table_rows(widget)
    assert names[0] == "Pt-4" and residuals == sorted(residuals, reverse=True)
    fitted = widget.fitted
    np.testing.assert_allclose(residuals, np.sort(fitted.residuals_um)[::-1], atol=0.01)
    assert residuals[0] > 3.0 and residuals[-1] < residuals[0] / 2

    widget.model.value = "similarity"
    widget.fit_button.clicked.emit()
    assert widget.fitted.model == "similarity" and "similarity: RMSE" in widget.status.value
    widget.view.value = OVERLAY
    widget.apply_button.clicked.emit()
    applied = widget.fitted.best_affine
    expected = layer_affine_um(applied, PIXEL_UM)
    np.testing.assert_allclose(he_image.affine.affine_matrix, expected, atol=1e-9)
    np.testing.assert_allclose(widget.he_points.affine.affine_matrix, expected, atol=1e-9)
    np.testing.assert_allclose(he_image.translate, 0.0, atol=1e-9)
    np.testing.assert_allclose(
        get_transformation(sdata.images[HE_IMAGE], GLOBAL).to_affine_matrix(("x", "y"), ("x", "y")), applied
    )
    # the H&E now lies on the Xenium image: held-out landmarks land within a few um of the truth
    held_out = pairs.he_px[6:]
    world = np.array([he_image.data_to_world(p) for p in xy_to_napari(held_out)])
    true_um = (held_out @ truth[:2, :2].T + truth[:2, 2]) * PIXEL_UM
    assert np.linalg.norm(napari_to_xy(world) - true_um, axis=1).max() < 5.0
    np.testing.assert_allclose(napari_to_xy(widget.he_points.data), he_px, atol=1e-6)  # data never moves

    widget.undo_button.clicked.emit()
    before = layer_affine_um(np.diag([0.2737 / PIXEL_UM, 0.2737 / PIXEL_UM, 1.0]), PIXEL_UM)
    assert np.abs(he_image.affine.affine_matrix - before).max() < 1e-3
    assert GLOBAL not in get_transformation(sdata.images[HE_IMAGE], get_all=True)
    assert not widget.undo_button.enabled and widget.redo_button.enabled
    widget.redo_button.clicked.emit()
    np.testing.assert_allclose(he_image.affine.affine_matrix, expected, atol=1e-9)
    np.testing.assert_allclose(widget.he_points.affine.affine_matrix, expected, atol=1e-9)

    # side by side again: shifted by a translate only, clicks still give H&E px
    widget.view.value = SIDE_BY_SIDE
    np.testing.assert_allclose(he_image.affine.affine_matrix, expected, atol=1e-9)
    assert he_image.extent.world[0][1] > dapi.extent.world[1][1]
    np.testing.assert_allclose(widget.he_points.translate, he_image.translate)
    click(widget.he_points, [500.0, 600.0])
    np.testing.assert_allclose(napari_to_xy(widget.he_points.data[-1:]), [[500.0, 600.0]], atol=1e-6)

    # selecting the worst row centres the view on that pair
    widget.view.value = OVERLAY
    widget.he_points.remove([6])
    widget.fit()
    worst = widget.table.value["index"][0]
    widget.table.native.selectRow(0)
    i = list(widget.he_points.features["name"]).index(worst)
    centre_xy = napari_to_xy(np.array([viewer.scene.camera.center[-2:]]))[0]
    np.testing.assert_allclose(centre_xy, pairs.global_px[i] * PIXEL_UM, atol=1e-6)
    assert widget.he_points.selected_data == {i} and widget.xenium_points.selected_data == {i}

    # double-click: leave the worst pair out of the fit; it keeps its (now larger) residual
    widget.table.native.cellDoubleClicked.emit(0, 0)
    assert not widget.fitted.used[i] and widget.fitted.used.sum() == 5
    row = widget.table.value["index"].index(worst)
    assert widget.table.value["data"][row][2] == "no"
    widget.table.native.cellDoubleClicked.emit(row, 0)
    assert widget.fitted.used.all()

    widget.flick_button.clicked.emit()
    assert he_image.opacity == 0.0 and dapi.opacity == 1.0
    widget.flick_button.clicked.emit()
    assert he_image.opacity == 1.0 and dapi.opacity == 0.0


def test_delete_removes_the_partner(opened):
    viewer, widget, _ = opened
    click_pairs(
        viewer, widget, [[100.0, 100.0], [200.0, 300.0], [400.0, 100.0]], [[120.0, 90.0], [250.0, 380.0], [500.0, 80.0]]
    )
    widget.xenium_points.remove([1])
    assert len(widget.he_points.data) == len(widget.xenium_points.data) == 2
    assert list(widget.he_points.features["name"]) == ["Pt-0", "Pt-2"]
    np.testing.assert_allclose(napari_to_xy(widget.he_points.data), [[100.0, 100.0], [400.0, 100.0]], atol=1e-6)
    click_pairs(viewer, widget, [[300.0, 300.0]], [[350.0, 390.0]])
    assert list(widget.xenium_points.features["name"]) == ["Pt-0", "Pt-2", "Pt-1"]


def test_deleting_a_landmark_layer_leaves_new_empty_ones_for_the_loaded_sample(opened, qtbot):
    """Issue 18, finding 8: deleting one landmark layer deletes its partner too (pairs need both),
    but the sample is still loaded: new empty layers come at once, and Fit asks for pairs, not for
    a sample."""
    viewer, widget, _ = opened
    click_pairs(viewer, widget, [[100.0, 100.0], [200.0, 300.0]], [[120.0, 90.0], [250.0, 380.0]])
    old_he, old_xenium = widget.he_points, widget.xenium_points
    viewer.layers.remove(old_he)
    assert old_xenium not in viewer.layers
    qtbot.waitUntil(lambda: widget.he_points is not None, timeout=10_000)
    assert widget.he_points is not old_he and len(widget.he_points.data) == 0
    assert HE_POINTS_LAYER in viewer.layers and XENIUM_POINTS_LAYER in viewer.layers
    assert "deleted with their 2 pairs; new empty ones are ready" in widget.status.value
    widget.fit_button.clicked.emit()
    assert "load a sample" not in widget.status.value and "landmark pairs" in widget.status.value
    click_pairs(viewer, widget, [[100.0, 100.0]], [[120.0, 90.0]])  # clicking goes on in the new layers
    assert len(widget.he_points.data) == len(widget.xenium_points.data) == 1


def test_bad_clicks_are_messages_not_tracebacks(opened):
    viewer, widget, _ = opened
    click_pairs(viewer, widget, [[100.0, 100.0], [900.0, 300.0]], [[120.0, 90.0], [1200.0, 380.0]])
    widget.fit_button.clicked.emit()
    assert "affine model needs at least 3 active landmark pairs; there are 2" in widget.status.value
    assert widget.fitted is None and widget.table.value["index"] == ()
    widget.model.value = "translation"
    widget.fit_button.clicked.emit()
    assert widget.fitted is not None
    click(widget.he_points, [500.0, 900.0])
    widget.fit_button.clicked.emit()
    assert "3 H&E points but 2 Xenium points" in widget.status.value and widget.fitted is None
    click(widget.xenium_points, [-40.0, 800.0])
    widget.fit_button.clicked.emit()
    assert "Pt-2 lie outside the Xenium image" in widget.status.value
    widget.apply_button.clicked.emit()
    assert "nothing to apply" in widget.status.value
    assert not widget.undo_button.enabled


def _answer_overwrite(widget, button):
    QTimer.singleShot(200, lambda: widget.question.button(button).click())


def test_export_asks_before_overwriting_and_reimports(opened, synthetic_sample, tmp_path):
    viewer, widget, sdata = opened
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    click_pairs(viewer, widget, pairs.he_px[:5], pairs.global_px[:5])
    widget.fit()
    widget.apply()
    for fmt, name in ((KEYPOINTS, "keypoints.csv"), (BIGWARP, "bigwarp.csv"), (ALIGNMENT, "alignment.csv")):
        widget.file_format.value = fmt
        widget.export_path.value = tmp_path / name
        widget.export_button.clicked.emit()
        assert (tmp_path / name).is_file() and "wrote" in widget.status.value
    np.testing.assert_allclose(read_alignment_csv(tmp_path / "alignment.csv"), widget.fitted.best_affine)
    widget.export_path.value = tmp_path
    widget.export_button.clicked.emit()
    assert "is a folder" in widget.status.value

    widget.file_format.value = KEYPOINTS
    widget.export_path.value = tmp_path / "keypoints.csv"
    (tmp_path / "keypoints.csv").write_text("fixedX,fixedY,alignmentX,alignmentY\n")
    _answer_overwrite(widget, QMessageBox.StandardButton.No)
    widget.export_button.clicked.emit()
    assert "not written" in widget.status.value
    assert (tmp_path / "keypoints.csv").read_text() == "fixedX,fixedY,alignmentX,alignmentY\n"
    _answer_overwrite(widget, QMessageBox.StandardButton.Yes)
    widget.export_button.clicked.emit()
    assert len(read_keypoints_csv(tmp_path / "keypoints.csv")) == 5

    # re-import into a fresh start: same pairs, same fit
    fitted = widget.fitted
    widget.he_points.remove(list(range(5)))
    assert len(widget.xenium_points.data) == 0
    for fmt, name in ((KEYPOINTS, "keypoints.csv"), (BIGWARP, "bigwarp.csv")):
        widget.file_format.value = fmt
        widget.import_path.value = tmp_path / name
        widget.import_button.clicked.emit()
        assert "read 5 pairs" in widget.status.value
        np.testing.assert_allclose(napari_to_xy(widget.he_points.data), pairs.he_px[:5], atol=1e-6)
        np.testing.assert_allclose(napari_to_xy(widget.xenium_points.data), pairs.global_px[:5], atol=1e-6)
        np.testing.assert_allclose(widget.fitted.residuals_um, fitted.residuals_um)

    # an alignment matrix moves the H&E directly, undoably
    widget.undo()
    widget.file_format.value = ALIGNMENT
    widget.import_path.value = synthetic_sample.alignment_csv
    widget.import_button.clicked.emit()
    truth = read_alignment_csv(synthetic_sample.alignment_csv)
    np.testing.assert_allclose(viewer.layers[HE_LAYER].affine.affine_matrix, layer_affine_um(truth, PIXEL_UM))
    widget.import_path.value = tmp_path / "bigwarp.csv"  # landmarks read as a matrix: a message, no move
    widget.import_button.clicked.emit()
    assert "bigwarp.csv, line 1: expected numbers" in widget.status.value
    np.testing.assert_allclose(viewer.layers[HE_LAYER].affine.affine_matrix, layer_affine_um(truth, PIXEL_UM))


def test_automatic_start_fills_both_layers(opened, synthetic_sample, qtbot):
    viewer, widget, _ = opened
    worker = widget.start_automatic()
    assert not widget.auto_button.enabled
    qtbot.waitUntil(lambda: widget.auto_button.enabled, timeout=120_000)
    n = len(widget.he_points.data)
    assert n >= 3 and len(widget.xenium_points.data) == n and "pairs proposed" in widget.status.value
    assert list(widget.he_points.features["name"])[0] == "auto-0"
    truth = read_alignment_csv(synthetic_sample.alignment_csv)
    he = napari_to_xy(widget.he_points.data)
    error_um = (
        np.linalg.norm(he @ truth[:2, :2].T + truth[:2, 2] - napari_to_xy(widget.xenium_points.data), axis=1)
        * PIXEL_UM
    )
    assert np.median(error_um) < 3.0
    assert widget.fitted is not None and worker is not None


def test_automatic_start_asks_before_replacing_clicked_pairs(opened, synthetic_sample, qtbot):
    """Issue 18, finding 8: clicked pairs are not replaced without asking; No keeps them."""
    viewer, widget, _ = opened
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    click_pairs(viewer, widget, pairs.he_px[:3], pairs.global_px[:3])
    _answer_overwrite(widget, QMessageBox.StandardButton.No)
    assert widget.start_automatic() is None
    assert len(widget.he_points.data) == 3 and "kept the 3 clicked points" in widget.status.value
    _answer_overwrite(widget, QMessageBox.StandardButton.Yes)
    assert widget.start_automatic() is not None
    qtbot.waitUntil(lambda: widget.auto_button.enabled, timeout=120_000)
    assert list(widget.he_points.features["name"])[0] == "auto-0"


def test_opened_from_the_layers_menu_before_a_sample(make_napari_viewer, synthetic_sample, qtbot):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    assert "napari-morphomol.registration_widget" in [
        item.command.id for item in get_app_model().menus.get_menu("napari/layers/register") if hasattr(item, "command")
    ]
    _, widget = viewer.window.add_plugin_dock_widget("napari-morphomol", "Register H&E to Xenium")
    assert isinstance(widget, RegistrationWidget) and "load a sample" in widget.status.value
    sdata = load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path, synthetic_sample.alignment_csv)
    for data, kwargs, kind in sample_layers(sdata, with_density=False):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    qtbot.waitUntil(lambda: widget.he_points is not None, timeout=2000)
    assert [layer.name for layer in viewer.layers] == [HE_LAYER, DAPI_LAYER, HE_POINTS_LAYER, XENIUM_POINTS_LAYER]
    assert widget.he_points.unique_id == viewer.layers[HE_POINTS_LAYER].unique_id  # (a proxy for plugins)
    assert widget.view.value == OVERLAY  # the sample came aligned
    np.testing.assert_allclose(widget.he_points.affine.affine_matrix, viewer.layers[HE_LAYER].affine.affine_matrix)
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)  # through napari's proxy, Apply still moves the H&E
    widget.set_pairs(pairs)
    widget.model.value = "translation"
    widget.fit()
    widget.apply()
    expected = layer_affine_um(widget.fitted.best_affine, PIXEL_UM)
    np.testing.assert_allclose(viewer.layers[HE_LAYER].affine.affine_matrix, expected, atol=1e-9)
    np.testing.assert_allclose(viewer.layers[HE_POINTS_LAYER].affine.affine_matrix, expected, atol=1e-9)
    viewer.layers.remove(HE_POINTS_LAYER)
    assert widget.he_points is None and "deleted" in widget.status.value
    assert XENIUM_POINTS_LAYER not in viewer.layers


def test_without_a_sample_every_button_answers_with_a_message(make_napari_viewer):
    widget = RegistrationWidget(make_napari_viewer())
    assert "load a sample" in widget.status.value
    for button, expected in (
        (widget.fit_button, "no landmark layers"),
        (widget.auto_button, "no landmark layers"),
        (widget.import_button, "no landmark layers"),
        (widget.export_button, "no landmark layers"),
        (widget.apply_button, "nothing to apply"),
        (widget.undo_button, "nothing to undo"),
        (widget.redo_button, "nothing to redo"),
    ):
        button.clicked.emit()
        assert expected in widget.status.value, (button.text, widget.status.value)


def test_points_stay_editable_after_the_dock_is_closed(opened, qtbot):
    viewer, widget, _ = opened
    he_points = widget.he_points
    destroyed = []
    widget.native.destroyed.connect(lambda: destroyed.append(True))
    viewer.window.remove_dock_widget(widget.native)
    widget.native.deleteLater()
    qtbot.waitUntil(lambda: bool(destroyed), timeout=2000)
    he_points.add([100.0, 100.0])  # no callback into the deleted widget: it would name the point
    assert len(he_points.data) == 1 and list(he_points.features["name"]) == [""]


def test_the_applied_per_region_fit_is_what_predict_records_and_export_writes(opened, synthetic_sample, qtbot,
                                                                               tmp_path):
    """Issue 18, finding 2: after a per-region fit applied in this dock, the Predict dock's run
    records that registration (it recorded the alignment CSV's affine) and its landmarks export."""
    from napari_morphomol.export import write_landmarks_csv
    from napari_morphomol.inference import open_results
    from napari_morphomol.widgets.predict import WHOLE_SLIDE, PredictWidget

    viewer, widget, sdata = opened
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    click_pairs(viewer, widget, pairs.he_px, pairs.global_px)
    widget.model.value = "per-region"
    qtbot.waitUntil(lambda: widget.fitted is not None and widget.fitted.model == "per-region", timeout=10_000)
    widget.apply_button.clicked.emit()
    assert "overlay shows its best single affine" in widget.status.value  # finding 3: it says so
    assert "full per-region model" in widget.status.value
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict")
    predict.region.value = WHOLE_SLIDE
    predict.device.value = "cpu"
    predict.store.value = tmp_path / "RESULTS.zarr"
    predict.run_button.clicked.emit()
    qtbot.waitUntil(lambda: predict.run_button.enabled and (tmp_path / "RESULTS.zarr").exists(), timeout=300_000)
    results = open_results(tmp_path / "RESULTS.zarr")
    assert results.metadata["registration"]["model"] == "per-region"
    back = read_keypoints_csv(write_landmarks_csv(results, tmp_path / "landmarks.csv"))
    np.testing.assert_allclose(back.he_px, pairs.he_px, atol=1e-6)


def test_a_residual_row_zooms_to_its_pair_and_markers_stay_readable(opened, synthetic_sample, qtbot):
    """Issue 18, finding 8: a row click centres and zooms to the pair (it only centred); markers
    keep a readable size on screen at any zoom; a pair's two names do not print over each other."""
    from napari_morphomol.widgets.registration import MARKER_SCREEN_PX, PAIR_VIEW_UM

    viewer, widget, _ = opened
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    click_pairs(viewer, widget, pairs.he_px[:4], pairs.global_px[:4])
    qtbot.waitUntil(lambda: len(widget.table.value["index"]) == 4, timeout=5000)
    viewer.reset_view()  # slide zoom
    widget.table.native.selectRow(1)
    name = widget.table.value["index"][1]
    i = list(widget.xenium_points.features["name"]).index(name)
    he_world = np.asarray(widget.he_points.data_to_world(widget.he_points.data[i]))
    xenium_world = np.asarray(widget.xenium_points.data_to_world(widget.xenium_points.data[i]))
    across = PAIR_VIEW_UM + np.abs(he_world - xenium_world).max()  # side by side: both points in view
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], (he_world + xenium_world) / 2, atol=1e-6)
    assert viewer.scene.camera.zoom == pytest.approx(min(viewer.canvas.size) / across)
    for layer in (widget.he_points, widget.xenium_points):
        assert tuple(layer.canvas_size_limits) == MARKER_SCREEN_PX
    assert widget.he_points.text.anchor != widget.xenium_points.text.anchor


def test_the_flick_button_reads_h_and_e(opened):
    """Issue 18, finding 4: Qt takes a single & for a shortcut key and drew "Flick HE / DAPI"."""
    from qtpy.QtWidgets import QPushButton

    _, widget, _ = opened
    button = widget.flick_button.native
    button = button if isinstance(button, QPushButton) else button.findChild(QPushButton)
    assert button.text().replace("&&", "\0").count("&") == 0 and button.text().replace("&&", "&") == "Flick H&E / DAPI"
