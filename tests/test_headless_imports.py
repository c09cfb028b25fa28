"""The science is headless: every module but the docks imports in a fresh interpreter without Qt or napari.

The CLI, the tests and a dask worker use the same core as the docks; a worker on a cluster node
has no display and often no Qt. The layer builders and the napari entry points (``_reader``,
``_writer``, ``_sample_data``) hand plain data to napari, so they are headless too: only
``widgets/`` (the docks) may load Qt or napari.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

GUI_PACKAGE = "napari_morphomol.widgets"
GUI_PREFIXES = ("PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "napari", "vispy", "magicgui", "superqt")

_SCRIPT = """
import importlib, json, pkgutil, sys
gui_package, prefixes = sys.argv[1], tuple(json.loads(sys.argv[2]))

def gui_loaded():
    return {m for m in sys.modules if m.split(".")[0] in prefixes}

package = importlib.import_module("napari_morphomol")
names = [info.name for info in pkgutil.walk_packages(package.__path__, prefix="napari_morphomol.")
         if info.name != gui_package and not info.name.startswith(gui_package + ".")]
imported, blamed = [], {}
for name in names:
    before = gui_loaded()
    importlib.import_module(name)
    imported.append(name)
    new = sorted(gui_loaded() - before)
    if new:
        blamed[name] = new
print(json.dumps({"imported": imported, "blamed": blamed}))
"""


def test_core_imports_without_qt_or_napari():
    done = subprocess.run([sys.executable, "-c", _SCRIPT, GUI_PACKAGE, json.dumps(GUI_PREFIXES)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for core in ("napari_morphomol.io", "napari_morphomol.tiling", "napari_morphomol.models",
                 "napari_morphomol.inference", "napari_morphomol.registration", "napari_morphomol.cli"):
        assert core in report["imported"]
    assert not any(name.startswith(GUI_PACKAGE) for name in report["imported"])
    assert report["blamed"] == {}, f"core modules loaded Qt or napari: {report['blamed']}"


def test_the_predict_dock_imports_without_torch():
    """Issue 18, finding 5: opening the Predict dock froze the window for seconds while torch was
    imported on the event loop; the dock imports the core (torch among it) in a thread instead."""
    script = ("import sys; import napari_morphomol.widgets.predict, napari_morphomol.widgets.load_sample; "
              "print(sorted(m for m in ('torch', 'timm', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QT_API": "pyqt6"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
