"""`predict` and the tiling never give silent wrong results, never leave a partial store that
blocks the corrected command, refuse sizes that would exhaust memory, and never touch inputs or
unrelated folders (issue 12, "Never lose a user's data")."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from napari_morphomol.errors import InputError
from napari_morphomol.inference import PredictOptions, open_results, partial_path, predict
from napari_morphomol.io.sample import load_sample
from napari_morphomol.registration.formats import read_alignment_csv

RUN = dict(batch_size=4, tiles_per_chunk=4, dtype="float32", device="cpu")
SLOW = ["--batch-size", "1", "--tiles-per-chunk", "1"]  # many chunks: a run that lasts long enough to meet


@pytest.fixture(scope="module")
def sample(synthetic_sample):
    s = synthetic_sample
    return load_sample(s.xenium_dir, s.he_path, s.alignment_csv)


def digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (or of the one file), by relative path."""
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        return {".": hashlib.sha256(open(folder, "rb").read()).hexdigest()}
    found = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def predict_cli(s, checkpoint, out, *extra, alignment=None) -> list[str]:
    return [sys.executable, "-m", "napari_morphomol.cli", "predict", str(s.xenium_dir), "--he", str(s.he_path),
            "--alignment", str(alignment or s.alignment_csv), "--checkpoint", str(checkpoint), "--out", str(out),
            "--device", "cpu", "--dtype", "float32", *extra]


def run(command, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def one_line_error(proc, *phrases):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]


def write_alignment(path, matrix) -> str:
    np.savetxt(path, matrix, delimiter=",", fmt="%.10g")
    return str(path)


# -- 1. the results store is guarded ------------------------------------------------------------


def test_out_inside_the_xenium_bundle_is_refused_and_nothing_changes(synthetic_sample, tiny_checkpoint):
    s = synthetic_sample
    before = digest(s.root), digest(tiny_checkpoint)
    proc = run(predict_cli(s, tiny_checkpoint, s.xenium_dir / "r.zarr"))
    one_line_error(proc, "Xenium bundle")
    assert (digest(s.root), digest(tiny_checkpoint)) == before


def test_overwrite_replaces_only_a_results_store_of_ours(tmp_path, synthetic_sample, tiny_checkpoint, results_store):
    s = synthetic_sample
    unrelated = tmp_path / "mine.zarr"  # someone's own zarr group, and files beside it
    (unrelated / "images").mkdir(parents=True)
    (unrelated / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                     "attributes": {"spatialdata_attrs": {"version": "0.2"}}}))
    (unrelated / "notes.txt").write_text("my notes")
    (unrelated / "images" / "data.bin").write_bytes(os.urandom(1000))
    before = digest(unrelated), digest(s.root), digest(tiny_checkpoint)
    proc = run(predict_cli(s, tiny_checkpoint, unrelated, "--overwrite"))
    one_line_error(proc, "not a results store written by napari-morphomol")
    assert (digest(unrelated), digest(s.root), digest(tiny_checkpoint)) == before
    assert not partial_path(unrelated).exists()

    ours = tmp_path / "ours.zarr"
    shutil.copytree(results_store, ours)
    proc = run(predict_cli(s, tiny_checkpoint, ours, "--overwrite", "--max-background", "0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open_results(ours).metadata["fingerprint"]["max_background"] == 0.5


# -- 2. transcripts that do not meet the tiles --------------------------------------------------


def test_transcripts_shifted_off_the_tiles_refuse_a_fusion_model_before_it_runs(tmp_path, synthetic_sample,
                                                                                 tiny_checkpoint):
    s = synthetic_sample
    matrix = read_alignment_csv(s.alignment_csv)
    matrix[0, 2] += 1e6
    out = tmp_path / "shifted.zarr"
    proc = run(predict_cli(s, tiny_checkpoint, out, alignment=write_alignment(tmp_path / "shifted.csv", matrix)))
    one_line_error(proc, "registration probably does not place the H&E on the Xenium run", "morphomol register",
                   "inverse")
    assert not out.exists() and not partial_path(out).exists()


def test_mirrored_alignment_keeps_no_tile_and_tiles_says_why(tmp_path, synthetic_sample):
    s = synthetic_sample
    mirrored = write_alignment(tmp_path / "mirrored.csv", read_alignment_csv(s.alignment_csv) @ np.diag([-1.0, 1, 1]))
    out = tmp_path / "mirrored.tiles.zarr"
    proc = run([sys.executable, "-m", "napari_morphomol.cli", "tiles", str(s.xenium_dir), "--he", str(s.he_path),
                "--alignment", mirrored, "--out", str(out)])
    one_line_error(proc, "no tile is kept", "grid tiles", "on tissue", "transcripts", "registration")
    assert not out.exists()


def test_zero_kept_tiles_is_an_input_error_with_the_counts(sample):
    from napari_morphomol.tiling import TilingOptions, tile_sample

    with pytest.raises(InputError, match=r"no tile is kept: of \d+ grid tiles, \d+ are on tissue.*--min-transcripts"):
        tile_sample(sample, panel=None, options=TilingOptions(min_transcripts=10**9))


# -- 3. warnings: ours, one line, recorded -----------------------------------------------------


def test_warnings_are_ours_and_the_run_records_them_with_the_samples(tmp_path, synthetic_sample, tiny_checkpoint):
    from napari_morphomol.inference import DeviceFallbackWarning
    from napari_morphomol.tiling.pipeline import FewTranscriptsWarning

    s = synthetic_sample
    matrix = read_alignment_csv(s.alignment_csv)
    matrix[0, 2] += 0.85 * 600 / 0.2125  # 85 % of the 0.6 mm sample's width: a fifth of the transcripts on tissue
    sdata = load_sample(s.xenium_dir, s.he_path, write_alignment(tmp_path / "part.csv", matrix))
    sdata.attrs["morphomol"]["warnings"] = ["a note the sample recorded when it was loaded"]
    out = tmp_path / "warned.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(sdata, PredictOptions(checkpoint=tiny_checkpoint, store=out, **{**RUN, "device": "auto"}))
    recorded = open_results(out).metadata["warnings"]
    categories = {w.get("category") for w in recorded}
    assert {"FewTranscriptsWarning"} <= categories
    assert {"source": "sample", "message": "a note the sample recorded when it was loaded"} in recorded
    ours = [w for w in caught if w.category in (FewTranscriptsWarning, DeviceFallbackWarning)]
    assert all(w.category.__module__.startswith("napari_morphomol") for w in ours) and ours
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert "DeviceFallbackWarning" in categories


# -- 4. the dtype is fixed per device kind ------------------------------------------------------


def test_auto_dtype_is_fixed_per_device_kind_and_two_runs_are_bit_identical(tmp_path, sample, tiny_checkpoint):
    from napari_morphomol.inference.devices import auto_dtype

    assert auto_dtype("cuda:0")[0] == "bfloat16" and auto_dtype("cpu")[0] == auto_dtype("mps")[0] == "float32"
    runs = [open_results(predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=tmp_path / f"{k}.zarr",
                                                        batch_size=4, tiles_per_chunk=4, device="cpu", dtype="auto")))
            for k in range(2)]
    for results in runs:
        precision = results.metadata["precision"]
        assert precision["dtype"] == "float32" and "CPU" in precision["reason"]
        assert not any("tiles_per_s" in key or "speedup" in key for key in precision)
    np.testing.assert_array_equal(runs[0].predictions, runs[1].predictions)
    np.testing.assert_array_equal(runs[0].embeddings, runs[1].embeddings)


# -- 5. bounds before work ----------------------------------------------------------------------


def _limit_memory():  # so a run that would exhaust memory fails fast instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 * 1024**3, 8 * 1024**3))


def test_a_tile_pixel_size_that_implies_terabytes_is_refused_before_work(tmp_path, synthetic_sample):
    s = synthetic_sample
    out = tmp_path / "tiny.tiles.zarr"
    proc = run([sys.executable, "-m", "napari_morphomol.cli", "tiles", str(s.xenium_dir), "--he", str(s.he_path),
                "--alignment", str(s.alignment_csv), "--out", str(out), "--tile-pixel-size-um", "1e-4"],
               timeout=300, preexec_fn=_limit_memory)
    one_line_error(proc, "--tile-pixel-size-um", "token raster", "TB", "limit")
    # how fast it refuses is a benchmark figure (benchmarks/bench_tiling.py --section refusal)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_batch_that_cannot_be_held_is_refused_naming_the_option():
    from napari_morphomol.tiling import TileGeometry
    from napari_morphomol.tiling.geometry import check_batch_memory

    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=80000, he_width_px=80000)
    with pytest.raises(InputError, match=r"a batch of 10000000 tiles \(--batch-size\).*TB.*limit"):
        check_batch_memory(geometry, 10**7, 380, held_batches=3)
    check_batch_memory(geometry, 32, 380, held_batches=3)


@pytest.mark.parametrize("option", [["--workers", "0"], ["--batch-size", "0"], ["--tiles-per-chunk", "0"],
                                    ["--min-transcripts", "-1"], ["--max-background", "1.5"]])
def test_predict_options_out_of_range_are_refused_by_the_command_line(tmp_path, synthetic_sample, tiny_checkpoint,
                                                                      option):
    out = tmp_path / "r.zarr"
    proc = run(predict_cli(synthetic_sample, tiny_checkpoint, out, *option), timeout=300)
    assert proc.returncode == 2 and option[0] in proc.stderr and "give a" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not partial_path(out).exists()


@pytest.mark.parametrize("option", [{"num_workers": 0}, {"batch_size": 0}, {"tiles_per_chunk": 0},
                                    {"min_transcripts": -1}, {"max_background": 1.5}, {"batch_size": 2.5},
                                    {"jpeg_device": "mps"}, {"jpeg_device": "gpu"}, {"jpeg_device": 0}])
def test_predict_refuses_options_out_of_range_from_python_before_any_work(tmp_path, sample, option):
    out = tmp_path / "r.zarr"
    not_read = tmp_path / "not-read-yet.safetensors"  # the options are checked before the checkpoint is opened
    with pytest.raises(InputError, match=next(iter(option))):
        predict(sample, PredictOptions(checkpoint=not_read, store=out, **{**RUN, **option}))
    assert not out.exists() and not partial_path(out).exists()


def test_predict_hands_the_jpeg_device_to_the_workers(tmp_path, sample, tiny_checkpoint, monkeypatch):
    from napari_morphomol.inference import worker

    asked = []
    opened = worker.open_he_levels

    def recorded(he_path, jpeg_device=None):
        asked.append(jpeg_device)
        return opened(he_path, jpeg_device)

    monkeypatch.setattr(worker, "open_he_levels", recorded)
    predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=tmp_path / "r.zarr", jpeg_device="cpu", **RUN))
    assert asked and set(asked) == {"cpu"}


# -- 6. partial stores never block the corrected command ----------------------------------------


def test_killed_as_the_partial_appears_the_same_command_completes(tmp_path, synthetic_sample, tiny_checkpoint):
    s = synthetic_sample
    out = tmp_path / "killed.zarr"
    command = predict_cli(s, tiny_checkpoint, out, *SLOW)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not partial_path(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial_path(out).exists(), "the run ended before its partial store appeared"
    again = run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert open_results(out).metadata["status"] == "complete" and not partial_path(out).exists()


def test_a_partial_whose_start_was_cut_short_is_restarted(tmp_path, sample, tiny_checkpoint):
    out = tmp_path / "stub.zarr"
    import zarr

    root = zarr.open_group(partial_path(out), mode="w", zarr_format=3)  # killed before the attributes
    root.create_group("tiles")
    predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=out, **RUN))
    assert open_results(out).metadata["status"] == "complete" and not partial_path(out).exists()


def test_a_checkpoint_that_fails_its_shape_check_leaves_nothing_behind(tmp_path, sample, tiny_checkpoint):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    name = max(tensors, key=lambda key: tensors[key].numel())
    tensors[name] = tensors[name][:-1].clone()  # one row short: damaged weights, intact card
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    out = tmp_path / "r.zarr"
    with pytest.raises(InputError, match=r"damaged\.safetensors"):
        predict(sample, PredictOptions(checkpoint=damaged, store=out, **RUN))
    assert not out.exists() and not partial_path(out).exists()
    predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=out, **RUN))  # the corrected command
    assert open_results(out).metadata["status"] == "complete"


INTERRUPT = """
import sys
import napari_morphomol.inference.prediction as prediction
import napari_morphomol.tiling as tiling
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # as Ctrl-C would, at this point of the run
setattr(tiling if sys.argv[1] == "tiling" else prediction, sys.argv[1] == "tiling" and "tile_sample"
        or "_choose_precision", interrupted)
from napari_morphomol.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_after_ctrl_c_the_message_says_what_was_kept(tmp_path, synthetic_sample, tiny_checkpoint):
    s = synthetic_sample
    out = tmp_path / "r.zarr"
    arguments = predict_cli(s, tiny_checkpoint, out)[3:]
    during_tiling = run([sys.executable, "-c", INTERRUPT, "tiling", *arguments])
    assert during_tiling.returncode == 130, during_tiling.stderr[-3000:]
    assert "before anything was written" in during_tiling.stderr and ".partial" not in during_tiling.stderr
    assert not partial_path(out).exists() and not out.exists()

    during_calibration = run([sys.executable, "-c", INTERRUPT, "calibration", *arguments])
    assert during_calibration.returncode == 130, during_calibration.stderr[-3000:]
    assert f"{partial_path(out)} keeps 0 of" in during_calibration.stderr, during_calibration.stderr[-3000:]
    assert partial_path(out).exists()
    resumed = run(predict_cli(s, tiny_checkpoint, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


HELD = """
import sys, time
from pathlib import Path
import napari_morphomol.inference.scheduling as scheduling
release = Path(sys.argv[1])
run_chunk = scheduling.run_chunk
def held(spec, chunk):  # chunks wait until the test lets them go, so the run is still going on
    while not release.exists():
        time.sleep(0.05)
    return run_chunk(spec, chunk)
scheduling.run_chunk = held
from napari_morphomol.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_predict_on_the_same_out_says_who_is_writing_it(tmp_path, synthetic_sample, tiny_checkpoint):
    s = synthetic_sample
    out = tmp_path / "busy.zarr"
    command = predict_cli(s, tiny_checkpoint, out)
    release = tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", HELD, str(release), *command[3:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not partial_path(out).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run(command)
    finally:
        release.touch()
    one_line_error(second, f"another predict (pid {first.pid} on ", "is writing busy.zarr; wait for it or stop it")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert open_results(out).metadata["status"] == "complete"


# -- 7. faults: a read-only folder, a full disk -------------------------------------------------


def test_a_read_only_out_folder_is_a_one_line_error(tmp_path, synthetic_sample, tiny_checkpoint):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    command = predict_cli(synthetic_sample, tiny_checkpoint, folder / "r.zarr")
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    try:
        proc = run(command)
    finally:
        folder.chmod(0o755)
    one_line_error(proc, "cannot be written", str(folder))
    assert list(folder.iterdir()) == []


def _disk_full_for(monkeypatch, prefix: str) -> None:
    from zarr.storage import LocalStore

    original = LocalStore.set

    async def set_(self, key, value):
        if key.startswith(prefix):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_)


def test_a_full_disk_is_a_one_line_error_and_leaves_no_half_store(tmp_path, sample, tiny_checkpoint, monkeypatch):
    out = tmp_path / "full.zarr"
    with monkeypatch.context() as patch:
        _disk_full_for(patch, "")  # the partial store cannot even be started
        with pytest.raises(InputError, match="disk is full"):
            predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=out, **RUN))
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    with monkeypatch.context() as patch:
        _disk_full_for(patch, "predictions/c")  # full while the chunks are written
        with pytest.raises(InputError, match=r"disk is full.*kept in .*full\.zarr\.partial.*resume"):
            predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=out, **RUN))
    assert not out.exists() and partial_path(out).exists()
    predict(sample, PredictOptions(checkpoint=tiny_checkpoint, store=out, **RUN))  # space freed: the same call resumes
    assert open_results(out).metadata["status"] == "complete"
