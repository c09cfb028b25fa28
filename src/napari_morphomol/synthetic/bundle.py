"""The Xenium bundle of a synthetic sample: its tables and its metadata (images: :mod:`.images`).

A bundle in the XOA 3.x layout that ``spatialdata_io.xenium`` reads unchanged:
``transcripts.parquet`` (one row group per 512 um block), ``cells.parquet``, the territory and
nucleus boundary polygons, ``cell_feature_matrix.h5`` (10x v3) and ``experiment.xenium`` +
``gene_panel.json``.

Invariants: cells appear in one order everywhere (cells.parquet, the matrix barcodes, both
boundary tables, the masks' labels = row + 1, ground_truth_cells.parquet); a transcript carries
its cell's id when it lies in that cell's territory, else ``UNASSIGNED``; the matrix counts a
cell's assigned transcripts with qv >= 20 (gene and control features alike). Blocks are sampled
and written in order, memory staying at one block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from napari_morphomol.synthetic.expression import BlockTranscripts, ProgramPanel, sample_block
from napari_morphomol.synthetic.plan import SamplePlan
from napari_morphomol.synthetic.tissue import BLOCK_NODES, NODE_REACH, NODE_UM, Cells, TissueFields, block_grid
from napari_morphomol.synthetic.truth import GENERATOR
from napari_morphomol.synthetic.writers import TenXMatrixWriter, write_in_background

XENIUM_SOFTWARE_VERSION = "xenium-3.0.0.15"
EXPERIMENT_FILE = "experiment.xenium"
MORPHOLOGY_FOCUS = "morphology_focus/morphology_focus_0000.ome.tif"
_FOV_UM = 256.0
_POLYGON_VERTICES = 16
_TRANSCRIPT_ID_OFFSET = np.uint64(281474976710656)
_CONTROL_KIND = {"negative_control_probe": 1, "negative_control_codeword": 2, "unassigned_codeword": 3}
"""Feature category -> column of cells.parquet counting it (0: transcript_counts, the genes)."""

_TRANSCRIPT_SCHEMA = pa.schema(
    [
        ("transcript_id", pa.uint64()),
        ("cell_id", pa.dictionary(pa.int32(), pa.string())),
        ("overlaps_nucleus", pa.uint8()),
        ("feature_name", pa.dictionary(pa.int32(), pa.string())),
        ("x_location", pa.float32()),
        ("y_location", pa.float32()),
        ("z_location", pa.float32()),
        ("qv", pa.float32()),
        ("fov_name", pa.dictionary(pa.int32(), pa.string())),
        ("nucleus_distance", pa.float32()),
        ("codeword_index", pa.int32()),
        ("codeword_category", pa.dictionary(pa.int32(), pa.string())),
        ("is_gene", pa.bool_()),
    ]
)


def cell_id_strings(n: int) -> np.ndarray:
    """Xenium cell ids of cells 1..n: the 8 hex digits of the number spelled a-p, then ``-1``."""
    prefix = np.arange(1, n + 1, dtype=np.uint32)
    shifts = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint32)
    chars = (((prefix[:, None] >> shifts) & 0xF) + ord("a")).astype(np.uint8)
    return np.char.add(chars.view("S8").ravel().astype("U8"), "-1")


def write_cell_tables(xenium: Path, plan: SamplePlan, panel: ProgramPanel, cells: Cells, cell_ids: np.ndarray,
                      fields: TissueFields) -> tuple[int, np.ndarray]:
    """transcripts.parquet, cells.parquet, both boundary tables and the cell-feature matrix, block by block.

    Returns the number of transcripts and the (n_cells, 8) cell summary that cells.zarr.zip holds.
    """
    columns = TranscriptColumns.of(panel, plan.size_um)
    feature_kind = np.array([_CONTROL_KIND.get(c, 0) for c in panel.categories])
    sink = _TableSink(xenium, panel, len(cells))
    cell_summary = np.zeros((len(cells), 8))
    next_id = 0

    def tables():
        nonlocal next_id
        for rows, box_um, rng in _blocks(plan, cells):
            t = sample_block(rng, panel, cells, rows, fields.region, box_um)
            table = columns.table(t, rows, cell_ids, next_id)
            next_id += len(t)
            cell_tables = None
            if len(rows):
                counts = _cell_counts(t, rows, len(panel.names))
                cell_tables = _cell_tables(cells, rows, cell_ids, counts, feature_kind, cell_summary)
            yield table, cell_tables

    # parquet/HDF5 encoding overlaps with sampling the next block
    write_in_background(tables(), sink.write, lambda: sink.close(cell_ids))
    return next_id, cell_summary


def _blocks(plan: SamplePlan, cells: Cells) -> Iterator[tuple[np.ndarray, tuple[float, ...], np.random.Generator]]:
    """Rows of its cells, box (x0, y0, x1, y1) in um and random stream of each block, in block order."""
    _, _, bx, by = block_grid(plan.size_um)
    block_um = BLOCK_NODES * NODE_UM
    width_um, height_um = plan.size_um
    for block in range(bx * by):
        block_y, block_x = divmod(block, bx)
        rows = np.arange(cells.block_starts[block], cells.block_starts[block + 1])
        box_um = (
            block_x * block_um, block_y * block_um,
            min((block_x + 1) * block_um, width_um), min((block_y + 1) * block_um, height_um),
        )
        yield rows, box_um, plan.rng(5, block_y, block_x)


def _cell_counts(t: BlockTranscripts, rows: np.ndarray, n_features: int) -> np.ndarray:
    """(len(rows), n_features) counts of the transcripts assigned to the block's cells with qv >= 20."""
    good = (t.cell >= 0) & (t.qv >= 20)
    return np.bincount(
        (t.cell[good] - rows[0]).astype(np.int64) * n_features + t.feature[good],
        minlength=len(rows) * n_features,
    ).reshape(len(rows), n_features)


@dataclass(frozen=True)
class TranscriptColumns:
    """The dictionaries and per-feature codes shared by every block of transcripts.parquet (and
    every copy of a scale sample, :mod:`.scale`)."""

    features: pa.Array
    categories: pa.Array
    feature_category: np.ndarray
    fovs: pa.Array
    n_fov_x: int
    n_fov_y: int
    n_genes: int

    @classmethod
    def of(cls, panel: ProgramPanel, size_um: tuple[float, float]) -> TranscriptColumns:
        n_fov_x = int(np.ceil(size_um[0] / _FOV_UM))
        n_fov_y = int(np.ceil(size_um[1] / _FOV_UM))
        category_names = sorted(set(panel.categories))
        return cls(
            features=pa.array(panel.names),
            categories=pa.array(category_names),
            feature_category=np.array([category_names.index(c) for c in panel.categories], dtype=np.int32),
            fovs=pa.array(_fov_names(n_fov_y, n_fov_x)),
            n_fov_x=n_fov_x,
            n_fov_y=n_fov_y,
            n_genes=panel.n_genes,
        )

    def table(self, t: BlockTranscripts, rows: np.ndarray, cell_ids: np.ndarray, first_id: int) -> pa.Table:
        """The block's rows of transcripts.parquet; transcript ids count on from ``first_id``."""
        local = np.where(t.cell >= 0, t.cell - (rows[0] if len(rows) else 0) + 1, 0).astype(np.int32)
        fov = (
            np.clip((t.y_um // _FOV_UM).astype(np.int32), 0, self.n_fov_y - 1) * self.n_fov_x
            + np.clip((t.x_um // _FOV_UM).astype(np.int32), 0, self.n_fov_x - 1)
        ).astype(np.int32)
        block_cell_ids = pa.array(np.concatenate([["UNASSIGNED"], cell_ids[rows]]))
        return pa.table(
            {
                "transcript_id": np.arange(first_id, first_id + len(t), dtype=np.uint64) + _TRANSCRIPT_ID_OFFSET,
                "cell_id": pa.DictionaryArray.from_arrays(pa.array(local), block_cell_ids),
                "overlaps_nucleus": t.overlaps_nucleus,
                "feature_name": pa.DictionaryArray.from_arrays(pa.array(t.feature), self.features),
                "x_location": t.x_um,
                "y_location": t.y_um,
                "z_location": t.z_um,
                "qv": t.qv,
                "fov_name": pa.DictionaryArray.from_arrays(pa.array(fov), self.fovs),
                "nucleus_distance": t.nucleus_distance_um,
                "codeword_index": t.feature,
                "codeword_category": pa.DictionaryArray.from_arrays(
                    pa.array(self.feature_category[t.feature]), self.categories
                ),
                "is_gene": t.feature < self.n_genes,
            },
            schema=_TRANSCRIPT_SCHEMA,
        )


def _fov_names(n_rows: int, n_cols: int) -> list[str]:
    def letters(i: int) -> str:
        s = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        return s

    return [f"{letters(r)}{c + 1}" for r in range(n_rows) for c in range(n_cols)]


def _cell_tables(
    cells: Cells, rows: np.ndarray, cell_ids: np.ndarray, counts: np.ndarray, feature_kind: np.ndarray,
    cell_summary: np.ndarray,
):
    """cells.parquet rows, both boundary tables and the counts of a block's cells; fills cell_summary."""
    territory = _territory_polygons(cells, rows)
    area, centroid_x, centroid_y = _polygon_area_centroid(territory)
    nucleus = _ellipse_polygons(cells, rows)
    nucleus_area = np.pi * cells.nucleus_a_um[rows].astype(np.float64) * cells.nucleus_b_um[rows]
    kind_counts = [counts[:, feature_kind == k].sum(axis=1).astype(np.uint32) for k in range(4)]
    n = len(rows)
    cell_table = pa.table(
        {
            "cell_id": pa.array(cell_ids[rows]),
            "x_centroid": centroid_x,
            "y_centroid": centroid_y,
            "transcript_counts": kind_counts[0],
            "control_probe_counts": kind_counts[1],
            "genomic_control_counts": np.zeros(n, np.uint32),
            "control_codeword_counts": kind_counts[2],
            "unassigned_codeword_counts": kind_counts[3],
            "deprecated_codeword_counts": np.zeros(n, np.uint32),
            "total_counts": counts.sum(axis=1).astype(np.uint32),
            "cell_area": area,
            "nucleus_area": nucleus_area,
            "nucleus_count": np.ones(n, np.uint32),
            "segmentation_method": pa.array(["Segmented by nucleus expansion of 5.0um"] * n),
        }
    )
    cell_summary[rows] = np.column_stack(
        [centroid_x, centroid_y, area, cells.x_um[rows], cells.y_um[rows], nucleus_area, np.zeros(n), np.ones(n)]
    )
    labels = rows + 1
    return (
        cell_table,
        _boundary_table(territory, cell_ids[rows], labels),
        _boundary_table(nucleus, cell_ids[rows], labels),
        counts,
    )


def _territory_polygons(cells: Cells, rows: np.ndarray) -> np.ndarray:
    """Vertices (len(rows), V, 2) of each cell's territory: its disk cut by the Voronoi
    bisectors of the neighbouring cells, sampled along V rays from the centre."""
    ny, nx = cells.node_index.shape
    angles = np.linspace(0, 2 * np.pi, _POLYGON_VERTICES, endpoint=False)
    ux, uy = np.cos(angles), np.sin(angles)
    cx = cells.x_um[rows][:, None]
    cy = cells.y_um[rows][:, None]
    reach = np.repeat(cells.cell_radius_um[rows].astype(np.float64)[:, None], _POLYGON_VERTICES, axis=1)
    for oy in range(-NODE_REACH, NODE_REACH + 1):
        for ox in range(-NODE_REACH, NODE_REACH + 1):
            if ox == 0 and oy == 0:
                continue
            ky = np.clip(cells.node_y[rows] + oy, 0, ny - 1)
            kx = np.clip(cells.node_x[rows] + ox, 0, nx - 1)
            other = cells.node_index[ky, kx]
            valid = (other >= 0) & (other != rows)
            o = np.maximum(other, 0)
            dx = (cells.x_um[o] - cells.x_um[rows])[:, None]
            dy = (cells.y_um[o] - cells.y_um[rows])[:, None]
            along = dx * ux[None, :] + dy * uy[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (dx**2 + dy**2) / (2 * along)
            t = np.where(valid[:, None] & (along > 0), t, np.inf)
            reach = np.minimum(reach, t)
    vx = cx + reach * ux[None, :]
    vy = cy + reach * uy[None, :]
    return np.stack([vx, vy], axis=-1)


def _polygon_area_centroid(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = vertices[..., 0], vertices[..., 1]
    x1, y1 = np.roll(x, -1, axis=1), np.roll(y, -1, axis=1)
    cross = x * y1 - x1 * y
    area = cross.sum(axis=1) / 2
    cx = ((x + x1) * cross).sum(axis=1) / (6 * area)
    cy = ((y + y1) * cross).sum(axis=1) / (6 * area)
    return np.abs(area), cx, cy


def _ellipse_polygons(cells: Cells, rows: np.ndarray) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, _POLYGON_VERTICES, endpoint=False)
    a = cells.nucleus_a_um[rows][:, None].astype(np.float64)
    b = cells.nucleus_b_um[rows][:, None].astype(np.float64)
    ang = cells.nucleus_angle[rows][:, None].astype(np.float64)
    ex, ey = a * np.cos(t), b * np.sin(t)
    vx = cells.x_um[rows][:, None] + ex * np.cos(ang) - ey * np.sin(ang)
    vy = cells.y_um[rows][:, None] + ex * np.sin(ang) + ey * np.cos(ang)
    return np.stack([vx, vy], axis=-1)


def _boundary_table(vertices: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> pa.Table:
    closed = np.concatenate([vertices, vertices[:, :1]], axis=1)
    n_v = closed.shape[1]
    return pa.table(
        {
            "cell_id": pa.array(np.repeat(ids, n_v)),
            "vertex_x": closed[..., 0].ravel().astype(np.float32),
            "vertex_y": closed[..., 1].ravel().astype(np.float32),
            "label_id": np.repeat(labels.astype(np.uint32), n_v),
        }
    )


TRANSCRIPT_ROW_GROUP_ROWS = 1 << 20
"""Rows per row group of transcripts.parquet (at most; a block smaller than this is one group)."""


def transcripts_writer(path: Path) -> pq.ParquetWriter:
    """The writer of transcripts.parquet: its schema, codec and dictionary columns.

    Parameters
    ----------
    path
        The file to write (a temporary name inside the sample being written).

    Returns
    -------
    pyarrow.parquet.ParquetWriter
        Open; the caller writes its tables (:class:`TranscriptColumns`) and closes it.
    """
    return pq.ParquetWriter(
        path,
        _TRANSCRIPT_SCHEMA,
        compression="zstd",
        compression_level=1,
        use_dictionary=["cell_id", "feature_name", "fov_name", "codeword_category"],
        store_schema=False,
    )


class _TableSink:
    """The block-by-block files of the bundle; written from one thread, in block order."""

    def __init__(self, xenium: Path, panel: ProgramPanel, n_cells: int):
        self._xenium = xenium
        self._matrix = TenXMatrixWriter(xenium / "cell_feature_matrix.h5", panel.names, panel.feature_types, n_cells)
        self._transcripts = transcripts_writer(xenium / "transcripts.parquet")
        self._cell_writers: list[pq.ParquetWriter] = []

    def write(self, transcripts: pa.Table, cell_tables) -> None:
        self._transcripts.write_table(transcripts, row_group_size=TRANSCRIPT_ROW_GROUP_ROWS)
        if cell_tables is None:
            return
        *tables, counts = cell_tables
        self._matrix.append(counts)
        if not self._cell_writers:
            names = ("cells.parquet", "cell_boundaries.parquet", "nucleus_boundaries.parquet")
            self._cell_writers = [
                pq.ParquetWriter(self._xenium / name, t.schema, compression="zstd") for name, t in zip(names, tables)
            ]
        for writer, table in zip(self._cell_writers, tables):
            writer.write_table(table)

    def close(self, cell_ids: np.ndarray) -> None:
        self._transcripts.close()
        for writer in self._cell_writers:
            writer.close()
        self._matrix.close(cell_ids)


def write_bundle_metadata(xenium: Path, plan: SamplePlan, panel: ProgramPanel, n_cells: int,
                          n_transcripts: int) -> None:
    """experiment.xenium and gene_panel.json: written last, so a bundle with its marker file is complete."""
    experiment = _experiment(plan, panel, n_cells, n_transcripts)
    (xenium / EXPERIMENT_FILE).write_text(json.dumps(experiment, indent=2))
    targets = [
        {
            "type": {"data": {"id": name, "name": name}, "descriptor": "gene" if i < panel.n_genes else "control"},
            "codewords": [i],
            "source": {"category": panel.categories[i]},
        }
        for i, name in enumerate(panel.names)
    ]
    document = {"metadata": {"generator": GENERATOR}, "payload": {"name": experiment["panel_name"], "targets": targets}}
    (xenium / "gene_panel.json").write_text(json.dumps(document, indent=1))


def _experiment(plan: SamplePlan, panel: ProgramPanel, n_cells: int, n_transcripts: int) -> dict:
    seed = plan.seed
    area_mm2 = plan.size_um[0] * plan.size_um[1] / 1e6
    return {
        "major_version": 5,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": f"synthetic_seed{seed}",
        "run_start_time": "2026-01-01T00:00:00Z",
        "region_name": "synthetic_region",
        "preservation_method": "ffpe",
        "num_cells": n_cells,
        "transcripts_per_cell": int(n_transcripts / max(n_cells, 1)),
        "transcripts_per_100um": float(n_transcripts / (area_mm2 * 1e4)),  # per 100 um^2
        "cassette_name": "synthetic",
        "slide_id": f"SYN{seed:07d}",
        "panel_design_id": "synthetic",
        "panel_name": f"Synthetic core {panel.n_core} + add-on {panel.n_addon}",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": panel.n_core,
        "panel_num_targets_custom": panel.n_addon,
        "pixel_size": plan.xenium_pixel_size_um,
        "instrument_sw_version": "3.0.1.1",
        "analysis_sw_version": XENIUM_SOFTWARE_VERSION,
        "experiment_uuid": f"00000000-0000-0000-0000-{seed:012d}",
        "z_step_size": 3.0,
        "num_transcripts": int(n_transcripts),
        "images": {"morphology_focus_filepath": MORPHOLOGY_FOCUS},
        "synthetic": True,
    }
