"""Dock layout: a long message wraps in its dock instead of widening the window (issue 18, finding 1)."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QApplication

from napari_morphomol.widgets.export import ExportWidget
from napari_morphomol.widgets.load_sample import LoadSampleWidget
from napari_morphomol.widgets.predict import PredictWidget
from napari_morphomol.widgets.registration import RegistrationWidget

LONG_MESSAGE = ("error: the H&E image is not registered to the Xenium run: give an alignment CSV (Xenium's "
                "he_imagealignment.csv or one exported by the registration widget) " * 4)


@pytest.mark.parametrize("dock", [LoadSampleWidget, PredictWidget, ExportWidget, RegistrationWidget])
def test_a_long_status_message_wraps_and_leaves_the_canvas_its_width(make_napari_viewer, dock, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    widget = dock(viewer)
    viewer.window.add_dock_widget(widget, name=dock.__name__)
    qtbot.wait(200)
    before = viewer.window._qt_window.width(), viewer.canvas.size[1]
    widget.status.value = LONG_MESSAGE
    QApplication.processEvents()
    qtbot.wait(200)
    assert widget.status.native.wordWrap()
    assert viewer.window._qt_window.width() <= before[0]
    assert viewer.canvas.size[1] >= 0.95 * before[1]


def test_the_explore_dock_scrolls_instead_of_growing_the_window(make_napari_viewer, qtbot, results_store):
    """Issue 18, finding 1: stacked under another dock, the Explore dock (the tallest) scrolled
    nothing and grew the window by 800 px past a 1,000 px screen, squeezing its metrics table to
    one row; now its content scrolls and the tables keep about five rows."""
    from qtpy.QtWidgets import QScrollArea

    from napari_morphomol.analysis import explore_run
    from napari_morphomol.widgets.explore import TABLE_MIN_HEIGHT_PX, ExploreWidget

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1400, 900)
    viewer.window.add_dock_widget(PredictWidget(viewer), name="Predict")
    qtbot.wait(200)
    before = window.height()
    explore = ExploreWidget(viewer)
    viewer.window.add_dock_widget(explore, name="Explore predictions")
    explore.set_explorer(explore_run(results_store))
    QApplication.processEvents()
    qtbot.wait(300)
    assert window.height() - before < 200
    assert explore.findChild(QScrollArea) is not None
    assert explore.metrics_table.height() >= TABLE_MIN_HEIGHT_PX
