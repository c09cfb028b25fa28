"""The npe2 contributions: manifest, reader, sample data, widget registration."""

import numpy as np
from npe2 import PluginManager

from napari_morphomol import _sample_data
from napari_morphomol._layers import DAPI_LAYER, DENSITY_LAYER, HE_LAYER
from napari_morphomol._reader import get_reader


def test_manifest_is_valid():
    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-morphomol")
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Load sample"}
    assert [s.key for s in manifest.contributions.sample_data] == ["synthetic"]


def test_reader_ignores_what_is_not_a_sample(tmp_path):
    assert get_reader(str(tmp_path)) is None
    (tmp_path / "x.csv").write_text("a,b\n")
    assert get_reader(str(tmp_path / "x.csv")) is None


def test_open_folder_with_the_plugin(make_napari_viewer, synthetic_sample):
    viewer = make_napari_viewer()
    viewer.open(str(synthetic_sample.root), plugin="napari-morphomol")
    assert [layer.name for layer in viewer.layers] == [HE_LAYER, DAPI_LAYER, DENSITY_LAYER]
    density = viewer.layers[DENSITY_LAYER]
    assert np.asarray(density.data).sum() > 0
    # a Xenium folder alone opens without H&E
    viewer.layers.clear()
    viewer.open(str(synthetic_sample.xenium_dir), plugin="napari-morphomol")
    assert HE_LAYER not in viewer.layers and DAPI_LAYER in viewer.layers


def test_sample_data_is_generated_once(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHOMOL_CACHE", str(tmp_path))
    monkeypatch.setattr(_sample_data, "DEMO_SIZE_MM", (0.3, 0.3))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-morphomol", "synthetic")
    assert {HE_LAYER, DAPI_LAYER} <= {layer.name for layer in viewer.layers}
    folder = _sample_data.demo_sample_dir()
    assert folder.is_dir()
    stamp = (folder / "ground_truth.json").stat().st_mtime_ns
    _sample_data.ensure_demo_sample()
    assert (folder / "ground_truth.json").stat().st_mtime_ns == stamp
