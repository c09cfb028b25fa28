"""The Explore predictions dock, driven as a user would, under Xvfb."""

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent
from qtpy.QtCore import Qt
from vispy.app.canvas import MouseEvent as VispyMouseEvent

from napari_morphomol.layers.run import CLUSTERS_LAYER, MEASURED_LAYER, PREDICTED_LAYER, SELECTION_LAYER, map_affine_um
from napari_morphomol.widgets.explore import SELECT_SHAPES_LAYER, ExploreWidget


def open_run(viewer, qtbot, store):
    """The Explore dock in ``viewer``, with ``store`` chosen and opened as a user would."""
    widget = ExploreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explore predictions")
    widget.results_path.value = store
    qtbot.mouseClick(widget.open_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.explorer is not None, timeout=60_000)
    return widget


@pytest.fixture
def opened(make_napari_viewer, qtbot, results_store):
    viewer = make_napari_viewer()
    return viewer, open_run(viewer, qtbot, results_store)


def test_gene_search_switches_the_one_map_layer(opened, qtbot):
    viewer, widget = opened
    explorer = widget.explorer
    layers_before = list(viewer.layers)
    predicted = viewer.layers[PREDICTED_LAYER]
    assert predicted.colorbar.visible
    gene = explorer.genes[7]
    qtbot.keyClicks(widget.gene_search, gene)
    assert widget.gene_list.count() >= 1
    item = widget.gene_list.findItems(gene, Qt.MatchExactly)[0]
    widget.gene_list.setCurrentItem(item)
    assert list(viewer.layers) == layers_before and viewer.layers[PREDICTED_LAYER] is predicted
    np.testing.assert_array_equal(predicted.data, explorer.gene_map(gene, "predicted"))
    assert predicted.metadata["gene"] == gene
    low, high = predicted.contrast_limits
    finite = predicted.data[np.isfinite(predicted.data)]
    assert finite.min() <= high and low <= finite.max()
    measured = viewer.layers[MEASURED_LAYER]
    assert not measured.visible, "hidden maps wait until shown"
    measured.visible = True
    assert measured.metadata["gene"] == gene
    if explorer.is_measured(gene):
        np.testing.assert_array_equal(measured.data, explorer.gene_map(gene, "measured"))
    else:
        assert np.isnan(measured.data).all()
    assert gene in viewer.canvas.overlays.text.text and "log1p" in viewer.canvas.overlays.text.text
    measured.visible = False  # the caption names the maps shown, not "(measured)" over a prediction (issue 18, 4)
    caption = viewer.canvas.overlays.text.text
    assert caption.startswith(f"{gene}: {PREDICTED_LAYER} (") and "(measured)" not in caption
    measured.visible = True
    assert viewer.canvas.overlays.text.text.startswith(f"{gene}: {PREDICTED_LAYER}, {MEASURED_LAYER} (")


def test_predicted_and_measured_maps_of_a_gene_share_one_contrast(opened):
    """Issue 18, finding 4: side by side, equal colours are equal values."""
    viewer, widget = opened
    gene = next(g for g in widget.explorer.genes if widget.explorer.is_measured(g))
    widget.show_gene(gene)
    measured = viewer.layers[MEASURED_LAYER]
    measured.visible = True
    predicted = viewer.layers[PREDICTED_LAYER]
    np.testing.assert_allclose(predicted.contrast_limits, measured.contrast_limits)
    both = np.concatenate([predicted.data.ravel(), measured.data.ravel()])
    assert predicted.contrast_limits[1] <= np.nanmax(both) and predicted.contrast_limits[0] >= np.nanmin(both)


def test_the_cluster_view_hides_the_gene_maps_and_a_gene_brings_them_back(opened, qtbot):
    """Issue 18, finding 4: Leiden colours are not drawn over a gene map, and the caption says what is shown."""
    viewer, widget = opened
    qtbot.mouseClick(widget.cluster_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: CLUSTERS_LAYER in viewer.layers, timeout=120_000)
    assert viewer.layers[CLUSTERS_LAYER].visible
    assert not any(layer.visible for layer in widget.map_layers.values())
    assert viewer.canvas.overlays.text.text.startswith(f"{CLUSTERS_LAYER} (leiden_0.5): ")
    assert viewer.canvas.overlays.text.text.endswith(" clusters")
    gene = widget.explorer.genes[3]
    widget.gene_list.setCurrentItem(widget.gene_list.findItems(gene, Qt.MatchExactly)[0])
    assert not viewer.layers[CLUSTERS_LAYER].visible and viewer.layers[PREDICTED_LAYER].visible
    assert viewer.canvas.overlays.text.text.startswith(f"{gene}: {PREDICTED_LAYER}")


def test_metrics_table_sorts_and_click_shows_gene(opened, qtbot):
    viewer, widget = opened
    table = widget.metrics_table
    assert table.rowCount() == len(widget.explorer.metrics) > 0
    table.horizontalHeader().sectionClicked.emit(1)  # what a click on the "spearman" header does
    table.sortByColumn(1, Qt.DescendingOrder)
    values = [float(table.item(i, 1).text()) for i in range(table.rowCount())]
    assert values == sorted(values, reverse=True)
    best = widget.metrics_genes_in_order()[0]
    assert widget.explorer.metrics["spearman"].idxmax() == best
    rect = table.visualItemRect(table.item(2, 0))
    qtbot.mouseClick(table.viewport(), Qt.LeftButton, pos=rect.center())
    assert widget.gene == table.item(2, 0).text()
    assert viewer.layers[PREDICTED_LAYER].metadata["gene"] == widget.gene


def test_tile_inspector_shows_top_genes_and_transcripts(opened):
    _, widget = opened
    tiles = widget.explorer.results.tiles
    x, y = tiles[["um_x", "um_y"]].to_numpy()[1]
    assert widget.inspect_at_um(x, y) == 1
    assert f"{int(tiles['n_transcripts'].iloc[1]):,} transcripts" in widget.inspector_label.text()
    top = widget.explorer.results.predictions[1]
    assert widget.inspector_table.item(0, 0).text() == widget.explorer.genes[int(np.argmax(top))]
    assert widget.inspect_at_um(-1e5, -1e5) == -1


def click_canvas(viewer, qtbot, pos, drag_to=None):
    """Press and release the left button on the napari canvas (canvas pixels), maybe dragging."""
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.events.mouse_press(pos=pos, modifiers=(), button=1)
    qtbot.wait(10)
    if drag_to is not None:
        canvas.events.mouse_move(pos=drag_to, modifiers=(), button=1,
                                 press_event=VispyMouseEvent(pos=pos, type="mouse_press", button=1))
        qtbot.wait(10)
    canvas.events.mouse_release(pos=drag_to or pos, modifiers=(), button=1)
    qtbot.wait(10)


def test_clicking_a_tile_on_the_map_inspects_it_and_panning_does_not(opened, qtbot, monkeypatch):
    viewer, widget = opened
    viewer.window.show()  # canvas pixels map to the view only once the canvas is laid out
    qtbot.wait(100)
    tiles = widget.explorer.results.tiles
    x, y = tiles[["um_x", "um_y"]].to_numpy()[2]
    viewer.scene.camera.center = (y, x)  # napari's (row, column) order: the tile's centre mid-canvas
    qtbot.wait(50)
    width, height = viewer.window._qt_viewer.canvas._scene_canvas.size
    centre = (width / 2, height / 2)
    click_canvas(viewer, qtbot, centre)
    assert widget.inspector_label.text().startswith(f"tile {int(tiles['tile_id'].iloc[2])} ")
    assert widget.inspector_table.rowCount() > 0
    # a drag pans the view and inspects nothing
    inspected = []
    inspect = widget.inspect_at_um
    monkeypatch.setattr(widget, "inspect_at_um",
                        lambda x_um, y_um: inspected.append((x_um, y_um)) or inspect(x_um, y_um))
    click_canvas(viewer, qtbot, centre, drag_to=(centre[0] + 60, centre[1] + 40))
    assert inspected == []
    click_canvas(viewer, qtbot, centre)
    assert len(inspected) == 1


def lasso(canvas, axes, polygon_data):
    """Drag the mouse along a polygon (data coordinates) on a matplotlib canvas, as a user would."""
    points = axes.transData.transform(np.vstack([polygon_data, polygon_data[:1]]))
    MouseEvent("button_press_event", canvas, *points[0], button=1)._process()
    for x, y in points[1:]:
        MouseEvent("motion_notify_event", canvas, x, y, button=1)._process()
    MouseEvent("button_release_event", canvas, *points[-1], button=1)._process()


def cut_between(values):
    """A threshold in the widest gap between the middle values, so no point sits on it."""
    ordered = np.sort(values)
    k = 2 + int(np.argmax(np.diff(ordered[2:-2])))
    return float(ordered[k] + ordered[k + 1]) / 2


def test_clusters_legend_and_lasso_selection(opened, qtbot):
    viewer, widget = opened
    widget.resolutions.setText("0.5, 1.5")
    qtbot.mouseClick(widget.cluster_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: CLUSTERS_LAYER in viewer.layers, timeout=120_000)
    adata = widget.explorer.adata
    assert "leiden_1.5" in adata.obs and adata.obsm["X_pca"].shape[0] == adata.n_obs
    assert [widget.clustering_choice.itemText(i) for i in range(widget.clustering_choice.count())] == \
        ["leiden_0.5", "leiden_1.5"]
    legend = widget.legend_entries()
    assert sum(count for _, _, count in legend) == adata.n_obs
    labels = viewer.layers[CLUSTERS_LAYER]
    assert labels.data.max() == len(legend)
    widget.clustering_choice.setCurrentText("leiden_1.5")
    assert labels.metadata["clustering"] == "leiden_1.5"
    # lasso around the left half of the UMAP
    umap = adata.obsm["X_umap"]
    x_mid = cut_between(umap[:, 0])
    dock = widget.umap_dock
    (x0, x1), (y0, y1) = dock.axes.get_xlim(), dock.axes.get_ylim()
    x0, y0, y1 = x0 + 0.02 * (x1 - x0), y0 + 0.02 * (y1 - y0), y1 - 0.02 * (y1 - y0)
    dock.canvas.draw()
    lasso(dock.canvas, dock.axes, np.array([[x0, y0], [x_mid, y0], [x_mid, y1], [x0, y1]]))
    expected = np.flatnonzero(umap[:, 0] < x_mid)
    np.testing.assert_array_equal(np.sort(widget.selected_tiles), expected)
    selection = viewer.layers[SELECTION_LAYER].data
    grid = widget.explorer.grid
    assert selection.sum() == len(expected)
    assert (selection[grid.rows[expected], grid.cols[expected]] == 1).all()
    # a rectangle drawn on the map selects the tiles under it and highlights them in the UMAP
    tiles = widget.explorer.results.tiles
    x_um, y_um = tiles["um_x"].to_numpy(), tiles["um_y"].to_numpy()
    cut = cut_between(y_um)
    rectangle_rc = np.array([[y_um.min() - 1, x_um.min() - 1], [y_um.min() - 1, x_um.max() + 1],
                             [cut, x_um.max() + 1], [cut, x_um.min() - 1]])
    viewer.layers[SELECT_SHAPES_LAYER].add_rectangles(rectangle_rc)
    expected = np.flatnonzero(y_um < cut)
    np.testing.assert_array_equal(np.sort(widget.selected_tiles), expected)
    np.testing.assert_array_equal(np.flatnonzero(dock.selected), expected)
    widget.umap_colour.setCurrentText("selected gene")
    assert dock.colorbar is not None


def test_bad_resolutions_are_a_notification(opened, qtbot):
    _, widget = opened
    widget.resolutions.setText("half, one")
    assert widget.compute_clusters() is None
    assert "resolutions" in widget.status.text()


def test_the_status_line_follows_the_run_shown(make_napari_viewer, qtbot, results_store, token_results_store):
    """Issue 18, finding 7: a run shown in place of another (as the Predict dock hands over a new
    run) names its own store, not the one shown before."""
    from napari_morphomol.analysis import explore_run

    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, results_store)
    assert results_store.name in widget.status.text()
    predicted = viewer.layers[PREDICTED_LAYER]
    widget.update_explorer(explore_run(token_results_store))
    assert viewer.layers[PREDICTED_LAYER] is predicted  # refreshed in place
    assert token_results_store.name in widget.status.text() and results_store.name not in widget.status.text()


def test_map_layers_name_their_results_store_for_export(opened, results_store):
    """The Export widget and the npe2 writers find the run from any Explore layer."""
    from napari_morphomol.export import RESULTS_LAYER_KEY

    viewer, _ = opened
    assert viewer.layers[PREDICTED_LAYER].metadata[RESULTS_LAYER_KEY] == str(results_store)


def test_a_folder_that_is_no_results_store_is_a_message_not_a_traceback(make_napari_viewer, qtbot, tmp_path):
    """The store is read in a worker: its InputError must reach the dock as a message, not be
    re-raised in the Qt event loop (pytest-qt fails the test on any exception there)."""
    viewer = make_napari_viewer()
    widget = ExploreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explore predictions")
    folder = tmp_path / "not_results.zarr"
    folder.mkdir()
    widget.results_path.value = folder
    qtbot.mouseClick(widget.open_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status.text().startswith("error:"), timeout=60_000)
    assert "run `morphomol predict` again" in widget.status.text() and widget.explorer is None


def test_token_resolution_re_places_the_same_map_layers(make_napari_viewer, qtbot, token_results_store):
    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, token_results_store)
    explorer, predicted = widget.explorer, viewer.layers[PREDICTED_LAYER]
    gene = explorer.results.measured_genes[0]
    widget.show_gene(gene)
    tile_shape = predicted.data.shape
    widget.resolution.setCurrentIndex(widget.resolution.findData("token"))  # what choosing it in the box does
    assert widget.shown_resolution == "token" and viewer.layers[PREDICTED_LAYER] is predicted
    np.testing.assert_array_equal(predicted.data, explorer.token_map(gene, "predicted"))
    assert predicted.data.shape != tile_shape and predicted.data.shape == explorer.token_grid.shape
    np.testing.assert_allclose(predicted.affine.affine_matrix, map_affine_um(explorer, "token"))
    assert "per token" in viewer.canvas.overlays.text.text and "per token" in widget.colour_note.text()
    measured = viewer.layers[MEASURED_LAYER]
    measured.visible = True
    np.testing.assert_array_equal(measured.data, explorer.token_map(gene, "measured"))
    other = explorer.genes[5]
    widget.show_gene(other)
    np.testing.assert_array_equal(predicted.data, explorer.token_map(other, "predicted"))
    widget.resolution.setCurrentIndex(widget.resolution.findData("tile"))
    np.testing.assert_array_equal(predicted.data, explorer.gene_map(other, "predicted"))
    np.testing.assert_allclose(predicted.affine.affine_matrix, map_affine_um(explorer, "tile"))


def test_the_tile_inspector_shows_the_tiles_token_map_of_the_shown_gene(make_napari_viewer, qtbot,
                                                                        token_results_store):
    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, token_results_store)
    explorer = widget.explorer
    gene = explorer.genes[3]
    widget.show_gene(gene)
    centre = explorer.results.tiles[["um_x", "um_y"]].to_numpy()[2]
    tile = widget.inspect_at_um(*centre)
    assert tile == 2 and not widget.inspector_tokens.pixmap().isNull()
    assert widget.inspector_tokens.pixmap().width() == 168 and gene in widget.inspector_tokens.toolTip()
    from napari_morphomol.models import ADDON_TOKEN_HEAD

    column = explorer.genes.index(gene)
    np.testing.assert_allclose(explorer.tile_token_map(tile, gene).ravel(),
                               np.log1p(np.exp(explorer.results.output(ADDON_TOKEN_HEAD)[tile, :, column])), rtol=1e-5)
    widget.show_gene(explorer.genes[4])  # the inspected tile follows the gene
    assert explorer.genes[4] in widget.inspector_tokens.toolTip()


def assert_refused(widget, monkeypatch, resolution: str, tooltip: str, message: str):
    """The resolution entry is disabled with ``tooltip`` saying why; choosing it anyway shows
    ``message`` and the maps stay at tile resolution."""
    item = widget.resolution.model().item(widget.resolution.findData(resolution))
    assert not item.isEnabled() and tooltip in item.toolTip()
    shown = []
    monkeypatch.setattr("napari_morphomol.widgets.explore.show_info", shown.append)
    widget.set_resolution(resolution)
    assert widget.shown_resolution == "tile" and shown and message in shown[0]


def test_a_tile_only_run_offers_no_token_maps_and_says_why(opened, monkeypatch):
    viewer, widget = opened
    assert_refused(widget, monkeypatch, "token", "--token-head", "--token-head")
    centre = widget.explorer.results.tiles[["um_x", "um_y"]].to_numpy()[0]
    assert widget.inspect_at_um(*centre) == 0 and widget.inspector_tokens.pixmap().isNull()


def test_cell_resolution_colours_every_cell_by_the_gene(make_napari_viewer, qtbot, token_results_store):
    """Choosing "cell" in the box makes the map layers multiscale images of the Xenium cell label
    mask, each cell coloured by its predicted (or measured) value; a gene switch recolours them."""
    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, token_results_store)
    explorer = widget.explorer
    cell_item = widget.resolution.model().item(widget.resolution.findData("cell"))
    assert cell_item.isEnabled() and cell_item.toolTip() == ""
    gene = explorer.results.measured_genes[0]
    widget.show_gene(gene)
    widget.resolution.setCurrentIndex(widget.resolution.findData("cell"))
    predicted = viewer.layers[PREDICTED_LAYER]
    assert widget.shown_resolution == "cell" and predicted.multiscale and predicted.metadata["resolution"] == "cell"
    assert "per cell" in viewer.canvas.overlays.text.text
    np.testing.assert_allclose(predicted.affine.affine_matrix, map_affine_um(explorer, "cell"))
    cells = explorer.cells
    labels = np.asarray(explorer.cell_labels[0][:400, :400])
    shown = np.asarray(predicted.data[0][:400, :400])
    value_of = dict(zip(cells.obs["label_id"], cells[:, gene].X.ravel(), strict=True))
    some = [label for label in np.unique(labels) if label in value_of][:20]
    assert some, "the corner holds cells of the run"
    for label in some:
        np.testing.assert_allclose(shown[labels == label], value_of[label], rtol=1e-6)
    assert np.isnan(shown[labels == 0]).all()
    low, high = predicted.contrast_limits
    assert low < high
    other = explorer.genes[5]
    widget.show_gene(other)
    assert viewer.layers[PREDICTED_LAYER] is predicted
    value_of = dict(zip(cells.obs["label_id"], cells[:, other].X.ravel(), strict=True))
    np.testing.assert_allclose(np.asarray(predicted.data[0][:400, :400])[labels == some[0]], value_of[some[0]],
                               rtol=1e-6)
    viewer.layers[MEASURED_LAYER].visible = True
    measured = np.asarray(viewer.layers[MEASURED_LAYER].data[-1])
    assert viewer.layers[MEASURED_LAYER].multiscale and measured.dtype == np.float32
    widget.resolution.setCurrentIndex(widget.resolution.findData("tile"))
    predicted = viewer.layers[PREDICTED_LAYER]
    assert not predicted.multiscale
    np.testing.assert_array_equal(predicted.data, explorer.gene_map(other, "predicted"))


def test_a_run_without_cell_segmentation_says_so_and_keeps_the_other_maps(make_napari_viewer, qtbot, monkeypatch,
                                                                          token_results_store, tmp_path):
    import shutil

    import zarr

    from napari_morphomol.inference.store import ATTRS_KEY

    sample = zarr.open_group(token_results_store, mode="r").attrs[ATTRS_KEY]["sample"]
    bundle = tmp_path / "xenium"
    shutil.copytree(sample["xenium_dir"], bundle)
    (bundle / "cells.zarr.zip").unlink()  # segmented cells, but no label mask
    store = tmp_path / "run.zarr"
    shutil.copytree(token_results_store, store)
    root = zarr.open_group(store, mode="r+")
    root.attrs[ATTRS_KEY] = {**dict(root.attrs[ATTRS_KEY]), "sample": {**sample, "xenium_dir": str(bundle)}}
    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, store)
    assert_refused(widget, monkeypatch, "cell", "no cells.zarr.zip", "no cell view")
    widget.set_resolution("token")
    assert widget.shown_resolution == "token"
    assert np.isfinite(viewer.layers[PREDICTED_LAYER].data).any()
