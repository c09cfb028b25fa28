"""The ground truth of a synthetic sample: what was drawn, written beside the sample and read back.

``ground_truth.json`` holds the generator and its version, the seed, sizes and pixel sizes, the
true H&E px -> global px map (the affine of ``he_imagealignment.csv`` plus the warp components,
with the formula spelled out), the region, cell-type and latent names, each gene's program,
bias and loadings, and the stain. ``ground_truth_cells.parquet`` holds one row per cell, in the
bundle's cell order: position (um and H&E px), type, region, hidden and morphology states and
nucleus shape. :func:`load_ground_truth` reads the JSON back as a :class:`GroundTruth`;
:func:`expected_cell_counts` recomputes each cell's expected counts without counting noise;
:func:`true_he_to_global_px` and :func:`true_global_to_he_px` apply the exact map (the one that
rendered the H&E).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from napari_morphomol.coords import as_points_xy
from napari_morphomol.errors import InputError
from napari_morphomol.synthetic.expression import LATENTS, ProgramPanel, expected_gene_counts, latent_matrix
from napari_morphomol.synthetic.plan import SamplePlan
from napari_morphomol.synthetic.tissue import CELL_TYPES, REGIONS, Cells
from napari_morphomol.synthetic.transform import TrueTransform

GENERATOR = "napari-morphomol synthetic"
"""The ``generator`` marker of ground_truth.json (and of the bundle's gene_panel.json)."""
GENERATOR_VERSION = 3
"""Bumped whenever the same arguments would give other files."""
GROUND_TRUTH_JSON = "ground_truth.json"
GROUND_TRUTH_CELLS = "ground_truth_cells.parquet"
_WARP_KEYS = ("amp_x_px", "amp_y_px", "freq_u", "freq_v", "phase")


@dataclass(frozen=True)
class GroundTruth:
    """The parts of ground_truth.json that tests and benchmarks score against (``raw``: all of it)."""

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
    """The ground truth of a synthetic sample.

    Parameters
    ----------
    path
        A sample folder written by ``morphomol synth``, or its ground_truth.json.

    Returns
    -------
    GroundTruth
    """
    path = Path(path)
    if path.is_dir():
        path = path / GROUND_TRUTH_JSON
    if not path.is_file():
        raise InputError(f"no ground truth at {path}: pass a sample folder written by `morphomol synth`")
    raw = json.loads(path.read_text())
    if raw.get("generator") != GENERATOR:
        raise InputError(f"{path} is not a synthetic ground truth: pass the ground_truth.json of a synthetic sample")
    warp = np.array([[c[key] for key in _WARP_KEYS] for c in raw["deformation"]["components"]], dtype=float)
    return GroundTruth(
        seed=raw["seed"],
        size_um=tuple(raw["size_um"]),
        xenium_pixel_size_um=raw["xenium_pixel_size_um"],
        he_pixel_size_um=raw["he_pixel_size_um"],
        morphology_shape=tuple(raw["morphology_shape"]),
        he_shape=tuple(raw["he_shape"]),
        transform=TrueTransform(affine=np.array(raw["he_to_global_affine"], dtype=float), warp=warp.reshape(-1, 5)),
        core_genes=raw["panel"]["core"],
        addon_genes=raw["panel"]["addon"],
        addon_programs=raw["panel"]["addon_programs"],
        raw=raw,
    )


def expected_cell_counts(path: str | os.PathLike, genes: list[str] | None = None) -> pd.DataFrame:
    """Each cell's expected transcripts of ``genes`` (default: the add-on panel) without counting
    noise, recomputed from the ground truth: the ceiling a per-cell prediction is scored against.

    Parameters
    ----------
    path
        A sample folder written by ``morphomol synth``.
    genes
        Genes of the panel (core or add-on).

    Returns
    -------
    pandas.DataFrame
        (cells, genes), indexed by the bundle's ``cell_id``, in the bundle's cell order.
    """
    truth = load_ground_truth(path)
    names = [*truth.core_genes, *truth.addon_genes]
    genes = truth.addon_genes if genes is None else list(genes)
    unknown = [g for g in genes if g not in names]
    if unknown:
        raise InputError(f"the synthetic panel of {path} has no genes {unknown[:5]}; it has {len(names)} genes")
    cells = pq.read_table(Path(path) / GROUND_TRUTH_CELLS).to_pandas()
    z = latent_matrix(pd.Categorical(cells["cell_type"], categories=CELL_TYPES).codes, cells["ifn"], cells["hypoxia"],
                      cells["proliferating"], cells["nuclear_size_z"])
    expected = expected_gene_counts(truth.raw["panel"]["bias"], truth.raw["panel"]["loadings"], len(truth.core_genes),
                                    z, cells["library_size"].to_numpy())
    columns = [names.index(g) for g in genes]
    return pd.DataFrame(expected[:, columns], index=pd.Index(cells["cell_id"].astype(str), name="cell_id"),
                        columns=genes)


def true_he_to_global_px(points_he_px: np.ndarray, ground_truth: GroundTruth) -> np.ndarray:
    """Exact H&E px -> global px map of the sample (affine and warp), (N, 2) (x, y)."""
    return ground_truth.transform.he_to_global_px(as_points_xy(points_he_px))


def true_global_to_he_px(points_global_px: np.ndarray, ground_truth: GroundTruth) -> np.ndarray:
    """Inverse of :func:`true_he_to_global_px` (to 1e-6 px)."""
    return ground_truth.transform.global_to_he_px(as_points_xy(points_global_px))


def write_ground_truth(folder: Path, plan: SamplePlan, panel: ProgramPanel, cells: Cells, cell_ids: np.ndarray,
                       n_transcripts: int) -> None:
    """ground_truth_cells.parquet and ground_truth.json into the (new) sample ``folder``."""
    he_xy = plan.transform.global_to_he_px(np.column_stack([cells.x_um, cells.y_um]) / plan.xenium_pixel_size_um)
    pq.write_table(_cells_table(cells, cell_ids, he_xy), folder / GROUND_TRUTH_CELLS)
    truth = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": plan.seed,
        "size_um": list(plan.size_um),
        "xenium_pixel_size_um": plan.xenium_pixel_size_um,
        "he_pixel_size_um": plan.he_pixel_size_um,
        "morphology_shape": list(plan.morphology_shape),
        "he_shape": list(plan.he_shape),
        "pixel_convention": "pixel (row r, col c) covers [c, c+1) x [r, r+1); its centre is (c + 0.5, r + 0.5)",
        "he_to_global_affine": plan.transform.affine.tolist(),
        "deformation": _deformation(plan),
        "regions": list(REGIONS),
        "cell_types": list(CELL_TYPES),
        "latents": list(LATENTS),
        "hidden_states": ["ifn", "hypoxia"],
        "morphology_states": ["proliferating", "tumour_nuclear_size"],
        "panel": {
            "core": panel.core,
            "addon": panel.addon,
            "core_programs": dict(zip(panel.core, panel.program[: panel.n_core])),
            "addon_programs": dict(zip(panel.addon, panel.program[panel.n_core : panel.n_genes])),
            "bias": panel.bias.tolist(),
            "loadings": panel.loadings.tolist(),
        },
        "stain": plan.stain.as_json(),
        **({} if plan.shift.is_cohort else {"shift": plan.shift.as_json()}),
        "n_cells": len(cells),
        "n_transcripts": int(n_transcripts),
    }
    (folder / GROUND_TRUTH_JSON).write_text(json.dumps(truth, indent=1))


def _deformation(plan: SamplePlan) -> dict:
    return {
        "enabled": bool(plan.deformation),
        "formula": (
            "global_px = A @ [u, v, 1] + sum_k [amp_x_px, amp_y_px]_k "
            "* sin(2*pi*(freq_u_k*u + freq_v_k*v) + phase_k), (u, v) in H&E px"
        ),
        "components": [dict(zip(_WARP_KEYS, map(float, row))) for row in plan.transform.warp],
    }


def _cells_table(cells: Cells, cell_ids: np.ndarray, he_xy: np.ndarray) -> pa.Table:
    return pa.table(
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
    )
