"""The Export dock widget and the npe2 writers, driven as a user would, under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

from napari_morphomol.export import RESULTS_LAYER_KEY
from napari_morphomol.widgets.export import ExportWidget


@pytest.fixture
def widget(make_napari_viewer, results_store):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 4), np.float32), name="KRT17 predicted",
                     metadata={RESULTS_LAYER_KEY: str(results_store)})
    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Export")
    return widget


def test_widget_takes_the_run_from_the_layers_and_writes_beside_it(widget, results_store, tmp_path, qtbot):
    assert widget.results_path.value == results_store
    assert widget.h5ad_path.value == results_store.with_name("results.h5ad")
    widget.h5ad_path.value = tmp_path / "run.h5ad"
    widget.write_spatialdata.value = False
    widget.clusters.value = False
    widget.export_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.status.value.startswith(("written", "error")), timeout=300_000)
    assert widget.status.value == f"written\nh5ad: {tmp_path / 'run.h5ad'}"
    assert (tmp_path / "run.h5ad").stat().st_size > 0

    before = (tmp_path / "run.h5ad").read_bytes()
    widget.export_button.clicked.emit()  # again, without "replace existing files"
    qtbot.waitUntil(lambda: "already exists" in widget.status.value, timeout=300_000)
    assert (tmp_path / "run.h5ad").read_bytes() == before
    assert widget.export_button.enabled


def export_only(widget, qtbot, kind: str, box, path_edit, target) -> None:
    """Untick the default outputs, tick ``box``, name ``target``, press Export and wait until it is written."""
    path_edit.value = target
    widget.write_h5ad.value = widget.write_spatialdata.value = False
    box.value = True
    widget.export_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.status.value.startswith(("written", "error")), timeout=300_000)
    assert widget.status.value == f"written\n{kind}: {target}"
    qtbot.waitUntil(lambda: widget.export_button.enabled, timeout=60_000)  # the worker has finished


def test_widget_writes_the_cells_anndata_of_a_token_head_run(make_napari_viewer, token_results_store, tmp_path,
                                                             qtbot):
    import anndata

    widget = ExportWidget(make_napari_viewer())
    widget.results_path.value = token_results_store
    assert widget.cells_path.value == token_results_store.with_name("tokens.cells.h5ad")
    export_only(widget, qtbot, "cells_h5ad", widget.write_cells, widget.cells_path, tmp_path / "cells.h5ad")
    assert anndata.read_h5ad(tmp_path / "cells.h5ad").obs_names.name == "cell_id"


def test_widget_writes_qupath_geojson_beside_the_run(widget, results_store, tmp_path, qtbot):
    """Tick QuPath GeoJSON: the tiles go out as QuPath tile objects, named after the run by default."""
    import json

    assert widget.qupath_path.value == results_store.with_name("results.qupath.geojson")
    export_only(widget, qtbot, "qupath", widget.write_qupath, widget.qupath_path, tmp_path / "tiles.geojson")
    features = json.loads((tmp_path / "tiles.geojson").read_text())["features"]
    assert features and features[0]["properties"]["objectType"] == "tile"
    assert features[0]["properties"]["classification"]["name"].startswith("Leiden ")


def test_widget_asks_for_what_is_missing(make_napari_viewer, qtbot):
    widget = ExportWidget(make_napari_viewer())
    widget.export_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.status.value.startswith("error"), timeout=60_000)
    assert "choose the results store" in widget.status.value


def test_save_layers_as_h5ad_uses_the_npe2_writer(widget, tmp_path):
    import anndata

    viewer = widget.viewer
    target = tmp_path / "saved.h5ad"
    written = viewer.layers.save(str(target), selected=False, plugin="napari-morphomol")
    assert written == [str(target)]
    adata = anndata.read_h5ad(target)
    assert {"leiden_0.5", "leiden_1.0"} <= set(adata.obs.columns)


def test_writer_refuses_layers_of_no_run(make_napari_viewer, tmp_path):
    from napari_morphomol._writer import write_h5ad
    from napari_morphomol.errors import InputError

    with pytest.raises(InputError, match="none of the selected layers"):
        write_h5ad(str(tmp_path / "x.h5ad"), [(np.zeros((2, 2)), {"metadata": {}}, "image")])


def test_self_contained_box_copies_the_sample_into_the_store(widget, tmp_path, qtbot):
    """By default the store refers to the sample (an H&E overview, no transcripts); ticking
    "copy the whole sample" writes the sample's H&E, DAPI and transcripts into it."""
    import spatialdata as sd

    from napari_morphomol.elements import HE_IMAGE, TRANSCRIPTS
    from napari_morphomol.export import HE_OVERVIEW

    widget.clusters.value = False
    export_only(widget, qtbot, "spatialdata", widget.write_spatialdata, widget.spatialdata_path, tmp_path / "a.zarr")
    assert HE_OVERVIEW in sd.read_zarr(tmp_path / "a.zarr").images
    widget.self_contained.value = True
    export_only(widget, qtbot, "spatialdata", widget.write_spatialdata, widget.spatialdata_path, tmp_path / "b.zarr")
    full = sd.read_zarr(tmp_path / "b.zarr")
    assert HE_IMAGE in full.images and TRANSCRIPTS in full.points


def test_replace_existing_never_replaces_a_folder_that_is_not_an_export(widget, tmp_path, qtbot):
    """With "replace existing files" ticked, a folder of the user's documents at the SpatialData
    path is refused with a message, and every file in it stays."""
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "letter.txt").write_text("dear colleague")
    widget.write_h5ad.value = False
    widget.write_spatialdata.value = True
    widget.spatialdata_path.value = documents
    widget.clusters.value = False
    widget.overwrite.value = True
    widget.export_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.status.value.startswith(("written", "error")), timeout=300_000)
    assert "is not a SpatialData export written by napari-morphomol" in widget.status.value
    qtbot.waitUntil(lambda: widget.export_button.enabled, timeout=60_000)  # the worker has finished
    assert sorted(p.name for p in documents.iterdir()) == ["letter.txt"]
    assert (documents / "letter.txt").read_text() == "dear colleague"


def test_a_moved_sample_is_refused_before_anything_is_written(make_napari_viewer, synthetic_sample, tiny_checkpoint,
                                                              tmp_path, qtbot, monkeypatch):
    """Issue 18, finding 9: a run predicted from relative paths records absolute ones; and when its
    sample has moved, the dock's export refuses before writing the .h5ad (it used to write it and
    then fail), with advice that names no control the dock lacks."""
    import shutil

    from napari_morphomol.cli import main
    from napari_morphomol.inference import open_results

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_sample.root, copy)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "copy/xenium", "--he", "copy/he_image.ome.tif", "--alignment",
                 "copy/he_imagealignment.csv", "--checkpoint", str(tiny_checkpoint), "--out", "run.zarr",
                 "--device", "cpu"]) == 0
    recorded = open_results(tmp_path / "run.zarr").metadata["sample"]
    assert recorded["xenium_dir"] == str(copy / "xenium") and recorded["he_path"] == str(copy / "he_image.ome.tif")
    copy.rename(tmp_path / "moved")
    widget = ExportWidget(make_napari_viewer())
    widget.results_path.value = tmp_path / "run.zarr"
    widget.h5ad_path.value, widget.spatialdata_path.value = tmp_path / "run.h5ad", tmp_path / "run.sdata.zarr"
    widget.clusters.value = False
    widget.export_button.clicked.emit()
    qtbot.waitUntil(lambda: "no longer where the run found it" in widget.status.value, timeout=300_000)
    qtbot.waitUntil(lambda: widget.export_button.enabled, timeout=60_000)  # the worker has finished
    assert not (tmp_path / "run.h5ad").exists() and not (tmp_path / "run.sdata.zarr").exists()
    assert "move it back there and export again" in widget.status.value
