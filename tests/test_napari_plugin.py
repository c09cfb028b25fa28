"""The npe2 contributions: manifest, reader, sample data, widget registration."""

import os
import subprocess
import sys

import numpy as np
import pytest
from npe2 import PluginManager

from napari_morphomol import _sample_data
from napari_morphomol._reader import get_reader
from napari_morphomol.layers.sample import DAPI_LAYER, DENSITY_LAYER, HE_LAYER
from napari_morphomol.widgets.load_sample import LoadSampleWidget


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


def test_open_folder_with_the_plugin(make_napari_viewer, qtbot, synthetic_sample):
    viewer = make_napari_viewer()
    viewer.open(str(synthetic_sample.root), plugin="napari-morphomol")
    assert [layer.name for layer in viewer.layers] == [HE_LAYER, DAPI_LAYER]  # no pass over the transcripts here
    widget = LoadSampleWidget(viewer)  # the dock adopts the sample and indexes its transcripts in the background
    qtbot.waitUntil(lambda: widget.density is not None, timeout=60_000)
    assert np.asarray(viewer.layers[DENSITY_LAYER].data).sum() > 0
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


def test_triton_is_kept_out_once_a_system_llvm_is_loaded(tmp_path, monkeypatch):
    from napari_morphomol._native_libraries import keep_triton_out_beside_system_llvm

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    plain = tmp_path / "maps_plain"
    plain.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not keep_triton_out_beside_system_llvm(str(plain)) and "triton" not in sys.modules
    mesa = tmp_path / "maps_mesa"
    mesa.write_text(plain.read_text() + "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert keep_triton_out_beside_system_llvm(str(mesa))
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert not keep_triton_out_beside_system_llvm(str(tmp_path / "no_such_file"))


_MODEL_AFTER_CANVAS = """
import napari, torch
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
QApplication.processEvents()
from napari_morphomol.models import load_checkpoint, shipped_model_path
model, card = load_checkpoint(shipped_model_path())
output = model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), torch.zeros(1, 196, len(card.core_genes)))
print("predicted", tuple(output.predictions.shape))
viewer.close()
"""


def test_a_model_loads_after_the_canvas_opened():
    """In a fresh process, as a user meets it: napari's canvas first (Mesa's llvmpipe here, which
    loads the system libLLVM), then timm and the model. Importing triton then crashed the process."""
    done = subprocess.run([sys.executable, "-c", _MODEL_AFTER_CANVAS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QT_API": "pyqt6"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted (1, 100)" in done.stdout
