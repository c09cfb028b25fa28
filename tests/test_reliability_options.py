"""Every numeric option is checked for its range, and every geometry input for finiteness and
degeneracy, before any work: one line that says what to give, exit code 2, no traceback."""

from __future__ import annotations

import re

import pytest

from napari_morphomol.cli import main

SAMPLE = ["XENIUM", "--he", "HE"]
BASE = {
    "tiles": ["tiles", *SAMPLE, "--out", "T.zarr"],
    "predict": ["predict", *SAMPLE, "--out", "R.zarr"],
    "register": ["register", *SAMPLE, "--landmarks", "L.csv", "--out", "A.csv"],
    "train": ["train", "DATA", "--out", "OUT"],
    "evaluate": ["evaluate", "CKPT", "--data", "DATA", "--out", "OUT"],
    "synth": ["synth", "OUT"],
    "demo": ["demo"],
}
BAD = [
    ("tiles", ["--tile-px", "0"]), ("tiles", ["--tile-px", "-512"]), ("tiles", ["--stride-px", "0"]),
    ("tiles", ["--tile-pixel-size-um", "0"]), ("tiles", ["--tile-mpp", "nan"]), ("tiles", ["--tile-mpp", "-0.5"]),
    ("tiles", ["--max-background", "1.5"]), ("tiles", ["--min-transcripts", "-1"]), ("tiles", ["--min-qv", "-3"]),
    ("tiles", ["--he-pixel-size-um", "0"]), ("tiles", ["--he-pixel-size-um", "inf"]),
    ("predict", ["--workers", "0"]), ("predict", ["--batch-size", "0"]), ("predict", ["--tiles-per-chunk", "0"]),
    ("predict", ["--min-transcripts", "-5"]), ("predict", ["--max-background", "-0.1"]),
    ("register", ["--outlier-um", "0"]), ("register", ["--regions", "0"]), ("register", ["--he-pixel-size-um", "-1"]),
    ("train", ["--epochs", "0"]), ("train", ["--batch-size", "0"]), ("train", ["--accumulate", "0"]),
    ("train", ["--lr-head", "0"]), ("train", ["--lr-head", "nan"]), ("train", ["--weight-decay", "-1"]),
    ("train", ["--patience", "0"]), ("train", ["--workers", "-1"]), ("train", ["--val-fraction", "1.2"]),
    ("train", ["--test-fraction", "-0.1"]), ("train", ["--warmup-epochs", "-1"]), ("train", ["--seed", "-1"]),
    ("evaluate", ["--batch-size", "0"]), ("evaluate", ["--genes", "-1"]),
    ("synth", ["--size-mm", "0", "1"]), ("synth", ["--size-mm", "1", "1e6"]), ("synth", ["--core-genes", "0"]),
    ("synth", ["--addon-genes", "-4"]), ("synth", ["--he-pixel-size-um", "0"]), ("synth", ["--seed", "-2"]),
    ("demo", ["--size-mm", "-1", "1"]), ("demo", ["--seed", "x"]),
]


@pytest.mark.parametrize(("command", "option"), BAD, ids=[f"{c} {' '.join(o)}" for c, o in BAD])
def test_out_of_range_options_are_refused_with_what_to_give(command, option, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*BASE[command], *option])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    named = re.search(r"argument (\S+):", err)  # "--tile-pixel-size-um/--tile-mpp" for an option with an alias
    assert named and option[0] in named.group(1).split("/") and "give a" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("rows", "message"), [
    ("x,y\n0,0\n10,10\n", "at least 3 vertices"),
    ("x,y\n0,0\nnan,10\n10,0\n", "not finite"),
    ("x,y\n0,0\n5,5\n10,10\n", "encloses no area"),
    ("x,y\n0,0\na,5\n10,0\n", "must hold numbers"),
    ("a,b\n0,0\n", "needs columns x,y"),
])
def test_a_degenerate_region_polygon_is_refused(tmp_path, rows, message):
    from napari_morphomol.commands._sample_inputs import region_polygon_he_px
    from napari_morphomol.errors import InputError

    path = tmp_path / "region.csv"
    path.write_text(rows)
    with pytest.raises(InputError, match=message):
        region_polygon_he_px(str(path))
