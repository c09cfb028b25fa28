"""The science is headless: every core module imports in a fresh interpreter without Qt or napari.

The CLI, the tests and a dask worker use the same core as the docks; a worker on a cluster node
has no display and often no Qt. ``layers/`` builds layer data (arrays, colours, placement) headless
too; only ``widgets/`` (the docks) and the napari entry points (``_reader``, ``_writer``,
``_sample_data``) may load them.
"""

from __future__ import annotations

import json
import subprocess
import sys

CORE_PACKAGES = ("analysis", "commands", "export", "inference", "io", "layers", "models", "registration", "synthetic",
                 "tiling")
CORE_MODULES = ("cli", "coords", "errors", "_atomic")
GUI_PREFIXES = ("PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "napari", "vispy", "magicgui", "superqt")
OWN_PACKAGE = "napari_morphomol"

_SCRIPT = """
import importlib, json, pkgutil, sys
names, prefixes = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))

def gui_loaded():
    return {m for m in sys.modules if m.split(".")[0] in prefixes}

imported, blamed = [], {}
for name in names:
    module = importlib.import_module(name)
    found = [name] + [info.name for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=name + ".")]
    for each in found:
        before = gui_loaded()
        importlib.import_module(each)
        imported.append(each)
        new = sorted(gui_loaded() - before)
        if new:
            blamed[each] = new
print(json.dumps({"imported": imported, "blamed": blamed}))
"""


def test_core_imports_without_qt_or_napari():
    names = [f"{OWN_PACKAGE}.{n}" for n in CORE_PACKAGES + CORE_MODULES]
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(names), json.dumps(GUI_PREFIXES)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(names) <= set(report["imported"])
    assert len(report["imported"]) > len(names)  # the submodules were walked too
    assert report["blamed"] == {}, f"core modules loaded Qt or napari: {report['blamed']}"
