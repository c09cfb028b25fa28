"""Write one synthetic sample folder: plan it, draw the tissue, write every file, move it in place.

The folder (:class:`SyntheticSample`) holds ``xenium/`` (the bundle, :mod:`.bundle` and
:mod:`.images`), ``he_image.ome.tif``, ``he_imagealignment.csv`` (the affine part of the true
map), ``he_keypoints.csv`` (Xenium Explorer keypoints on distinctive nuclei, ~1.2 px noise on the
H&E side), ``panel.json`` and the ground truth (:mod:`.truth`).

Invariants: the same arguments give the same files (zip member timestamps aside); the folder
appears complete or not at all: it is written into a temporary sibling and renamed into place by
:func:`napari_morphomol._atomic.atomic_output`, and an existing folder is used only when empty.
The alignment and keypoint files go through the project's writers
(:mod:`napari_morphomol.registration.formats`), so they are exactly what the readers accept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_morphomol._atomic import OutputKind, atomic_output
from napari_morphomol.errors import InputError
from napari_morphomol.registration.formats import write_alignment_csv, write_keypoints_csv
from napari_morphomol.registration.landmarks import LandmarkPairs
from napari_morphomol.synthetic.bundle import (
    MORPHOLOGY_FOCUS,
    cell_id_strings,
    write_bundle_metadata,
    write_cell_tables,
)
from napari_morphomol.synthetic.expression import ProgramPanel, make_panel
from napari_morphomol.synthetic.images import write_he_image, write_morphology
from napari_morphomol.synthetic.plan import DatasetShift, SamplePlan, plan_sample
from napari_morphomol.synthetic.tissue import Cells, make_cells, make_fields
from napari_morphomol.synthetic.truth import GROUND_TRUTH_CELLS, GROUND_TRUTH_JSON, write_ground_truth

ALIGNMENT_DIGITS = 10
"""Significant digits of he_imagealignment.csv's numbers (the values generator version 3 wrote)."""
KEYPOINT_DECIMALS = 3
"""Decimals of he_keypoints.csv's coordinates, as Xenium Explorer exports them."""

SAMPLE_FOLDER = OutputKind(
    "empty folder for a synthetic sample",
    lambda path: path.is_dir() and not path.is_symlink() and not any(path.iterdir()),
)
"""A sample replaces an existing folder only when that folder is empty."""


@dataclass(frozen=True)
class SampleSummary:
    """Counts and timings of one run of :func:`write_synthetic_sample`."""

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
    """The paths of a synthetic sample folder."""

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

    @classmethod
    def at(cls, root: str | os.PathLike, summary: SampleSummary | None = None) -> SyntheticSample:
        """The sample folder ``root`` (written by :func:`write_synthetic_sample`)."""
        root = Path(root)
        return cls(
            root=root,
            xenium_dir=root / "xenium",
            he_path=root / "he_image.ome.tif",
            alignment_csv=root / "he_imagealignment.csv",
            keypoints_csv=root / "he_keypoints.csv",
            panel_json=root / "panel.json",
            ground_truth_json=root / GROUND_TRUTH_JSON,
            ground_truth_cells=root / GROUND_TRUTH_CELLS,
            summary=summary,
        )


def write_synthetic_sample(
    out_dir: str | os.PathLike,
    *,
    size_mm: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    n_core_genes: int = 380,
    n_addon_genes: int = 100,
    he_pixel_size_um: float = 0.2737,
    deformation: bool = True,
    shift: DatasetShift = DatasetShift(),
    axis_aligned: bool = False,
    progress=None,
) -> SyntheticSample:
    """Write a synthetic sample into the new (or empty) folder ``out_dir``, atomically.

    Parameters
    ----------
    out_dir
        The sample folder to create; its parent must exist.
    size_mm
        Section (width, height) in mm, each between 0.1 and 40.
    seed
        Random seed (>= 0): the same seed gives the same files.
    n_core_genes, n_addon_genes
        Panel sizes (at least 24 and 10).
    he_pixel_size_um
        H&E pixel size (0.05 to 5 um/px).
    deformation
        Add a smooth warp of a few um to the H&E placement (else an affine only).
    shift
        What makes the sample unlike the cohort: an unseen stain, a sarcomatoid tumour, a recorded
        registration that is off (:class:`~napari_morphomol.synthetic.plan.DatasetShift`; none by default).
    axis_aligned
        Place the H&E by the pixel-size ratio and a whole-pixel shift only (no rotation, scale error
        or shear): the block a scale sample repeats (:func:`~napari_morphomol.synthetic.scale.write_scale_sample`).
    progress
        ``progress(message)``, called between stages when given.

    Returns
    -------
    SyntheticSample
        Its paths; ``summary`` holds counts and timings.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir).absolute()
    plan = plan_sample(size_mm, seed=seed, he_pixel_size_um=he_pixel_size_um, deformation=deformation, shift=shift,
                       axis_aligned=axis_aligned)
    check_out_dir(out_dir)
    say = progress or (lambda message: None)
    with atomic_output(out_dir, SAMPLE_FOLDER, overwrite=True) as tmp:
        panel = make_panel(n_core_genes, n_addon_genes)
        fields = make_fields(plan.rng(0), plan.size_um)
        sarcomatoid = None
        if shift.tissue == "sarcomatoid":
            sarcomatoid = shift.tissue_region_um or (0.0, 0.0, plan.size_um[0], plan.size_um[1])
        cells = make_cells(seed, fields, plan.size_um, sarcomatoid)
        if len(cells) == 0:
            raise InputError(
                f"a {plan.size_um[0] / 1000:g} x {plan.size_um[1] / 1000:g} mm sample with seed {seed} has no cells: "
                "use a larger size"
            )
        say(f"{len(cells)} cells placed")
        cell_ids = cell_id_strings(len(cells))
        sample = SyntheticSample.at(tmp)
        (sample.xenium_dir / "morphology_focus").mkdir(parents=True)
        t0, cpu0 = time.perf_counter(), time.process_time()
        n_transcripts, cell_summary = write_cell_tables(sample.xenium_dir, plan, panel, cells, cell_ids, fields)
        transcript_seconds, transcript_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        say(f"{n_transcripts} transcripts written in {transcript_seconds:.1f} s")
        write_morphology(sample.xenium_dir / MORPHOLOGY_FOCUS, sample.xenium_dir / "cells.zarr.zip", plan, cells,
                         fields, cell_summary, scratch_dir=tmp)
        write_he_image(sample.he_path, plan, cells, fields, scratch_dir=tmp)
        say("images written")
        _write_sidecars(sample, plan, panel, cells)
        write_ground_truth(tmp, plan, panel, cells, cell_ids, n_transcripts)
        write_bundle_metadata(sample.xenium_dir, plan, panel, len(cells), n_transcripts)
    summary = SampleSummary(
        n_cells=len(cells),
        n_transcripts=n_transcripts,
        morphology_shape=plan.morphology_shape,
        he_shape=plan.he_shape,
        seconds=time.perf_counter() - t_start,
        cpu_seconds=time.process_time() - cpu_start,
        transcript_seconds=transcript_seconds,
        transcript_cpu_seconds=transcript_cpu_seconds,
    )
    return SyntheticSample.at(out_dir, summary)


def check_out_dir(out_dir: Path) -> None:
    """Refuse (InputError) a sample folder that exists and is not empty, or whose parent is missing.

    Parameters
    ----------
    out_dir
        The folder a sample is about to be written to.

    Returns
    -------
    None
        Raises an InputError saying to pick a new folder, or to create its parent.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists and is not empty: pick a new folder for the synthetic sample")
    if not out_dir.parent.is_dir():
        raise InputError(f"{out_dir.parent} does not exist: create it or pick another place for the sample")


def _write_sidecars(sample: SyntheticSample, plan: SamplePlan, panel: ProgramPanel, cells: Cells) -> None:
    """panel.json, he_imagealignment.csv and he_keypoints.csv beside the bundle.

    Written before the bundle's experiment.xenium: the output guard refuses to write a file that
    a sample folder's reader looks for (``*he_imagealignment.csv``) beside a finished bundle.
    """
    sample.panel_json.write_text(json.dumps({"core": panel.core, "addon": panel.addon}, indent=1))
    offset_px = np.asarray(plan.shift.registration_offset_um) / plan.xenium_pixel_size_um
    recorded = np.array([[1.0, 0.0, offset_px[0]], [0.0, 1.0, offset_px[1]], [0.0, 0.0, 1.0]]) @ plan.transform.affine
    affine = np.vectorize(lambda v: float(f"{v:.{ALIGNMENT_DIGITS}g}"))(recorded)
    write_alignment_csv(sample.alignment_csv, affine)
    write_keypoints_csv(sample.keypoints_csv, _keypoints(plan, cells))


def _keypoints(plan: SamplePlan, cells: Cells) -> LandmarkPairs:
    """Twelve distinctive nuclei spread over the section (the cells nearest a 4 x 3 grid), their
    H&E side moved by ~1.2 px of noise, as a person clicking them would."""
    rng = plan.rng(8)
    gx, gy = np.meshgrid(np.linspace(0.12, 0.88, 4), np.linspace(0.15, 0.85, 3))
    targets_um = np.column_stack([gx.ravel() * plan.size_um[0], gy.ravel() * plan.size_um[1]])
    centres = np.column_stack([cells.x_um, cells.y_um])
    chosen = np.unique([int(np.argmin(((centres - t) ** 2).sum(axis=1))) for t in targets_um])
    global_px = centres[chosen] / plan.xenium_pixel_size_um
    he_px = plan.transform.global_to_he_px(global_px) + rng.normal(0, 1.2, (len(chosen), 2))
    return LandmarkPairs.from_arrays(np.round(he_px, KEYPOINT_DECIMALS), np.round(global_px, KEYPOINT_DECIMALS))
