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
    where = ("a sample folder (holding xenium/, as `morphomol synth` writes) or a Xenium output folder (holding "
             "experiment.xenium)")
    if xenium_optional:
        parser.add_argument("xenium_dir", metavar="SAMPLE", nargs="?",
                            help=f"{where}; leave it out for an H&E alone (then give --he)")
    else:
        parser.add_argument("xenium_dir", metavar="SAMPLE", help=where)
    parser.add_argument("--he", metavar="HE", help="H&E image (pyramidal OME-TIFF / TIFF / SVS); default: the one "
                                                   "*he_image.ome.tif in the Xenium folder or beside it in SAMPLE")
    parser.add_argument("--alignment", metavar="CSV",
                        help="3 x 3 H&E px -> global px matrix (Xenium's he_imagealignment.csv); "
                             "default: the one *he_imagealignment.csv found as the H&E is")
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


def sample_paths(args: argparse.Namespace) -> tuple[str | None, str, str | None]:
    """(Xenium folder, H&E, alignment CSV) of the command line, by the reader's rule
    (:func:`napari_morphomol.io.sample.find_sample_parts`): SAMPLE is a sample folder (holding
    ``xenium/``) or a Xenium bundle; --he and --alignment default to the one ``*he_image.ome.tif``
    and ``*he_imagealignment.csv`` in the bundle, or beside it in the sample folder (the bundle's
    parent); no alignment with --registration. Sets ``args.xenium_dir`` and ``args.he`` to what
    was found, so every later step (and the output guard) sees the same files."""
    from napari_morphomol.io.sample import find_sample_parts

    if args.xenium_dir is None:
        if args.he is None:
            raise InputError("give a sample folder or Xenium folder, or --he HE for an H&E alone")
        return None, args.he, None
    folder = Path(args.xenium_dir)
    parts = find_sample_parts(folder)
    if parts is None:
        raise InputError(f"{folder} is neither a Xenium output folder (no experiment.xenium) nor a sample folder "
                         "holding xenium/: give the folder the instrument or `morphomol synth` wrote")
    beside = find_sample_parts(folder.parent) if parts.he_path is None and folder.name == "xenium" else None
    he_found = parts.he_path or (beside.he_path if beside is not None else None)
    alignment_found = parts.alignment_csv or (beside.alignment_csv if beside is not None else None)
    args.xenium_dir = str(parts.xenium_dir)
    if args.he is None:
        if he_found is None:
            raise InputError(f"no --he given and no *he_image.ome.tif in {parts.xenium_dir} or beside it: "
                             "give the H&E image (--he HE)")
        args.he = str(he_found)
    if args.alignment is not None or getattr(args, "registration", None) is not None:
        return args.xenium_dir, args.he, args.alignment
    if alignment_found is None:
        raise InputError(f"no --alignment given and no *he_imagealignment.csv in {parts.xenium_dir} or beside it; "
                         "register the H&E first and pass --alignment CSV or --registration JSON")
    return args.xenium_dir, args.he, str(alignment_found)


def input_paths(args: argparse.Namespace, *more: str | Path | None) -> list[str | Path]:
    """Every input file or folder the command line names (and ``more``): no output may be one,
    hold one or lie inside one (:func:`napari_morphomol._atomic.guard_output`)."""
    given = [getattr(args, name, None) for name in _INPUT_OPTIONS]
    return [path for path in (*given, *more) if path is not None]
