"""Landmark and alignment files: Xenium Explorer keypoints, Xenium alignment matrix, BigWarp.

- Xenium Explorer keypoints CSV: header ``fixedX,fixedY,alignmentX,alignmentY``; *fixed* is
  Xenium morphology px (our ``global``), *alignment* is H&E px. No names or on/off flags: pairs
  read back are named ``Pt-0..`` and active, and only active pairs are written.
- Xenium ``*he_imagealignment.csv``: headerless 3 x 3 matrix, H&E px -> morphology px.
- BigWarp landmarks CSV (2-D): no header, ``name,active,moving-x,moving-y,fixed-x,fixed-y``,
  every field quoted. We take **moving = H&E** (the image warped) and **fixed = Xenium ``global``
  px** (the reference, e.g. the DAPI morphology image opened in BigWarp at its own pixels).

Writers are atomic and guarded (:func:`napari_morphomol._atomic.guard_output`): an existing
file is replaced only with ``overwrite=True`` and only when it reads back as a file of the same
format (``ALIGNMENT_CSV``, ``KEYPOINTS_CSV``, ``BIGWARP_CSV``), never an image or a file of
anything else, and never one of the ``inputs`` the caller names. Numbers are written with Python's shortest
round-trip repr, so a file reads back to the very same floats.

A file read with the two sides the wrong way round still fits an affine perfectly well, so
:func:`check_direction` looks at what can tell the two apart: whether points fall inside
their images, whether the H&E footprint lands on the Xenium image, and whether the scale
matches the pixel-size ratio.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from napari_morphomol._atomic import small_file_kind, write_text_atomic
from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM, apply_affine_xy
from napari_morphomol.errors import InputError
from napari_morphomol.registration.landmarks import LandmarkPairs

LANDMARK_FORMATS = ("xenium", "bigwarp")
"""Landmark files we write: Xenium Explorer keypoints and BigWarp CSV."""
KEYPOINTS_HEADER = ("fixedX", "fixedY", "alignmentX", "alignmentY")


def _read_rows(path: str | Path, what: str) -> list[list[str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a text CSV file ({exc})") from exc
    return [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]


def _floats(cells: list[str], path: Path | str, line: int) -> list[float]:
    try:
        return [float(c) for c in cells]
    except ValueError as exc:
        raise InputError(f"{path}, line {line}: expected numbers, got {cells} ({exc})") from exc


def _fmt(x: float) -> str:
    return repr(float(x))


# ---------------------------------------------------------------- Xenium Explorer keypoints


def read_keypoints_csv(path: str | Path) -> LandmarkPairs:
    """Xenium Explorer keypoints: ``fixedX,fixedY`` = ``global`` px, ``alignmentX,Y`` = H&E px."""
    rows = _read_rows(path, "keypoints")
    if not rows:
        raise InputError(f"{path} is empty; expected a header {','.join(KEYPOINTS_HEADER)} and point rows")
    header = tuple(c.strip() for c in rows[0])
    if set(header) != set(KEYPOINTS_HEADER) or len(header) != 4:
        raise InputError(
            f"{path} is not a Xenium Explorer keypoints CSV: header {list(header)}, expected "
            f"{','.join(KEYPOINTS_HEADER)} (BigWarp files have no header: read them as BigWarp)"
        )
    col = {name: header.index(name) for name in KEYPOINTS_HEADER}
    values = np.array([_floats(r, path, i + 2) for i, r in enumerate(rows[1:])]).reshape(-1, 4)
    global_px = values[:, [col["fixedX"], col["fixedY"]]]
    he_px = values[:, [col["alignmentX"], col["alignmentY"]]]
    return LandmarkPairs.from_arrays(he_px, global_px)


def write_keypoints_csv(path: str | Path, pairs: LandmarkPairs, *, overwrite: bool = False, inputs=()) -> Path:
    """Active pairs as Xenium Explorer keypoints; ``inputs`` are paths the file may not replace."""
    lines = [",".join(KEYPOINTS_HEADER)]
    for g, h in zip(pairs.global_px[pairs.active], pairs.he_px[pairs.active]):
        lines.append(",".join(_fmt(v) for v in (g[0], g[1], h[0], h[1])))
    return write_text_atomic(path, "\n".join(lines) + "\n", KEYPOINTS_CSV, inputs=inputs, overwrite=overwrite)


# ---------------------------------------------------------------- Xenium alignment matrix


def read_alignment_csv(path: str | Path) -> np.ndarray:
    """Xenium ``*he_imagealignment.csv``: headerless 3 x 3 matrix, H&E px -> ``global`` px."""
    rows = _read_rows(path, "alignment matrix")
    matrix = (
        np.array([_floats(r, path, i + 1) for i, r in enumerate(rows)], dtype=np.float64) if rows else np.empty((0,))
    )
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)) or not np.allclose(matrix[2], [0, 0, 1]):
        raise InputError(
            f"{path} is not a 3 x 3 affine matrix (read shape {matrix.shape}); expected Xenium's "
            "headerless he_imagealignment.csv: three rows of three numbers, the last row 0,0,1"
        )
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise InputError(f"{path}: the matrix is singular (maps the image onto a line); re-export it")
    return matrix


def write_alignment_csv(path: str | Path, he_to_global: np.ndarray, *, overwrite: bool = False, inputs=()) -> Path:
    """Write a 3 x 3 H&E px -> ``global`` px matrix the way Xenium does (no header)."""
    m = np.asarray(he_to_global, dtype=np.float64)
    if m.shape != (3, 3) or not np.allclose(m[2], [0, 0, 1]):
        raise InputError(f"an alignment matrix must be 3 x 3 with last row 0,0,1, got shape {m.shape}")
    text = "".join(",".join(_fmt(v) for v in row) + "\n" for row in m)
    return write_text_atomic(path, text, ALIGNMENT_CSV, inputs=inputs, overwrite=overwrite)


# ---------------------------------------------------------------- BigWarp


def read_bigwarp_csv(path: str | Path) -> LandmarkPairs:
    """BigWarp 2-D landmarks: moving = H&E px, fixed = ``global`` px (see module docstring)."""
    rows = _read_rows(path, "BigWarp landmarks")
    if rows and tuple(c.strip() for c in rows[0]) == KEYPOINTS_HEADER:
        raise InputError(f"{path} is a Xenium Explorer keypoints CSV, not a BigWarp one; read it as keypoints")
    names, active, he, glob = [], [], [], []
    for i, row in enumerate(rows, start=1):
        if len(row) == 8:
            raise InputError(f"{path} holds 3-D BigWarp landmarks (8 columns); export 2-D landmarks")
        if len(row) != 6:
            raise InputError(
                f"{path}, line {i}: {len(row)} fields; a 2-D BigWarp landmark row has 6: "
                "name,active,moving-x,moving-y,fixed-x,fixed-y"
            )
        flag = row[1].strip().lower()
        if flag not in ("true", "false"):
            raise InputError(f"{path}, line {i}: active flag {row[1]!r} is neither true nor false")
        x = _floats(row[2:], path, i)
        names.append(row[0])
        active.append(flag == "true")
        he.append(x[:2])
        glob.append(x[2:])
    return LandmarkPairs.from_arrays(np.reshape(he, (-1, 2)), np.reshape(glob, (-1, 2)), names, active)


def write_bigwarp_csv(path: str | Path, pairs: LandmarkPairs, *, overwrite: bool = False, inputs=()) -> Path:
    """Every pair (with its on/off flag) as a 2-D BigWarp landmarks CSV."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for name, on, h, g in zip(pairs.names, pairs.active, pairs.he_px, pairs.global_px):
        writer.writerow([name, "true" if on else "false", *(_fmt(v) for v in (h[0], h[1], g[0], g[1]))])
    return write_text_atomic(path, buf.getvalue(), BIGWARP_CSV, inputs=inputs, overwrite=overwrite)


ALIGNMENT_CSV = small_file_kind("3 x 3 alignment CSV", read_alignment_csv)
KEYPOINTS_CSV = small_file_kind("Xenium Explorer keypoints CSV", read_keypoints_csv)
BIGWARP_CSV = small_file_kind("BigWarp landmarks CSV", read_bigwarp_csv)


def read_landmarks(path: str | Path) -> LandmarkPairs:
    """Keypoints or BigWarp landmarks, told apart by the keypoints header."""
    rows = _read_rows(path, "landmarks")
    if rows and tuple(c.strip() for c in rows[0]) == KEYPOINTS_HEADER:
        return read_keypoints_csv(path)
    return read_bigwarp_csv(path)


# ---------------------------------------------------------------- direction checks

_FOOTPRINT_GOOD = 0.9
_FOOTPRINT_BAD = 0.5
_SCALE_GOOD = 0.10
_SCALE_BAD = 0.25


def _footprint_overlap(matrix: np.ndarray, he_size_xy, global_size_xy) -> float:
    """Share of the smaller of the two image rectangles that the mapped H&E rectangle overlaps."""
    w, h = he_size_xy
    corners = apply_affine_xy(matrix, np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    inter = np.clip(np.minimum(hi, global_size_xy) - np.maximum(lo, 0.0), 0.0, None).prod()
    smaller = min(np.prod(hi - lo), float(np.prod(global_size_xy)))
    return float(inter / smaller) if smaller > 0 else 0.0


def _scale_error(matrix: np.ndarray, expected: float) -> float:
    scale = np.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    return abs(np.log(scale / expected))


def check_direction(
    he_to_global: np.ndarray,
    *,
    he_size_xy: tuple[float, float] | None = None,
    global_size_xy: tuple[float, float] | None = None,
    he_pixel_size_um: float | None = None,
    xenium_pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
    source: str = "the registration",
) -> None:
    """Raise InputError when ``he_to_global`` fits much better read the other way round.

    Uses the image sizes (the H&E footprint should land on the Xenium image) and, when both
    pixel sizes are known, the scale (it should be their ratio).
    """
    m = np.asarray(he_to_global, dtype=np.float64)
    inv = np.linalg.inv(m)
    evidence = []
    if he_pixel_size_um is not None:
        expected = he_pixel_size_um / xenium_pixel_size_um
        if abs(np.log(expected)) > 2 * _SCALE_GOOD:
            here, there = _scale_error(m, expected), _scale_error(inv, expected)
            if here > np.log1p(_SCALE_BAD) and there < np.log1p(_SCALE_GOOD):
                scale = np.sqrt(abs(np.linalg.det(m[:2, :2])))
                evidence.append(
                    f"its scale {scale:.3f} is far from the pixel-size ratio {expected:.3f} "
                    f"(H&E {he_pixel_size_um:g} um/px / Xenium {xenium_pixel_size_um:g} um/px), "
                    "while the reverse direction matches it"
                )
    if he_size_xy is not None and global_size_xy is not None:
        here = _footprint_overlap(m, he_size_xy, global_size_xy)
        there = _footprint_overlap(inv, he_size_xy, global_size_xy)
        if here < _FOOTPRINT_BAD and there > _FOOTPRINT_GOOD:
            evidence.append(
                f"the H&E image would overlap only {here:.0%} of the Xenium image, "
                f"but {there:.0%} the other way round"
            )
    if evidence:
        raise InputError(
            f"{source} looks reversed (Xenium px -> H&E px instead of H&E px -> Xenium px): "
            + "; ".join(evidence)
            + ". Swap the two sides of the landmark file (for a matrix, use its inverse) and retry."
        )
