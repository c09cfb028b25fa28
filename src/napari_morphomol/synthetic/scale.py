"""A slide-scale sample in minutes: one synthetic block repeated on a grid of copies.

:func:`write_scale_sample` writes (or takes) one ordinary synthetic sample, the *block*, placed
by an axis-aligned affine without warp (``write_synthetic_sample(..., deformation=False,
axis_aligned=True, he_pixel_size_um=SCALE_HE_PIXEL_SIZE_UM)``), cuts a *cell* out of its
section and repeats the cell on a grid of columns x rows:

- ``xenium/transcripts.parquet``: the block's transcripts inside the cell, shifted per copy, with
  transcript ids and cell ids unique per copy, written by the generator's own columns and writer
  (:class:`~.bundle.TranscriptColumns`, :func:`~.bundle.transcripts_writer`: the same schema,
  codec and row groups of at most 2**20 rows); the copies follow each other row by row;
- the DAPI (``morphology_focus``: lossless JPEG 2000 as Xenium ships it, or deflate) and the H&E
  (JPEG q90): the cell's pixels repeated, by :func:`~.writers.write_repeated_ome_tiff` (each
  distinct tile encoded once, its bytes written wherever it repeats);
- ``he_imagealignment.csv``: the block's affine without its shift, since the cell starts at H&E
  px 0 and global px 0; so an H&E px of a copy maps onto that copy's transcripts exactly as the
  block's H&E px maps onto the block's;
- ``panel.json`` and ``xenium/gene_panel.json`` as the block's, ``experiment.xenium`` with the
  big counts, ``scale_sample.json`` (:class:`ScaleSample`: grid, cell, copy offsets).

Why the cell: a copy's H&E and DAPI can only be the block's pixels repeated when the copy's shift
is a whole number of pixels in both images, so the H&E is placed by the pixel-size ratio alone
(no rotation, shear or warp) and that ratio is 9/7 (``SCALE_HE_PIXEL_SIZE_UM`` = 0.2125 * 9 / 7 =
0.2732 um/px): 7 H&E px = 9 Xenium px. The cell's sides are multiples of 128 such steps
(896 H&E px = 1152 global px = 244.8 um), so its tiles repeat and every pyramid level repeats a
whole halved cell; it starts where the block's H&E and Xenium pixel edges meet, inside the section.

No cell segmentation: cells.parquet, the boundaries, the cell-feature matrix and cells.zarr.zip
(label masks at DAPI size, one cell id per copy) are not written, so a scale sample opens with
``load_sample(..., cells=False)`` (the default) only. The ground truth is the block's (each copy is
the block's cell), so the block stays beside the sample (``block/``) when it is written here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import tifffile

from napari_morphomol._atomic import atomic_output
from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM
from napari_morphomol.errors import InputError
from napari_morphomol.registration.formats import write_alignment_csv
from napari_morphomol.synthetic.bundle import (
    EXPERIMENT_FILE,
    MORPHOLOGY_FOCUS,
    TRANSCRIPT_ROW_GROUP_ROWS,
    TranscriptColumns,
    cell_id_strings,
    transcripts_writer,
)
from napari_morphomol.synthetic.expression import BlockTranscripts, make_panel
from napari_morphomol.synthetic.sample import SAMPLE_FOLDER, SyntheticSample, check_out_dir, write_synthetic_sample
from napari_morphomol.synthetic.truth import GENERATOR, load_ground_truth
from napari_morphomol.synthetic.writers import (
    JPEG,
    JPEG2000_LOSSLESS,
    LOSSLESS,
    repeat_step_px,
    write_in_background,
    write_repeated_ome_tiff,
)

SCALE_HE_PIXEL_SIZE_UM = XENIUM_PIXEL_SIZE_UM * 9 / 7
"""H&E pixel size of a scale sample (0.2732 um/px): 7 H&E px = 9 Xenium px."""
_STEP_HE_PX, _STEP_GLOBAL_PX = 7, 9
_CELL_UNIT_STEPS = 128
"""A cell's sides are multiples of this many steps (896 H&E px, 1152 global px, 244.8 um)."""
SCALE_RECORD = "scale_sample.json"
DAPI_COMPRESSIONS = {"jpeg2000": JPEG2000_LOSSLESS, "deflate": LOSSLESS}
"""The DAPI's codecs: lossless JPEG 2000 as Xenium ships it (the default: about 0.76 x deflate's size,
but about 20 x slower to decode), or deflate (fast to read)."""
_TRANSCRIPT_COLUMNS = ["x_location", "y_location", "z_location", "codeword_index", "cell_id", "overlaps_nucleus",
                       "nucleus_distance", "qv"]


@dataclass(frozen=True)
class ScaleSample:
    """A scale sample folder and how it was made (read back from its ``scale_sample.json``)."""

    root: Path
    block_root: Path
    """The block sample (``root / "block"`` when written with the sample)."""
    grid: tuple[int, int]
    """(columns, rows) of copies."""
    cell_global_px: tuple[int, int, int, int]
    """(x0, y0, width, height) of the cell in the block's global px."""
    cell_he_px: tuple[int, int, int, int]
    """(x0, y0, width, height) of the cell in the block's H&E px."""
    transcripts_per_copy: int
    n_transcripts: int
    seconds: float
    """Wall time of the writing run (the block's included when written then)."""

    @property
    def xenium_dir(self) -> Path:
        return self.root / "xenium"

    @property
    def he_path(self) -> Path:
        return self.root / "he_image.ome.tif"

    @property
    def alignment_csv(self) -> Path:
        return self.root / "he_imagealignment.csv"

    @property
    def pitch_um(self) -> tuple[float, float]:
        """(x, y) shift from one copy to the next, um."""
        return (self.cell_global_px[2] * XENIUM_PIXEL_SIZE_UM, self.cell_global_px[3] * XENIUM_PIXEL_SIZE_UM)

    @property
    def size_um(self) -> tuple[float, float]:
        """(width, height) of the section, um."""
        return (self.grid[0] * self.pitch_um[0], self.grid[1] * self.pitch_um[1])

    def copy_offset_um(self, column: int, row: int) -> tuple[float, float]:
        """(dx, dy) um from the block's transcripts to those of one copy.

        Parameters
        ----------
        column, row
            The copy's place on the grid (0, 0: the first copy, top left).

        Returns
        -------
        tuple of float
            The shift in x and y, um.
        """
        return _copy_offset_um(self.cell_global_px, column, row)

    @classmethod
    def at(cls, root: str | os.PathLike) -> ScaleSample:
        """The scale sample folder ``root``, read back from its record.

        Parameters
        ----------
        root
            A folder written by :func:`write_scale_sample`.

        Returns
        -------
        ScaleSample
            Its paths, grid, cell and counts; an InputError when ``root`` has no readable record.
        """
        root = Path(root)
        try:
            record = json.loads((root / SCALE_RECORD).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(
                f"{root} is not a scale sample: its {SCALE_RECORD} is missing or unreadable ({exc})"
            ) from exc
        block = Path(record["block_root"])
        return cls(
            root=root,
            block_root=block if block.is_absolute() else root / block,
            grid=tuple(record["grid"]),
            cell_global_px=tuple(record["cell_global_px"]),
            cell_he_px=tuple(record["cell_he_px"]),
            transcripts_per_copy=record["transcripts_per_copy"],
            n_transcripts=record["n_transcripts"],
            seconds=record["seconds"],
        )


def _copy_offset_um(cell_global_px: tuple[int, int, int, int], column: int, row: int) -> tuple[float, float]:
    x0, y0, width, height = cell_global_px
    return ((column * width - x0) * XENIUM_PIXEL_SIZE_UM, (row * height - y0) * XENIUM_PIXEL_SIZE_UM)


@dataclass(frozen=True)
class _Cell:
    """The cell cut from the block: where it is in both images."""

    global_px: tuple[int, int, int, int]
    he_px: tuple[int, int, int, int]
    he_scale: float
    """Global px per H&E px (9/7)."""


def write_scale_sample(
    out_dir: str | os.PathLike,
    *,
    n_transcripts: float | None = None,
    grid: tuple[int, int] | None = None,
    size_mm: tuple[float, float] | None = None,
    block_dir: str | os.PathLike | None = None,
    block_size_mm: tuple[float, float] = (2.0, 2.0),
    seed: int = 0,
    n_core_genes: int = 380,
    n_addon_genes: int = 100,
    dapi_compression: str = "jpeg2000",
    progress=None,
) -> ScaleSample:
    """Write a slide-scale sample into the new (or empty) folder ``out_dir``, atomically: one block
    repeated on a grid (see the module docstring). Give exactly one of ``n_transcripts``, ``grid``
    and ``size_mm``.

    Parameters
    ----------
    out_dir
        The sample folder to create; its parent must exist.
    n_transcripts
        At least this many transcripts: the fewest copies that give them, on a near-square grid.
    grid
        (columns, rows) of copies.
    size_mm
        Section (width, height) in mm: the grid whose size is nearest.
    block_dir
        An existing block sample (read only), written by ``write_synthetic_sample(...,
        deformation=False, axis_aligned=True, he_pixel_size_um=SCALE_HE_PIXEL_SIZE_UM)``; when
        None a block of ``block_size_mm`` is written into ``out_dir / "block"``.
    block_size_mm
        The (width, height) in mm of the block written when ``block_dir`` is None.
    seed, n_core_genes, n_addon_genes
        Of the block written when ``block_dir`` is None.
    dapi_compression
        ``"jpeg2000"`` (lossless, as Xenium ships it) or ``"deflate"`` (larger, fast to read); see
        :data:`DAPI_COMPRESSIONS`.
    progress
        ``progress(message)``, called between stages when given.

    Returns
    -------
    ScaleSample
        Its paths, grid, cell and counts.

    Raises
    ------
    InputError
        A non-empty ``out_dir``, a block that cannot be repeated, or a grid asked for twice or not at all.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    if sum(v is not None for v in (n_transcripts, grid, size_mm)) != 1:
        raise InputError("give exactly one of n_transcripts, grid and size_mm for a scale sample")
    if dapi_compression not in DAPI_COMPRESSIONS:
        raise InputError(
            f"dapi_compression {dapi_compression!r} is unknown: give one of {', '.join(DAPI_COMPRESSIONS)}"
        )
    check_out_dir(out_dir)
    say = progress or (lambda message: None)
    with atomic_output(out_dir, SAMPLE_FOLDER, overwrite=True) as tmp:
        tmp.mkdir()
        if block_dir is None:
            block = write_synthetic_sample(
                tmp / "block", size_mm=block_size_mm, seed=seed, n_core_genes=n_core_genes,
                n_addon_genes=n_addon_genes, he_pixel_size_um=SCALE_HE_PIXEL_SIZE_UM, deformation=False,
                axis_aligned=True,
            )
            say(f"block of {block_size_mm[0]:g} x {block_size_mm[1]:g} mm written in {block.summary.seconds:.1f} s")
        else:
            block = SyntheticSample.at(Path(block_dir).absolute())
        cell = _cut_cell(block)
        base, n_block_cells = _cell_transcripts(block, cell)
        if len(base) == 0:
            raise InputError(f"the block {block.root} has no transcripts in its cell: use a larger block")
        columns_rows = _grid(cell, len(base), n_transcripts, grid, size_mm)
        _check_levels(cell, columns_rows)
        say(f"{columns_rows[0]} x {columns_rows[1]} copies of a {cell.global_px[2] * XENIUM_PIXEL_SIZE_UM:.1f} x "
            f"{cell.global_px[3] * XENIUM_PIXEL_SIZE_UM:.1f} um cell with {len(base):,} transcripts")
        xenium = tmp / "xenium"
        (xenium / "morphology_focus").mkdir(parents=True)
        with ThreadPoolExecutor(max_workers=1) as image_thread:  # images' bytes go out while transcripts encode
            images = image_thread.submit(_write_images, block, cell, columns_rows, tmp,
                                         DAPI_COMPRESSIONS[dapi_compression])
            total = _write_transcripts(xenium, block, base, n_block_cells, cell, columns_rows, say)
            images.result()
        say("images written")
        write_alignment_csv(tmp / "he_imagealignment.csv", np.diag([cell.he_scale, cell.he_scale, 1.0]))
        shutil.copyfile(block.panel_json, tmp / "panel.json")
        shutil.copyfile(block.xenium_dir / "gene_panel.json", xenium / "gene_panel.json")
        record = {
            "generator": GENERATOR,
            "block_root": "block" if block_dir is None else str(block.root),
            "grid": list(columns_rows),
            "cell_global_px": list(cell.global_px),
            "cell_he_px": list(cell.he_px),
            "transcripts_per_copy": len(base),
            "n_transcripts": total,
            "seconds": time.perf_counter() - t_start,
            "cells": False,
        }
        (tmp / SCALE_RECORD).write_text(json.dumps(record, indent=1))
        _write_experiment(xenium, block, columns_rows, cell, total)  # last: the bundle's mark of completeness
    return ScaleSample.at(out_dir)


def _cut_cell(block: SyntheticSample) -> _Cell:
    """The largest cell inside the block's section, starting where its H&E and global px edges meet."""
    truth = load_ground_truth(block.root)
    a = truth.transform.affine
    scale = _STEP_GLOBAL_PX / _STEP_HE_PX
    if (len(truth.transform.warp) or a[0, 1] != 0 or a[1, 0] != 0 or not np.isclose(a[0, 0], scale, rtol=1e-12)
            or a[1, 1] != a[0, 0] or not np.allclose(a[:2, 2], np.round(a[:2, 2]), atol=1e-6)):
        raise InputError(
            f"the block {block.root} cannot be repeated: its H&E must be placed by the scale 9/7 and a whole-pixel "
            "shift, without warp. Write it with write_synthetic_sample(..., deformation=False, axis_aligned=True, "
            f"he_pixel_size_um={SCALE_HE_PIXEL_SIZE_UM!r}) (morphomol synth --scale-... writes one)"
        )
    unit_px = _CELL_UNIT_STEPS * _STEP_GLOBAL_PX
    starts, sizes = [], []
    for axis, extent_px in enumerate((truth.morphology_shape[1], truth.morphology_shape[0])):
        shift_px = int(np.round(a[axis, 2]))
        steps = -(shift_px // _STEP_GLOBAL_PX)  # the first H&E px step that maps to global px >= 0
        start_px = steps * _STEP_GLOBAL_PX + shift_px
        units = (extent_px - start_px) // unit_px
        if units < 1:
            raise InputError(
                f"the block {block.root} is smaller than one cell ({unit_px * XENIUM_PIXEL_SIZE_UM:.1f} um plus "
                "the H&E margin): use a block of at least 0.3 x 0.3 mm"
            )
        starts.append((start_px, steps * _STEP_HE_PX))
        sizes.append(units * _CELL_UNIT_STEPS)
    (gx, hx), (gy, hy) = starts
    return _Cell(
        global_px=(gx, gy, sizes[0] * _STEP_GLOBAL_PX, sizes[1] * _STEP_GLOBAL_PX),
        he_px=(hx, hy, sizes[0] * _STEP_HE_PX, sizes[1] * _STEP_HE_PX),
        he_scale=float(a[0, 0]),
    )


def _cell_transcripts(block: SyntheticSample, cell: _Cell) -> tuple[BlockTranscripts, int]:
    """The block's transcripts inside the cell (um, the block's frame; cell = the block's cell row or -1)
    and the block's number of cells."""
    table = pq.read_table(block.xenium_dir / "transcripts.parquet", columns=_TRANSCRIPT_COLUMNS,
                          read_dictionary=["cell_id"])
    n_cells = json.loads((block.xenium_dir / EXPERIMENT_FILE).read_text())["num_cells"]
    rows = pd.Index(cell_id_strings(n_cells))
    cell_row = np.concatenate([
        rows.get_indexer(chunk.dictionary.to_numpy(zero_copy_only=False))[chunk.indices.to_numpy()]
        for chunk in table.column("cell_id").chunks
    ]) if table.num_rows else np.zeros(0, np.int64)
    x_um, y_um = (table.column(name).to_numpy() for name in ("x_location", "y_location"))
    x0, y0, width, height = cell.global_px
    x_px, y_px = x_um.astype(np.float64) / XENIUM_PIXEL_SIZE_UM, y_um.astype(np.float64) / XENIUM_PIXEL_SIZE_UM
    inside = (x_px >= x0) & (x_px < x0 + width) & (y_px >= y0) & (y_px < y0 + height)
    return BlockTranscripts(
        x_um=x_um[inside], y_um=y_um[inside], z_um=table.column("z_location").to_numpy()[inside],
        feature=table.column("codeword_index").to_numpy()[inside], cell=cell_row[inside],
        overlaps_nucleus=table.column("overlaps_nucleus").to_numpy()[inside],
        nucleus_distance_um=table.column("nucleus_distance").to_numpy()[inside],
        qv=table.column("qv").to_numpy()[inside],
    ), n_cells


def _grid(cell: _Cell, per_copy: int, n_transcripts, grid, size_mm) -> tuple[int, int]:
    if grid is not None:
        columns, rows = (int(g) for g in grid)
    elif n_transcripts is not None:
        if not n_transcripts > 0:
            raise InputError(f"n_transcripts={n_transcripts} must be positive")
        copies = math.ceil(n_transcripts / per_copy)
        columns = math.ceil(math.sqrt(copies))
        rows = math.ceil(copies / columns)
    else:
        pitch_um = np.array(cell.global_px[2:]) * XENIUM_PIXEL_SIZE_UM
        columns, rows = (max(1, round(s * 1000 / p)) for s, p in zip(size_mm, pitch_um))
    if columns < 1 or rows < 1:
        raise InputError(f"a grid of {columns} x {rows} copies is empty: give at least 1 x 1")
    return columns, rows


def _check_levels(cell: _Cell, columns_rows: tuple[int, int]) -> None:
    """The images' pyramids must repeat a whole halved cell at every level (writers.write_repeated_ome_tiff)."""
    for what, (_, _, width, height) in (("DAPI", cell.global_px), ("H&E", cell.he_px)):
        side = max(width * columns_rows[0], height * columns_rows[1])
        step = repeat_step_px((height, width), (columns_rows[1], columns_rows[0]))
        if width % step or height % step:
            raise InputError(
                f"a {columns_rows[0]} x {columns_rows[1]} grid makes a {side} px {what} image, too large for a cell of "
                f"{width} x {height} px: give fewer copies or a larger block"
            )


def _write_images(block: SyntheticSample, cell: _Cell, columns_rows: tuple[int, int], tmp: Path,
                  dapi_compression: tuple[str, int]) -> None:
    repeats = (columns_rows[1], columns_rows[0])
    x0, y0, width, height = cell.global_px
    dapi = tifffile.imread(block.xenium_dir / MORPHOLOGY_FOCUS)[y0 : y0 + height, x0 : x0 + width]
    write_repeated_ome_tiff(tmp / "xenium" / MORPHOLOGY_FOCUS, dapi, repeats, XENIUM_PIXEL_SIZE_UM, "DAPI",
                            dapi_compression)
    del dapi
    x0, y0, width, height = cell.he_px
    he = tifffile.imread(block.he_path)[y0 : y0 + height, x0 : x0 + width]
    write_repeated_ome_tiff(tmp / "he_image.ome.tif", he, repeats, SCALE_HE_PIXEL_SIZE_UM, "RGB", JPEG)


def _write_transcripts(xenium: Path, block: SyntheticSample, base: BlockTranscripts, n_block_cells: int,
                       cell: _Cell, columns_rows: tuple[int, int], say) -> int:
    """transcripts.parquet: the copies row by row, each copy's ids after the previous copy's."""
    columns, rows = columns_rows
    panel_lists = json.loads(block.panel_json.read_text())
    panel = make_panel(len(panel_lists["core"]), len(panel_lists["addon"]))
    width, height = cell.global_px[2:]
    size_um = (columns * width * XENIUM_PIXEL_SIZE_UM, rows * height * XENIUM_PIXEL_SIZE_UM)
    table_columns = TranscriptColumns.of(panel, size_um)
    cell_ids = cell_id_strings(n_block_cells * columns * rows)
    cell_rows = np.arange(n_block_cells)
    x_um, y_um = base.x_um.astype(np.float64), base.y_um.astype(np.float64)
    writer = transcripts_writer(xenium / "transcripts.parquet")

    def tables():
        for copy in range(columns * rows):
            row, column = divmod(copy, columns)
            dx, dy = _copy_offset_um(cell.global_px, column, row)
            t = BlockTranscripts(
                x_um=(x_um + dx).astype(np.float32), y_um=(y_um + dy).astype(np.float32), z_um=base.z_um,
                feature=base.feature, cell=base.cell, overlaps_nucleus=base.overlaps_nucleus,
                nucleus_distance_um=base.nucleus_distance_um, qv=base.qv,
            )
            ids = cell_ids[copy * n_block_cells : (copy + 1) * n_block_cells]
            yield (table_columns.table(t, cell_rows, ids, copy * len(base)),)
            if (copy + 1) % max(1, columns * rows // 10) == 0:
                say(f"transcripts: {copy + 1} of {columns * rows} copies")

    # parquet encoding overlaps with making the next copy's table
    write_in_background(tables(), lambda table: writer.write_table(table, row_group_size=TRANSCRIPT_ROW_GROUP_ROWS),
                        writer.close)
    return columns * rows * len(base)


def _write_experiment(xenium: Path, block: SyntheticSample, columns_rows: tuple[int, int], cell: _Cell,
                      n_transcripts: int) -> None:
    """The block's experiment.xenium with the sample's counts (no cells)."""
    experiment = json.loads((block.xenium_dir / EXPERIMENT_FILE).read_text())
    area_mm2 = (columns_rows[0] * cell.global_px[2] * columns_rows[1] * cell.global_px[3]
                * XENIUM_PIXEL_SIZE_UM**2 / 1e6)
    experiment.update({
        "run_name": f"{experiment['run_name']}_scale_{columns_rows[0]}x{columns_rows[1]}",
        "num_cells": 0,
        "transcripts_per_cell": 0,
        "transcripts_per_100um": float(n_transcripts / (area_mm2 * 1e4)),
        "num_transcripts": int(n_transcripts),
    })
    (xenium / EXPERIMENT_FILE).write_text(json.dumps(experiment, indent=2))
