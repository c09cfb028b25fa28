"""No command ever changes a byte of its inputs or removes a file it did not write.

Every writing command is run with ``--out`` at each of its inputs, inside the Xenium bundle and
at an unrelated folder of the user's files, with and without ``--overwrite``; checksums of every
file of the sample (and of the unrelated folder) are taken before and after. The named cases run
the real command line in a subprocess; the property test draws many more in-process."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from napari_morphomol.cli import main

NEVER_IN_BUNDLE = "never writes into a Xenium bundle"


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a root may be a single file), by path."""
    digest = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic_sample, tiny_checkpoint) -> dict[str, Path]:
    """A copy of the synthetic sample S (a Xenium bundle S/xenium beside its H&E), a checkpoint in
    a models folder, and a folder of the user's own documents."""
    root = tmp_path_factory.mktemp("reliability")
    sample = root / "S"
    shutil.copytree(synthetic_sample.root, sample)
    models = root / "models"
    models.mkdir()
    checkpoint = models / "model.safetensors"
    shutil.copyfile(tiny_checkpoint, checkpoint)
    documents = root / "documents"
    documents.mkdir()
    (documents / "letter.txt").write_text("dear colleague")
    (documents / "slides").mkdir()
    (documents / "slides" / "case.svs").write_bytes(b"\x00not really a slide" * 100)
    return {"S": sample, "bundle": sample / "xenium", "he": sample / "he_image.ome.tif",
            "alignment": sample / "he_imagealignment.csv", "keypoints": sample / "he_keypoints.csv",
            "panel": sample / "panel.json", "checkpoint": checkpoint, "documents": documents, "root": root}


def command_line(command: str, w: dict[str, Path], out: Path, overwrite: bool) -> list[str]:
    sample_args = [str(w["bundle"]), "--he", str(w["he"])]
    argv = {
        "tiles": ["tiles", *sample_args, "--alignment", str(w["alignment"]), "--panel", str(w["panel"])],
        "register": ["register", *sample_args, "--landmarks", str(w["keypoints"])],
        "predict": ["predict", *sample_args, "--alignment", str(w["alignment"]), "--checkpoint", str(w["checkpoint"])],
        "evaluate": ["evaluate", str(w["checkpoint"]), "--data", str(w["S"])],
        "train": ["train", str(w["S"]), "--epochs", "1"],
    }[command]
    overwrite = overwrite and command != "train"  # train never replaces: it refuses a checkpoint already there
    return [*argv, "--out", str(out), *(["--overwrite"] if overwrite else [])]


def command_inputs(command: str, w: dict[str, Path]) -> list[Path]:
    """Every input path the command line names."""
    own = {"tiles": ["bundle", "he", "alignment", "panel"], "register": ["bundle", "he", "keypoints"],
           "predict": ["bundle", "he", "alignment", "checkpoint"], "evaluate": ["checkpoint", "S"],
           "train": ["S"]}[command]
    return [w[name] for name in own]


def input_targets(command: str, w: dict[str, Path]) -> list[Path]:
    """The command's inputs, a file of the bundle, and the folders that hold inputs."""
    return command_inputs(command, w) + [w["S"], w["bundle"] / "experiment.xenium", w["checkpoint"].parent]


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_morphomol.cli", *argv], capture_output=True, text=True,
                          timeout=600)


def protected(w: dict[str, Path]) -> dict[str, str]:
    return tree_digest(w["S"], w["checkpoint"].parent, w["documents"])


# ------------------------------------------------------------------ the cases the issue names


def test_tiles_onto_the_bundle_with_overwrite_is_refused_and_the_bundle_kept(world):
    before = protected(world)
    child = run_cli(command_line("tiles", world, world["bundle"], overwrite=True))
    assert child.returncode == 2, child.stderr
    assert NEVER_IN_BUNDLE in child.stderr and "Traceback" not in child.stderr
    assert protected(world) == before


def test_tiles_onto_a_folder_of_documents_with_overwrite_is_refused(world):
    before = protected(world)
    child = run_cli(command_line("tiles", world, world["documents"], overwrite=True))
    assert child.returncode == 2, child.stderr
    assert "is not a tiles store written by napari-morphomol" in child.stderr
    assert protected(world) == before


@pytest.mark.parametrize("target", ["he", "keypoints", "experiment.xenium"])
def test_register_onto_an_input_with_overwrite_is_refused(world, target):
    out = world["bundle"] / "experiment.xenium" if target == "experiment.xenium" else world[target]
    before = protected(world)
    child = run_cli(command_line("register", world, out, overwrite=True))
    assert child.returncode == 2, child.stderr
    assert "Traceback" not in child.stderr and ("input" in child.stderr or NEVER_IN_BUNDLE in child.stderr)
    assert protected(world) == before


@pytest.mark.parametrize("target", ["documents", "another bundle"])
def test_export_onto_a_folder_that_is_not_ours_with_overwrite_is_refused(world, results_store, target):
    out = world["documents"] if target == "documents" else world["bundle"]
    before = protected(world)
    child = run_cli(["export", str(results_store), "--spatialdata", str(out), "--overwrite", "--no-clusters"])
    assert child.returncode == 2, child.stderr
    assert ("is not a SpatialData export written by napari-morphomol" in child.stderr
            or NEVER_IN_BUNDLE in child.stderr), child.stderr
    assert protected(world) == before


@pytest.mark.parametrize("command", ["tiles", "predict", "register", "evaluate", "train"])
def test_no_command_writes_inside_the_bundle(world, command):
    before = protected(world)
    child = run_cli(command_line(command, world, world["bundle"] / "tiles" / "out.zarr", overwrite=False))
    assert child.returncode == 2, child.stderr
    assert NEVER_IN_BUNDLE in child.stderr, child.stderr
    assert protected(world) == before
    assert not (world["bundle"] / "tiles").exists()


def test_overwrite_replaces_an_output_of_ours(world, tmp_path):
    """The other side of the promise: --overwrite does replace what napari-morphomol wrote."""
    out = tmp_path / "alignment.csv"
    assert main(command_line("register", world, out, overwrite=False)) == 0
    written = out.read_bytes()
    out.write_text("1,0,0\n0,1,0\n0,0,1\n")  # still an alignment matrix: ours to replace
    assert main(command_line("register", world, out, overwrite=True)) == 0
    assert out.read_bytes() == written


def test_train_takes_val_and_test_as_the_paths_given_in_data(world, tmp_path, synthetic_sample_deformed):
    """--val /path/s2 names the sample DATA gave as /path/s2 (it used to be refused as not in DATA)."""
    second = tmp_path / "s2"
    shutil.copytree(synthetic_sample_deformed.root, second)
    code = main(["train", str(world["S"]), str(second), "--val", str(second), "--out", str(tmp_path / "run"),
                 "--variants", "min_mae", "--work", str(tmp_path / "work")])
    assert code == 0
    assert '"val": [\n  "s2"\n ]' in (tmp_path / "run" / "split.json").read_text()


# ------------------------------------------------------------------ the property


COMMANDS = ["tiles", "register", "predict", "evaluate", "train"]
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda name: name not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(command=st.sampled_from(COMMANDS), where=st.sampled_from(["input", "inside input", "bundle", "documents"]),
       pick=st.integers(0, 20), name=NAME, overwrite=st.booleans(), junk=st.binary(min_size=0, max_size=64))
def test_no_input_byte_changes_and_no_unrelated_file_is_removed(world, capsys, command, where, pick, name,
                                                                overwrite, junk):
    # a random file of the user's in the sample and in the documents, present before the command runs
    for folder in (world["S"], world["documents"]):
        stray = folder / f"user-{name}"
        if not stray.exists():
            stray.write_bytes(junk)
    inputs = input_targets(command, world)
    if where == "input":
        out = inputs[pick % len(inputs)]
    elif where == "inside input":
        folders = [p for p in command_inputs(command, world) if p.is_dir()]
        out = folders[pick % len(folders)] / name
    elif where == "bundle":
        out = world["bundle"] / name / "out.zarr" if pick % 2 else world["bundle"] / name
    else:  # an unrelated folder of files, or one of its files
        out = world["documents"] if pick % 2 else world["documents"] / "letter.txt"
    before = protected(world)
    code = main(command_line(command, world, out, overwrite))
    captured = capsys.readouterr()
    after = protected(world)
    assert "Traceback" not in captured.err
    assert before.items() <= after.items(), (command, out, overwrite, "an input or a file of the user's changed")
    if where == "documents" and command in ("train", "evaluate"):
        return  # OUT is a folder (train) or a path stem (evaluate): new files beside the user's are fine
    assert code == 2, (command, out, overwrite, captured.err)
    assert after == before, (command, out, overwrite, "nothing may be added among the inputs")


# ------------------------------------------------------------------ faults of the machine

UNWRITABLE = Path("/sys/kernel")  # root may write almost anywhere; sysfs refuses new files even to root


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="no sysfs on this system")
@pytest.mark.parametrize("command", ["tiles", "register", "evaluate", "train", "export"])
def test_an_unwritable_out_is_one_line_and_no_traceback(world, results_store, command):
    out = UNWRITABLE / "morphomol-out"
    if command == "export":
        argv = ["export", str(results_store), "--h5ad", str(out) + ".h5ad", "--no-clusters"]
    else:
        argv = command_line(command, world, out, overwrite=False)
    before = protected(world)
    child = run_cli(argv)
    assert child.returncode == 2, child.stderr
    assert "Traceback" not in child.stderr
    errors = [line for line in child.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and ("cannot be written" in errors[0] or "not permitted" in errors[0]), child.stderr
    assert protected(world) == before


def _small_file_limit() -> None:
    """In the child: files may not grow past 16 kB, as on a disk that is full."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))


def test_a_full_disk_while_tiling_is_one_line_and_leaves_nothing(world, tmp_path):
    out = tmp_path / "tiles.zarr"
    child = subprocess.run([sys.executable, "-m", "napari_morphomol.cli",
                            *command_line("tiles", world, out, overwrite=False)],
                           capture_output=True, text=True, preexec_fn=_small_file_limit, timeout=600)
    assert child.returncode == 2, child.stderr[-2000:]
    assert "disk is full" in child.stderr and "Traceback" not in child.stderr, child.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "no store and no temporary store are left"


def test_export_to_one_path_twice_is_refused(results_store, tmp_path, capsys):
    same = tmp_path / "run"
    assert main(["export", str(results_store), "--h5ad", str(same), "--spatialdata", str(same)]) == 2
    assert "two exports name the same path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_register_landmarks_over_its_own_alignment_is_refused(world, tmp_path, capsys):
    out = tmp_path / "alignment.csv"
    argv = command_line("register", world, out, overwrite=False) + ["--save-landmarks", str(out)]
    assert main(argv) == 2
    assert "give it its own name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
