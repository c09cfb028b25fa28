"""The images of a synthetic sample, streamed strip by strip: the bundle's DAPI morphology image
with its label masks (``cells.zarr.zip``), and the H&E beside the bundle.

Each 512-row strip is rendered in chunks of _CHUNK_COLS columns, a few at a time on threads (the
compiled kernels and scipy's filters release the GIL); every chunk has its own random stream
(``plan.rng(6 or 7, row0, col0)``), so the images do not depend on the thread count. The masks
are written into the zip as their strips pass: label = cell row + 1 (0 for none), masks/0 the
nuclei and masks/1 the cells, as in a Xenium bundle.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from napari_morphomol.synthetic.plan import SamplePlan
from napari_morphomol.synthetic.render import render_he_chunk, render_morphology_chunk
from napari_morphomol.synthetic.tissue import Cells, TissueFields
from napari_morphomol.synthetic.writers import JPEG, write_pyramidal_ome_tiff

_CHUNK_COLS = 2048
_RENDER_THREADS = 2
"""Image chunks rendered at once."""
_CELL_SUMMARY_COLUMNS = [
    "cell_centroid_x",
    "cell_centroid_y",
    "cell_area",
    "nucleus_centroid_x",
    "nucleus_centroid_y",
    "nucleus_area",
    "z_level",
    "nucleus_count",
]


def write_morphology(morphology_tiff: Path, cells_zip: Path, plan: SamplePlan, cells: Cells, fields: TissueFields,
                     cell_summary: np.ndarray, scratch_dir: Path) -> None:
    """The DAPI morphology image (uint16 pyramidal OME-TIFF) and cells.zarr.zip (cell ids and
    summary, polygon sets, both label masks)."""
    morph_h, morph_w = plan.morphology_shape
    px = plan.xenium_pixel_size_um
    store = zarr.storage.ZipStore(cells_zip, mode="w")
    try:
        masks = _cells_zarr(store, len(cells), cell_summary, plan.morphology_shape)

        def render(col0: int, row0: int, width: int, n_rows: int):
            return render_morphology_chunk(cells, fields, px, col0, row0, width, n_rows, plan.rng(6, row0, col0))

        def strip(row0: int, n_rows: int) -> np.ndarray:
            dapi, nucleus_labels, cell_labels = _render_strip(pool, render, row0, (
                np.empty((n_rows, morph_w), np.uint16), np.empty((n_rows, morph_w), np.uint32),
                np.empty((n_rows, morph_w), np.uint32)))
            masks[0][row0 : row0 + n_rows, :] = nucleus_labels
            masks[1][row0 : row0 + n_rows, :] = cell_labels
            return dapi

        with ThreadPoolExecutor(max_workers=_RENDER_THREADS) as pool:
            write_pyramidal_ome_tiff(
                morphology_tiff, strip, morph_h, morph_w, 1, np.dtype(np.uint16), px, "DAPI", scratch_dir
            )
    finally:
        store.close()


def _cells_zarr(store, n: int, cell_summary: np.ndarray, shape: tuple[int, int]) -> list:
    """Write cells.zarr.zip's cell ids, summary and polygon sets; return its two (empty) masks."""
    # every key is written once: a zip cannot overwrite a member
    root = zarr.create_group(
        store, zarr_format=2, attributes={"major_version": 6, "minor_version": 0, "number_cells": n}
    )
    prefix = np.arange(1, n + 1, dtype=np.uint32)
    root.create_array("cell_id", data=np.column_stack([prefix, np.ones(n, np.uint32)]))
    root.create_array("cell_summary", data=cell_summary, attributes={"column_names": _CELL_SUMMARY_COLUMNS})
    polygon_sets = root.create_group("polygon_sets")
    for k in (0, 1):
        polygon_sets.create_group(str(k)).create_array("cell_index", data=np.arange(n, dtype=np.uint32))
    chunk_w = min(4096, shape[1])
    mask_group = root.create_group("masks")
    return [
        mask_group.create_array(str(k), shape=shape, chunks=(512, chunk_w), dtype=np.uint32, fill_value=0)
        for k in (0, 1)
    ]


def write_he_image(path: Path, plan: SamplePlan, cells: Cells, fields: TissueFields, scratch_dir: Path) -> None:
    """The H&E (RGB uint8 pyramidal OME-TIFF, JPEG q90) on the H&E pixel grid of the true transform."""
    he_h, he_w = plan.he_shape

    def render(col0: int, row0: int, width: int, n_rows: int):
        return (render_he_chunk(cells, fields, plan.transform, plan.xenium_pixel_size_um, plan.he_pixel_size_um,
                                plan.stain, col0, row0, width, n_rows, plan.rng(7, row0, col0)),)

    def strip(row0: int, n_rows: int) -> np.ndarray:
        return _render_strip(pool, render, row0, (np.empty((n_rows, he_w, 3), np.uint8),))[0]

    with ThreadPoolExecutor(max_workers=_RENDER_THREADS) as pool:
        write_pyramidal_ome_tiff(
            path, strip, he_h, he_w, 3, np.dtype(np.uint8), plan.he_pixel_size_um, "RGB", scratch_dir, JPEG
        )


def _render_strip(pool: ThreadPoolExecutor, render: Callable[[int, int, int, int], tuple[np.ndarray, ...]],
                  row0: int, outputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Fill the full-width strip images ``outputs`` (rows first) chunk by chunk on ``pool``:
    ``render(col0, row0, width, n_rows)`` returns one chunk image per output."""
    n_rows, width = outputs[0].shape[:2]

    def chunk(col0: int) -> None:
        w = min(_CHUNK_COLS, width - col0)
        for out, image in zip(outputs, render(col0, row0, w, n_rows)):
            out[:, col0 : col0 + w] = image

    list(pool.map(chunk, range(0, width, _CHUNK_COLS)))
    return outputs
