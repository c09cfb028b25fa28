"""The Load sample dock widget, driven as a user would, under Xvfb."""

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hed

from napari_morphomol.coords import xy_to_napari
from napari_morphomol.layers.sample import DAPI_LAYER, DENSITY_LAYER, HE_LAYER
from napari_morphomol.widgets.load_sample import LoadSampleWidget


@pytest.fixture
def loaded(make_napari_viewer, qtbot, synthetic_sample):
    viewer = make_napari_viewer()
    widget = LoadSampleWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Load sample")
    widget.xenium_dir.value = synthetic_sample.xenium_dir
    widget.he_path.value = synthetic_sample.he_path
    widget.alignment_csv.value = synthetic_sample.alignment_csv
    widget.load_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.density is not None, timeout=60_000)
    return viewer, widget


def he_darkness_at_um(viewer, points_xy_um):
    """Hematoxylin optical density of the H&E pixels under (x, y) um positions, via the layer."""
    layer = viewer.layers[HE_LAYER]
    world = xy_to_napari(points_xy_um)
    data_rc = np.array([layer.world_to_data(p) for p in world])
    full_res = np.asarray(layer.data[0])
    rows = np.clip(np.round(data_rc[:, 0]).astype(int), 0, full_res.shape[0] - 1)
    cols = np.clip(np.round(data_rc[:, 1]).astype(int), 0, full_res.shape[1] - 1)
    return rgb2hed(full_res[rows, cols][None])[0, :, 0]


def test_load_shows_layers_in_um(loaded, synthetic_sample):
    viewer, widget = loaded
    names = [layer.name for layer in viewer.layers]
    assert names[:3] == [HE_LAYER, DAPI_LAYER, DENSITY_LAYER]
    assert viewer.layers[HE_LAYER].multiscale and viewer.layers[HE_LAYER].rgb
    assert viewer.canvas.overlays.scale_bar.visible
    assert all(str(u) == "micrometer" for layer in viewer.layers for u in layer.units)
    # DAPI pixel (0, 0) -> 0 um; the last pixel sits at its size x pixel size
    dapi = viewer.layers[DAPI_LAYER]
    h, w = dapi.data[0].shape
    np.testing.assert_allclose(dapi.data_to_world((h, w)), (h * 0.2125, w * 0.2125))
    assert "transcripts" in widget.status.value and widget.gene_list.choices


def test_nucleus_transcripts_land_on_hematoxylin(loaded, synthetic_sample):
    """Through the alignment, transcripts inside nuclei sit on dark purple H&E, others do not."""
    viewer, _ = loaded
    tx = pd.read_parquet(
        synthetic_sample.xenium_dir / "transcripts.parquet",
        columns=["x_location", "y_location", "overlaps_nucleus", "qv", "cell_id"],
    )
    tx = tx[tx.qv >= 20]
    inside = tx[tx.overlaps_nucleus == 1].sample(300, random_state=1)
    outside = tx[(tx.overlaps_nucleus == 0)].sample(300, random_state=1)
    h_inside = he_darkness_at_um(viewer, inside[["x_location", "y_location"]].to_numpy())
    h_outside = he_darkness_at_um(viewer, outside[["x_location", "y_location"]].to_numpy())
    assert np.median(h_inside) > np.median(h_outside) + 0.02, (np.median(h_inside), np.median(h_outside))
    # a transcript known to sit on a nucleus: the one nearest a large nucleus's centre
    cells = pd.read_parquet(synthetic_sample.root / "ground_truth_cells.parquet")
    big = cells.sort_values("nucleus_radius_um").iloc[-1]
    nearest = tx.loc[((tx.x_location - big.x_um) ** 2 + (tx.y_location - big.y_um) ** 2).idxmin()]
    assert nearest.overlaps_nucleus == 1
    assert (
        he_darkness_at_um(viewer, nearest[["x_location", "y_location"]].to_numpy(float)[None])[0]
        > np.median(h_outside)
    )


def test_gene_search_density_and_points(loaded, qtbot):
    viewer, widget = loaded
    gene = widget.gene_list.choices[0]
    widget.gene_search.value = gene
    assert gene in widget.gene_list.choices
    widget.gene_list.value = [gene]
    layer = widget.add_density_of_selection()
    assert layer.name == f"density: {gene}" and np.asarray(layer.data).sum() > 0
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 8
    worker = widget.refresh_points_in_view()
    qtbot.waitUntil(lambda: "transcripts in view" in viewer.layers or "error" in widget.status.value, timeout=30_000)
    assert "error" not in widget.status.value, widget.status.value
    points = viewer.layers["transcripts in view"]
    assert len(points.data) > 0 and set(points.features["gene"]) == {gene}
    (x0, x1), (y0, y1) = widget._view_box_um()
    assert (points.data[:, 1] >= x0).all() and (points.data[:, 1] < x1).all()
    assert worker is not None
    viewer.camera.center = (0, -5000.0, -5000.0)  # far off the section: no transcript in view
    widget.refresh_points_in_view()
    qtbot.waitUntil(lambda: widget.status.value.startswith("0 transcripts"), timeout=30_000)
    assert len(viewer.layers["transcripts in view"].data) == 0


def test_bad_input_is_a_message_not_a_traceback(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = LoadSampleWidget(viewer)
    widget.xenium_dir.value = tmp_path
    worker = widget.load()
    qtbot.waitUntil(lambda: widget.status.value.startswith("error"), timeout=20_000)
    assert "no experiment.xenium" in widget.status.value
    assert worker is not None and len(viewer.layers) == 0


@pytest.mark.parametrize("dock_first", [False, True])
def test_a_sample_opened_from_the_file_menu_is_the_docks_too(make_napari_viewer, qtbot, synthetic_sample, dock_first):
    """Issue 18, finding 6: after File > Open (or Open Sample) the Load sample dock picks the sample
    up, whether it was open before or not: its files fill the fields, the scale bar shows and the
    gene list fills, so gene search and density work without loading it again."""
    viewer = make_napari_viewer()
    if dock_first:
        widget = LoadSampleWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Load sample")
    viewer.open(str(synthetic_sample.root), plugin="napari-morphomol")
    if not dock_first:
        widget = LoadSampleWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Load sample")
    qtbot.waitUntil(lambda: widget.density is not None, timeout=60_000)
    assert widget.xenium_dir.value == synthetic_sample.xenium_dir and widget.he_path.value == synthetic_sample.he_path
    assert viewer.canvas.overlays.scale_bar.visible
    widget.gene_search.value = "MUC"
    assert widget.gene_list.choices and all("MUC" in gene for gene in widget.gene_list.choices)
    widget.gene_list.value = [widget.gene_list.choices[0]]
    assert widget.add_density_of_selection() is not None
