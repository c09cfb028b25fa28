"""Synthetic H&E + Xenium samples with a known answer, for tests, demos and benchmarks.

``write_synthetic_sample`` writes a genuine Xenium bundle (spatialdata-io reads it unchanged),
an H&E pyramidal OME-TIFF placed by a known affine plus a smooth warp, Xenium's alignment CSV,
a Xenium Explorer keypoints CSV, and the ground truth (true transform, cell types, hidden and
morphology states). Add-on genes depend on cell type (seen by H&E and core genes), on hidden
states (seen only by core genes) and on morphology states (seen only by H&E), so neither
modality alone explains the add-on panel. Deterministic by seed; memory stays per block.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from napari_morphomol._atomic import guard_output_folder
from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM, as_points_xy
from napari_morphomol.errors import InputError
from napari_morphomol.io._synth_expression import LATENTS, GenePanel, make_panel, sample_block
from napari_morphomol.io._synth_render import random_stain, render_he_chunk, render_morphology_chunk
from napari_morphomol.io._synth_tissue import (
    BLOCK_NODES,
    CELL_TYPES,
    NODE_REACH,
    NODE_UM,
    REGIONS,
    Cells,
    block_grid,
    make_cells,
    make_fields,
)
from napari_morphomol.io._synth_transform import TrueTransform, random_transform
from napari_morphomol.io._synth_write import JPEG, TenXMatrixWriter, write_pyramidal_ome_tiff

GENERATOR_VERSION = 3
XENIUM_SOFTWARE_VERSION = "xenium-3.0.0.15"
_CHUNK_COLS = 2048
_RENDER_THREADS = 2
"""Image chunks rendered at once: the compiled kernels and scipy's filters release the GIL."""
_FOV_UM = 256.0
_POLYGON_VERTICES = 16
_HE_MARGIN_UM = 80.0


@dataclass(frozen=True)
class SampleSummary:
    n_cells: int
    n_transcripts: int
    morphology_shape: tuple[int, int]
    he_shape: tuple[int, int]
    seconds: float
    cpu_seconds: float
    """Process CPU time (all threads): less sensitive than wall time to other processes' load."""
    transcript_seconds: float
    transcript_cpu_seconds: float


@dataclass(frozen=True)
class SyntheticSample:
    root: Path
    xenium_dir: Path
    he_path: Path
    alignment_csv: Path
    keypoints_csv: Path
    panel_json: Path
    ground_truth_json: Path
    ground_truth_cells: Path
    summary: SampleSummary | None = None
    """Counts and timings of the run that wrote the sample (None for one found on disk)."""


@dataclass(frozen=True)
class GroundTruth:
    seed: int
    size_um: tuple[float, float]
    xenium_pixel_size_um: float
    he_pixel_size_um: float
    morphology_shape: tuple[int, int]
    """(height, width) in global px."""
    he_shape: tuple[int, int]
    """(height, width) in H&E px."""
    transform: TrueTransform
    core_genes: list[str]
    addon_genes: list[str]
    addon_programs: dict[str, str]
    raw: dict

    @property
    def he_to_global_affine(self) -> np.ndarray:
        return self.transform.affine


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    path = Path(path)
    if path.is_dir():
        path = path / "ground_truth.json"
    if not path.is_file():
        raise InputError(f"no ground truth at {path}: pass a sample folder written by `morphomol synth`")
    raw = json.loads(path.read_text())
    if raw.get("generator") != "napari-morphomol synthetic":
        raise InputError(f"{path} is not a synthetic ground truth: pass the ground_truth.json of a synthetic sample")
    warp = np.array(
        [
            [c["amp_x_px"], c["amp_y_px"], c["freq_u"], c["freq_v"], c["phase"]]
            for c in raw["deformation"]["components"]
        ],
        dtype=float,
    ).reshape(-1, 5)
    return GroundTruth(
        seed=raw["seed"],
        size_um=tuple(raw["size_um"]),
        xenium_pixel_size_um=raw["xenium_pixel_size_um"],
        he_pixel_size_um=raw["he_pixel_size_um"],
        morphology_shape=tuple(raw["morphology_shape"]),
        he_shape=tuple(raw["he_shape"]),
        transform=TrueTransform(affine=np.array(raw["he_to_global_affine"], dtype=float), warp=warp),
        core_genes=raw["panel"]["core"],
        addon_genes=raw["panel"]["addon"],
        addon_programs=raw["panel"]["addon_programs"],
        raw=raw,
    )


def true_he_to_global_px(points_he_px: np.ndarray, ground_truth: GroundTruth) -> np.ndarray:
    """Exact H&E px -> global px map of the sample (affine and warp), (N, 2) (x, y)."""
    return ground_truth.transform.he_to_global_px(as_points_xy(points_he_px))


def true_global_to_he_px(points_global_px: np.ndarray, ground_truth: GroundTruth) -> np.ndarray:
    """Inverse of :func:`true_he_to_global_px` (to 1e-6 px)."""
    return ground_truth.transform.global_to_he_px(as_points_xy(points_global_px))


def _cell_id_strings(n: int) -> np.ndarray:
    prefix = np.arange(1, n + 1, dtype=np.uint32)
    shifts = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint32)
    chars = (((prefix[:, None] >> shifts) & 0xF) + ord("a")).astype(np.uint8)
    return np.char.add(chars.view("S8").ravel().astype("U8"), "-1")


def _fov_names(n_rows: int, n_cols: int) -> list[str]:
    def letters(i: int) -> str:
        s = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        return s

    return [f"{letters(r)}{c + 1}" for r in range(n_rows) for c in range(n_cols)]


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


def _check_out_dir(out_dir: Path) -> None:
    guard_output_folder(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists and is not empty: pick a new folder for the synthetic sample")
    if not out_dir.parent.is_dir():
        raise InputError(f"{out_dir.parent} does not exist: create it or pick another place for the sample")


def write_synthetic_sample(
    out_dir: str | os.PathLike,
    *,
    size_mm: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    n_core_genes: int = 380,
    n_addon_genes: int = 100,
    he_pixel_size_um: float = 0.2737,
    deformation: bool = True,
    progress=None,
) -> SyntheticSample:
    """Write a synthetic sample into the new folder ``out_dir`` (atomically).

    ``progress(message)`` is called between stages when given. The returned sample's
    ``summary`` holds counts and timings.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    out_dir = Path(out_dir).absolute()
    size_mm = tuple(float(s) for s in size_mm)
    if len(size_mm) != 2 or min(size_mm) < 0.1 or max(size_mm) > 40:
        raise InputError(f"size_mm={size_mm} is out of range: give width and height between 0.1 and 40 mm")
    if not 0.05 <= he_pixel_size_um <= 5:
        raise InputError(f"he_pixel_size_um={he_pixel_size_um} is out of range: give a value between 0.05 and 5 um/px")
    if seed < 0:
        raise InputError(f"seed={seed} is negative: give a seed >= 0")
    _check_out_dir(out_dir)
    say = progress or (lambda message: None)

    size_um = (size_mm[0] * 1000.0, size_mm[1] * 1000.0)
    px = XENIUM_PIXEL_SIZE_UM
    morph_w, morph_h = int(np.ceil(size_um[0] / px)), int(np.ceil(size_um[1] / px))

    fields = make_fields(np.random.default_rng([seed, 0]), size_um)
    cells = make_cells(seed, fields, size_um)
    panel = make_panel(n_core_genes, n_addon_genes)
    transform, (he_w, he_h) = random_transform(
        np.random.default_rng([seed, 3]), (morph_w, morph_h), he_pixel_size_um, px, _HE_MARGIN_UM / he_pixel_size_um,
        deformation,
    )
    stain = random_stain(np.random.default_rng([seed, 4]))
    n_cells = len(cells)
    if n_cells == 0:
        raise InputError(f"a {size_mm[0]} x {size_mm[1]} mm sample with seed {seed} has no cells: use a larger size")
    cell_ids = _cell_id_strings(n_cells)
    say(f"{n_cells} cells placed")

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    xdir = tmp / "xenium"
    (xdir / "morphology_focus").mkdir(parents=True)
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        n_transcripts, cell_counts = _write_cell_tables(xdir, cells, cell_ids, panel, fields, size_um, seed)
        transcript_seconds = time.perf_counter() - t0
        transcript_cpu_seconds = time.process_time() - cpu0
        say(f"{n_transcripts} transcripts written in {transcript_seconds:.1f} s")
        _write_images(
            tmp, xdir, cells, fields, size_um, transform, stain, he_pixel_size_um, (morph_h, morph_w), (he_h, he_w),
            seed, cell_ids, cell_counts,
        )
        say("images written")
        _write_metadata(
            tmp, xdir, cells, cell_ids, panel, transform, stain, size_um, he_pixel_size_um, (morph_h, morph_w),
            (he_h, he_w), seed, n_transcripts, deformation,
        )
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SyntheticSample(
        root=out_dir,
        xenium_dir=out_dir / "xenium",
        he_path=out_dir / "he_image.ome.tif",
        alignment_csv=out_dir / "he_imagealignment.csv",
        keypoints_csv=out_dir / "he_keypoints.csv",
        panel_json=out_dir / "panel.json",
        ground_truth_json=out_dir / "ground_truth.json",
        ground_truth_cells=out_dir / "ground_truth_cells.parquet",
        summary=SampleSummary(
            n_cells=n_cells,
            n_transcripts=n_transcripts,
            morphology_shape=(morph_h, morph_w),
            he_shape=(he_h, he_w),
            seconds=time.perf_counter() - t_start,
            cpu_seconds=time.process_time() - cpu_start,
            transcript_seconds=transcript_seconds,
            transcript_cpu_seconds=transcript_cpu_seconds,
        ),
    )


def _write_cell_tables(xdir: Path, cells: Cells, cell_ids: np.ndarray, panel: GenePanel, fields, size_um, seed: int):
    """transcripts.parquet, cells.parquet, boundaries and the cell-feature matrix, block by block."""
    nx, ny, bx, by = block_grid(size_um)
    n_fov_x = int(np.ceil(size_um[0] / _FOV_UM))
    n_fov_y = int(np.ceil(size_um[1] / _FOV_UM))
    fov_dict = pa.array(_fov_names(n_fov_y, n_fov_x))
    feature_dict = pa.array(panel.names)
    category_names = sorted(set(panel.categories))
    category_dict = pa.array(category_names)
    feature_category = np.array([category_names.index(c) for c in panel.categories], dtype=np.int32)
    n_genes = panel.n_genes
    control_kind = {"negative_control_probe": 1, "negative_control_codeword": 2, "unassigned_codeword": 3}
    feature_kind = np.array([control_kind.get(c, 0) for c in panel.categories])

    sink = _TableSink(xdir, panel, len(cells))
    cell_summary = np.zeros((len(cells), 8))
    next_id = 0
    block_um = BLOCK_NODES * NODE_UM
    # one writer thread: parquet/HDF5 encoding overlaps with sampling the next block
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: list = []
        try:
            for block in range(bx * by):
                rows = np.arange(cells.block_starts[block], cells.block_starts[block + 1])
                block_y, block_x = divmod(block, bx)
                box = (
                    block_x * block_um, block_y * block_um,
                    min((block_x + 1) * block_um, size_um[0]), min((block_y + 1) * block_um, size_um[1]),
                )
                rng = np.random.default_rng([seed, 5, block_y, block_x])
                t = sample_block(rng, panel, cells, rows, fields.region, box)
                n = len(t)
                local = np.where(t.cell >= 0, t.cell - (rows[0] if len(rows) else 0) + 1, 0).astype(np.int32)
                fov = (
                    np.clip((t.y_um // _FOV_UM).astype(np.int32), 0, n_fov_y - 1) * n_fov_x
                    + np.clip((t.x_um // _FOV_UM).astype(np.int32), 0, n_fov_x - 1)
                ).astype(np.int32)
                table = pa.table(
                    {
                        "transcript_id": np.arange(next_id, next_id + n, dtype=np.uint64) + np.uint64(281474976710656),
                        "cell_id": pa.DictionaryArray.from_arrays(
                            pa.array(local), pa.array(np.concatenate([["UNASSIGNED"], cell_ids[rows]]))
                        ),
                        "overlaps_nucleus": t.overlaps_nucleus,
                        "feature_name": pa.DictionaryArray.from_arrays(pa.array(t.feature), feature_dict),
                        "x_location": t.x_um,
                        "y_location": t.y_um,
                        "z_location": t.z_um,
                        "qv": t.qv,
                        "fov_name": pa.DictionaryArray.from_arrays(pa.array(fov), fov_dict),
                        "nucleus_distance": t.nucleus_distance_um,
                        "codeword_index": t.feature,
                        "codeword_category": pa.DictionaryArray.from_arrays(
                            pa.array(feature_category[t.feature]), category_dict
                        ),
                        "is_gene": t.feature < n_genes,
                    },
                    schema=_TRANSCRIPT_SCHEMA,
                )
                next_id += n
                cell_tables = None
                if len(rows):
                    good = (t.cell >= 0) & (t.qv >= 20)
                    counts = np.bincount(
                        (t.cell[good] - rows[0]).astype(np.int64) * len(panel.names) + t.feature[good],
                        minlength=len(rows) * len(panel.names),
                    ).reshape(len(rows), len(panel.names))
                    cell_tables = _cell_tables(cells, rows, cell_ids, counts, feature_kind, cell_summary)
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(pool.submit(sink.write, table, cell_tables))
            for future in pending:
                future.result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            sink.close(cell_ids)
    return next_id, cell_summary


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


class _TableSink:
    """The block-by-block files of the bundle; written from one thread, in block order."""

    def __init__(self, xdir: Path, panel: GenePanel, n_cells: int):
        self._xdir = xdir
        self._matrix = TenXMatrixWriter(xdir / "cell_feature_matrix.h5", panel.names, panel.feature_types, n_cells)
        self._transcripts = pq.ParquetWriter(
            xdir / "transcripts.parquet",
            _TRANSCRIPT_SCHEMA,
            compression="zstd",
            compression_level=1,
            use_dictionary=["cell_id", "feature_name", "fov_name", "codeword_category"],
            store_schema=False,
        )
        self._cell_writers: list[pq.ParquetWriter] = []

    def write(self, transcripts: pa.Table, cell_tables) -> None:
        self._transcripts.write_table(transcripts, row_group_size=1 << 20)
        if cell_tables is None:
            return
        *tables, counts = cell_tables
        self._matrix.append(counts)
        if not self._cell_writers:
            names = ("cells.parquet", "cell_boundaries.parquet", "nucleus_boundaries.parquet")
            self._cell_writers = [
                pq.ParquetWriter(self._xdir / name, t.schema, compression="zstd") for name, t in zip(names, tables)
            ]
        for writer, table in zip(self._cell_writers, tables):
            writer.write_table(table)

    def close(self, cell_ids: np.ndarray) -> None:
        self._transcripts.close()
        for writer in self._cell_writers:
            writer.close()
        self._matrix.close(cell_ids)


def _write_images(
    tmp, xdir, cells, fields, size_um, transform, stain, he_px_um, morph_shape, he_shape, seed, cell_ids, cell_summary
):
    """Morphology DAPI + label masks (cells.zarr.zip), then the H&E, strip by strip."""
    morph_h, morph_w = morph_shape
    px = XENIUM_PIXEL_SIZE_UM
    n = len(cells)
    store = zarr.storage.ZipStore(xdir / "cells.zarr.zip", mode="w")
    # every key is written once: a zip cannot overwrite a member
    root = zarr.create_group(
        store, zarr_format=2, attributes={"major_version": 6, "minor_version": 0, "number_cells": n}
    )
    prefix = np.arange(1, n + 1, dtype=np.uint32)
    root.create_array("cell_id", data=np.column_stack([prefix, np.ones(n, np.uint32)]))
    columns = [
        "cell_centroid_x",
        "cell_centroid_y",
        "cell_area",
        "nucleus_centroid_x",
        "nucleus_centroid_y",
        "nucleus_area",
        "z_level",
        "nucleus_count",
    ]
    root.create_array("cell_summary", data=cell_summary, attributes={"column_names": columns})
    polygon_sets = root.create_group("polygon_sets")
    for k in (0, 1):
        polygon_sets.create_group(str(k)).create_array("cell_index", data=np.arange(n, dtype=np.uint32))
    chunk_w = min(4096, morph_w)
    mask_group = root.create_group("masks")
    masks = [
        mask_group.create_array(str(k), shape=(morph_h, morph_w), chunks=(512, chunk_w), dtype=np.uint32, fill_value=0)
        for k in (0, 1)
    ]

    def morphology_strip(row0: int, n_rows: int) -> np.ndarray:
        dapi = np.empty((n_rows, morph_w), np.uint16)
        nuc = np.empty((n_rows, morph_w), np.uint32)
        cel = np.empty((n_rows, morph_w), np.uint32)
        def chunk(col0: int):
            w = min(_CHUNK_COLS, morph_w - col0)
            rng = np.random.default_rng([seed, 6, row0, col0])
            d, nl, cl = render_morphology_chunk(cells, fields, px, col0, row0, w, n_rows, rng)
            dapi[:, col0 : col0 + w] = d
            nuc[:, col0 : col0 + w] = nl
            cel[:, col0 : col0 + w] = cl

        list(pool.map(chunk, range(0, morph_w, _CHUNK_COLS)))
        masks[0][row0 : row0 + n_rows, :] = nuc
        masks[1][row0 : row0 + n_rows, :] = cel
        return dapi

    try:
        with ThreadPoolExecutor(max_workers=_RENDER_THREADS) as pool:
            write_pyramidal_ome_tiff(
                xdir / "morphology_focus" / "morphology_focus_0000.ome.tif",
                morphology_strip,
                morph_h,
                morph_w,
                1,
                np.dtype(np.uint16),
                px,
                "DAPI",
                tmp,
            )
    finally:
        store.close()

    he_h, he_w = he_shape

    def he_strip(row0: int, n_rows: int) -> np.ndarray:
        rgb = np.empty((n_rows, he_w, 3), np.uint8)
        def chunk(col0: int):
            w = min(_CHUNK_COLS, he_w - col0)
            rng = np.random.default_rng([seed, 7, row0, col0])
            rgb[:, col0 : col0 + w] = render_he_chunk(
                cells, fields, transform, px, he_px_um, stain, col0, row0, w, n_rows, rng
            )

        list(pool.map(chunk, range(0, he_w, _CHUNK_COLS)))
        return rgb

    with ThreadPoolExecutor(max_workers=_RENDER_THREADS) as pool:
        write_pyramidal_ome_tiff(
            tmp / "he_image.ome.tif", he_strip, he_h, he_w, 3, np.dtype(np.uint8), he_px_um, "RGB", tmp, JPEG
        )


def _write_metadata(
    tmp, xdir, cells, cell_ids, panel, transform, stain, size_um, he_px_um, morph_shape, he_shape, seed, n_transcripts,
    deformation,
):
    px = XENIUM_PIXEL_SIZE_UM
    n = len(cells)
    area_mm2 = size_um[0] * size_um[1] / 1e6
    experiment = {
        "major_version": 5,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": f"synthetic_seed{seed}",
        "run_start_time": "2026-01-01T00:00:00Z",
        "region_name": "synthetic_region",
        "preservation_method": "ffpe",
        "num_cells": n,
        "transcripts_per_cell": int(n_transcripts / max(n, 1)),
        "transcripts_per_100um": float(n_transcripts / (area_mm2 * 1e4)),  # per 100 um^2
        "cassette_name": "synthetic",
        "slide_id": f"SYN{seed:07d}",
        "panel_design_id": "synthetic",
        "panel_name": f"Synthetic core {panel.n_core} + add-on {panel.n_addon}",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": panel.n_core,
        "panel_num_targets_custom": panel.n_addon,
        "pixel_size": px,
        "instrument_sw_version": "3.0.1.1",
        "analysis_sw_version": XENIUM_SOFTWARE_VERSION,
        "experiment_uuid": f"00000000-0000-0000-0000-{seed:012d}",
        "z_step_size": 3.0,
        "num_transcripts": int(n_transcripts),
        "images": {"morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"},
        "synthetic": True,
    }
    (xdir / "experiment.xenium").write_text(json.dumps(experiment, indent=2))
    targets = [
        {
            "type": {"data": {"id": name, "name": name}, "descriptor": "gene" if i < panel.n_genes else "control"},
            "codewords": [i],
            "source": {"category": panel.categories[i]},
        }
        for i, name in enumerate(panel.names)
    ]
    (xdir / "gene_panel.json").write_text(
        json.dumps(
            {
                "metadata": {"generator": "napari-morphomol synthetic"},
                "payload": {"name": experiment["panel_name"], "targets": targets},
            },
            indent=1,
        )
    )
    (tmp / "panel.json").write_text(json.dumps({"core": panel.core, "addon": panel.addon}, indent=1))
    np.savetxt(tmp / "he_imagealignment.csv", transform.affine, delimiter=",", fmt="%.10g")

    # keypoints: distinctive nuclei spread over the section, H&E side with ~1.2 px noise
    rng = np.random.default_rng([seed, 8])
    gx, gy = np.meshgrid(np.linspace(0.12, 0.88, 4), np.linspace(0.15, 0.85, 3))
    targets_um = np.column_stack([gx.ravel() * size_um[0], gy.ravel() * size_um[1]])
    centres = np.column_stack([cells.x_um, cells.y_um])
    chosen = np.unique([int(np.argmin(((centres - t) ** 2).sum(axis=1))) for t in targets_um])
    fixed = centres[chosen] / px
    moving = transform.global_to_he_px(fixed) + rng.normal(0, 1.2, (len(chosen), 2))
    lines = ["fixedX,fixedY,alignmentX,alignmentY"] + [
        f"{f[0]:.3f},{f[1]:.3f},{m[0]:.3f},{m[1]:.3f}" for f, m in zip(fixed, moving)
    ]
    (tmp / "he_keypoints.csv").write_text("\n".join(lines) + "\n")

    he_xy = transform.global_to_he_px(centres / px)
    pq.write_table(
        pa.table(
            {
                "cell_id": pa.array(cell_ids),
                "x_um": cells.x_um,
                "y_um": cells.y_um,
                "he_x_px": he_xy[:, 0],
                "he_y_px": he_xy[:, 1],
                "cell_type": pa.array(np.array(CELL_TYPES)[cells.cell_type]),
                "region": pa.array(np.array(REGIONS)[cells.region]),
                "ifn": cells.ifn,
                "hypoxia": cells.hypoxia,
                "proliferating": cells.proliferating,
                "nuclear_size_z": cells.nuclear_size_z,
                "nucleus_radius_um": cells.nucleus_radius_um,
                "nucleus_a_um": cells.nucleus_a_um,
                "nucleus_b_um": cells.nucleus_b_um,
                "nucleus_angle_rad": cells.nucleus_angle,
                "cell_radius_um": cells.cell_radius_um,
                "chromatin_darkness": cells.darkness,
                "library_size": cells.library_size,
            }
        ),
        tmp / "ground_truth_cells.parquet",
    )
    addon_programs = dict(zip(panel.addon, panel.program[panel.n_core : panel.n_genes]))
    truth = {
        "generator": "napari-morphomol synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size_um": list(size_um),
        "xenium_pixel_size_um": px,
        "he_pixel_size_um": he_px_um,
        "morphology_shape": list(morph_shape),
        "he_shape": list(he_shape),
        "pixel_convention": "pixel (row r, col c) covers [c, c+1) x [r, r+1); its centre is (c + 0.5, r + 0.5)",
        "he_to_global_affine": transform.affine.tolist(),
        "deformation": {
            "enabled": bool(deformation),
            "formula": (
                "global_px = A @ [u, v, 1] + sum_k [amp_x_px, amp_y_px]_k "
                "* sin(2*pi*(freq_u_k*u + freq_v_k*v) + phase_k), (u, v) in H&E px"
            ),
            "components": [
                dict(zip(["amp_x_px", "amp_y_px", "freq_u", "freq_v", "phase"], map(float, row)))
                for row in transform.warp
            ],
        },
        "regions": list(REGIONS),
        "cell_types": list(CELL_TYPES),
        "latents": list(LATENTS),
        "hidden_states": ["ifn", "hypoxia"],
        "morphology_states": ["proliferating", "tumour_nuclear_size"],
        "panel": {
            "core": panel.core,
            "addon": panel.addon,
            "core_programs": dict(zip(panel.core, panel.program[: panel.n_core])),
            "addon_programs": addon_programs,
            "bias": panel.bias.tolist(),
            "loadings": panel.loadings.tolist(),
        },
        "stain": stain.as_json(),
        "n_cells": n,
        "n_transcripts": int(n_transcripts),
    }
    (tmp / "ground_truth.json").write_text(json.dumps(truth, indent=1))
