"""The sample-input arguments shared by the commands that read a Xenium run with its H&E."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from napari_morphomol.commands._arguments import real_number
from napari_morphomol.errors import InputError

_INPUT_OPTIONS = ("xenium_dir", "he", "alignment", "registration", "region", "panel", "checkpoint", "landmarks")


def add_sample_arguments(parser: argparse.ArgumentParser, *, region_action: str, xenium_optional: bool = False) -> None:
    """XENIUM_DIR (optional with ``xenium_optional``: an H&E alone), --he, --alignment / --registration,
    --he-pixel-size-um and --region."""
    if xenium_optional:
        parser.add_argument("xenium_dir", metavar="XENIUM_DIR", nargs="?",
                            help="Xenium output folder (holds experiment.xenium); leave it out for an H&E alone")
    else:
        parser.add_argument("xenium_dir", metavar="XENIUM_DIR", help="Xenium output folder (holds experiment.xenium)")
    parser.add_argument("--he", required=True, metavar="HE", help="H&E image (pyramidal OME-TIFF / TIFF / SVS)")
    parser.add_argument("--alignment", metavar="CSV",
                        help="3 x 3 H&E px -> global px matrix (Xenium's he_imagealignment.csv); "
                             "default: a *he_imagealignment.csv in XENIUM_DIR")
    parser.add_argument("--registration", metavar="JSON",
                        help="registration record written by `morphomol register` (any model, e.g. per-region); "
                             "used instead of the alignment matrix")
    parser.add_argument("--he-pixel-size-um", type=real_number(0.0, 1000.0, open_minimum=True, unit="um/px"),
                        help="H&E um/px when the file does not record it")
    parser.add_argument("--region", metavar="CSV",
                        help=f"polygon with columns x,y in H&E px: {region_action} only tiles whose centre is inside")


def region_polygon_he_px(path: str | None) -> np.ndarray | None:
    """The --region polygon (x, y vertices in H&E px), or None."""
    if path is None:
        return None
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the region polygon {path} ({exc})") from exc
    if not {"x", "y"} <= set(table.columns):
        raise InputError(f"{path} needs columns x,y (polygon vertices in H&E px), has {list(table.columns)}")
    try:
        vertices = table[["x", "y"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: the x,y columns must hold numbers (H&E px) ({exc})") from exc
    if len(vertices) < 3 or not np.isfinite(vertices).all():
        raise InputError(f"{path} must hold at least 3 vertices with finite x,y (H&E px); it has {len(vertices)} "
                         f"rows, {int((~np.isfinite(vertices)).any(axis=1).sum())} of them not finite")
    x, y = vertices[:, 0], vertices[:, 1]
    area_px2 = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    if area_px2 < 1.0:
        raise InputError(f"{path}: the polygon encloses no area (its vertices lie on a line or a point); "
                         "draw the region again")
    return vertices


def alignment_path(xenium_dir: Path, given: str | None, registration: str | None) -> str | None:
    """--alignment, else the one *he_imagealignment.csv in XENIUM_DIR (none when --registration)."""
    if given is not None or registration is not None:
        return given
    found = sorted(xenium_dir.glob("*he_imagealignment.csv"))
    if len(found) != 1:
        raise InputError(
            f"no --alignment given and {len(found)} *he_imagealignment.csv files in {xenium_dir}; "
            "register the H&E first and pass --alignment CSV or --registration JSON"
        )
    return str(found[0])


def input_paths(args: argparse.Namespace, *more: str | Path | None) -> list[str | Path]:
    """Every input file or folder the command line names (and ``more``): no output may be one,
    hold one or lie inside one (:func:`napari_morphomol._atomic.guard_output`)."""
    given = [getattr(args, name, None) for name in _INPUT_OPTIONS]
    return [path for path in (*given, *more) if path is not None]
