"""Export writes that fail: killed midway, full disk, unwritable folder. No partial file at the target,
any earlier file intact, and a message that says what to do."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_morphomol._atomic import atomic_output, zarr_store_kind
from napari_morphomol.errors import InputError
from napari_morphomol.export import export_results
from napari_morphomol.export.spatialdata import EXPORT_ATTRS_KEY

# The child pauses (after writing part of its output under the temporary name) and announces the
# temporary path in a flag file; the test then kills it with SIGKILL, as a crash or power loss would.
PAUSE_AFTER_FIRST_ZARR_ELEMENT = """
import sys, time, pathlib
from spatialdata import SpatialData
original = SpatialData._write_element
def write_then_pause(self, element, zarr_container_path, *args, **kwargs):
    original(self, element, zarr_container_path, *args, **kwargs)
    pathlib.Path(sys.argv[3]).write_text(str(zarr_container_path))
    time.sleep(600)
SpatialData._write_element = write_then_pause
from napari_morphomol.export import export_results
export_results(sys.argv[1], spatialdata=sys.argv[2], clusters=False)
"""

PAUSE_BEFORE_RENAME = """
import sys, time, pathlib
from napari_morphomol import _atomic
def pause_instead_of_replace(tmp, path):
    pathlib.Path(sys.argv[3]).write_text(str(tmp))
    time.sleep(600)
_atomic.replace_path = pause_instead_of_replace
from napari_morphomol.export import export_results
export_results(sys.argv[1], h5ad=sys.argv[2], overwrite=True, clusters=False)
"""


def run_and_kill(script: str, results_store: Path, target: Path, flag: Path) -> Path:
    child = subprocess.Popen([sys.executable, "-c", script, str(results_store), str(target), str(flag)])
    try:
        deadline = time.monotonic() + 600
        while not flag.exists():
            assert child.poll() is None, f"the export child exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the export child never reached its pause"
            time.sleep(0.2)
        time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return Path(flag.read_text())


def earlier_h5ad_export(path: Path) -> bytes:
    """A small .h5ad that carries our mark (uns['morphomol']), as an earlier export would; its bytes."""
    import anndata
    import numpy as np

    anndata.AnnData(np.zeros((2, 2), dtype=np.float32), uns={"morphomol": {"earlier": "export"}}).write_h5ad(path)
    return path.read_bytes()


def earlier_spatialdata_export(path: Path) -> None:
    """A store that carries the mark of a SpatialData export of ours, plus a file called 'earlier'."""
    import zarr

    zarr.open_group(path, mode="w").attrs[EXPORT_ATTRS_KEY] = {"format_version": 1}
    (path / "earlier").write_bytes(b"earlier export")


def test_killed_zarr_write_leaves_no_target(results_store, tmp_path):
    target = tmp_path / "run.zarr"
    temporary = run_and_kill(PAUSE_AFTER_FIRST_ZARR_ELEMENT, results_store, target, tmp_path / "paused")
    assert temporary.parent == tmp_path and temporary.is_dir(), "the child was writing beside the target"
    assert not target.exists()


def test_killed_h5ad_write_keeps_the_earlier_file(results_store, tmp_path):
    target = tmp_path / "run.h5ad"
    earlier = earlier_h5ad_export(target)
    temporary = run_and_kill(PAUSE_BEFORE_RENAME, results_store, target, tmp_path / "paused")
    assert temporary.parent == tmp_path and temporary.stat().st_size > 0
    assert target.read_bytes() == earlier


def _small_file_limit() -> None:
    """In the child: files may not grow past 16 kB, as on a disk that is full."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))


@pytest.mark.parametrize("flag", ["--h5ad", "--spatialdata"])
def test_full_disk_is_a_clear_error_and_keeps_the_earlier_file(results_store, tmp_path, flag):
    target = tmp_path / ("run.h5ad" if flag == "--h5ad" else "run.zarr")
    if flag == "--h5ad":
        earlier_bytes = earlier_h5ad_export(target)
    else:
        earlier_spatialdata_export(target)
        earlier_bytes = b"earlier export"
    child = subprocess.run(
        [sys.executable, "-m", "napari_morphomol.cli", "export", str(results_store), flag, str(target),
         "--overwrite", "--no-clusters"],
        capture_output=True, text=True, preexec_fn=_small_file_limit, timeout=900,
    )
    assert child.returncode == 2, child.stderr[-2000:]
    assert "disk is full" in child.stderr and "left as it was" in child.stderr, child.stderr[-2000:]
    earlier = target if flag == "--h5ad" else target / "earlier"
    assert earlier.read_bytes() == earlier_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name], "no temporary file is left behind"


def test_unwritable_folder_is_a_clear_error(results_store):
    # root may write almost anywhere; sysfs refuses new files even to root
    if not Path("/sys").is_dir():
        pytest.skip("no /sys on this system")
    with pytest.raises(InputError, match="cannot be written.*choose a folder you can write to"):
        export_results(results_store, h5ad="/sys/morphomol-export-test.h5ad", clusters=False)
    assert not Path("/sys/morphomol-export-test.h5ad").exists()


def test_a_file_where_the_folder_should_be_is_a_clear_error(results_store, tmp_path):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file")
    with pytest.raises(InputError, match="is a file, not a folder"):
        export_results(results_store, spatialdata=not_a_folder / "run.zarr")


def test_atomic_output_replaces_a_folder_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "store.zarr"
    kind = zarr_store_kind("test store", "test_mark")
    target.mkdir()
    (target / ".zattrs").write_text('{"test_mark": 1}')
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target, kind, overwrite=True) as tmp:
            tmp.mkdir()
            raise RuntimeError("writer failed")
    assert (target / "old").read_text() == "old"
    assert os.listdir(tmp_path) == ["store.zarr"]
    with atomic_output(target, kind, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["store.zarr"]
