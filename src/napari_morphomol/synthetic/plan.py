"""The plan of a synthetic sample: everything fixed before the first file is written.

A :class:`SamplePlan` holds the section size, both pixel sizes and image shapes, the true
H&E -> Xenium transform, the stain and the seed. Every writer of the sample reads its sizes from
the plan, so the bundle, the images and the ground truth agree by construction.

Randomness: every random draw of the generator comes from ``plan.rng(stage, ...)``, i.e.
``np.random.default_rng([seed, stage, ...])``, one stream per stage (0 tissue fields, 1 cells per
block, 3 transform, 4 stain, 5 transcripts per block, 6 DAPI chunks, 7 H&E chunks, 8 keypoint
noise), so the same seed gives the same sample whatever the order the stages run in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM
from napari_morphomol.errors import InputError
from napari_morphomol.synthetic.render import Stain, random_stain, unseen_stain
from napari_morphomol.synthetic.transform import TrueTransform, random_transform

HE_MARGIN_UM = 80.0
"""Glass around the section on the H&E (at least this much on every side)."""

STAIN_SHIFTS = ("cohort", "unseen")
TISSUE_SHIFTS = ("cohort", "sarcomatoid")


@dataclass(frozen=True)
class DatasetShift:
    """What makes a sample unlike every sample the generator otherwise makes (the trust benchmark's
    out-of-distribution cases); the default shifts nothing and gives the cohort's files.

    ``stain="unseen"``: an H&E protocol no cohort sample has (brown hematoxylin, strong magenta eosin).
    ``tissue="sarcomatoid"``: tumour cells take a spindle form no cohort tumour has (long, large,
    dark nuclei along the fibres), inside ``tissue_region_um`` (x0, y0, x1, y1) or everywhere.
    ``registration_offset_um``: the recorded H&E alignment (``he_imagealignment.csv``) is off by
    this (x, y) shift; the H&E, the keypoints and the ground truth keep the true placement.
    """

    stain: str = "cohort"
    tissue: str = "cohort"
    tissue_region_um: tuple[float, float, float, float] | None = None
    registration_offset_um: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.stain not in STAIN_SHIFTS:
            raise InputError(f"stain shift {self.stain!r} is unknown: give one of {', '.join(STAIN_SHIFTS)}")
        if self.tissue not in TISSUE_SHIFTS:
            raise InputError(f"tissue shift {self.tissue!r} is unknown: give one of {', '.join(TISSUE_SHIFTS)}")
        if self.tissue_region_um is not None:
            x0, y0, x1, y1 = self.tissue_region_um
            if not (x1 > x0 and y1 > y0):
                raise InputError(f"tissue_region_um {self.tissue_region_um} is empty: give x0 < x1 and y0 < y1 in um")
        if len(self.registration_offset_um) != 2 or not np.all(np.isfinite(self.registration_offset_um)):
            raise InputError(f"registration_offset_um {self.registration_offset_um} must be two finite numbers (um)")

    @property
    def is_cohort(self) -> bool:
        return self == DatasetShift()

    def as_json(self) -> dict:
        return {"stain": self.stain, "tissue": self.tissue,
                "tissue_region_um": None if self.tissue_region_um is None else list(self.tissue_region_um),
                "registration_offset_um": list(self.registration_offset_um)}


@dataclass(frozen=True)
class SamplePlan:
    """Sizes, pixel sizes, transform, stain and seed of one synthetic sample."""

    seed: int
    size_um: tuple[float, float]
    """Section (width, height) in um; the morphology image covers it from (0, 0)."""
    he_pixel_size_um: float
    morphology_shape: tuple[int, int]
    """(height, width) of the morphology image in global px."""
    he_shape: tuple[int, int]
    """(height, width) of the H&E image in H&E px."""
    transform: TrueTransform
    stain: Stain
    deformation: bool
    """Whether the transform has a smooth warp on top of its affine."""
    xenium_pixel_size_um: float = XENIUM_PIXEL_SIZE_UM
    shift: DatasetShift = DatasetShift()

    def rng(self, *stream: int) -> np.random.Generator:
        """The random stream ``[seed, *stream]`` (see the module docstring for the stage numbers)."""
        return np.random.default_rng([self.seed, *stream])


def plan_sample(size_mm: tuple[float, float], *, seed: int, he_pixel_size_um: float, deformation: bool,
                shift: DatasetShift = DatasetShift(), axis_aligned: bool = False) -> SamplePlan:
    """Check the arguments of a sample and fix its sizes, transform and stain.

    Parameters
    ----------
    size_mm
        Section (width, height) in mm, each between 0.1 and 40.
    seed
        Random seed (>= 0).
    he_pixel_size_um
        H&E pixel size, between 0.05 and 5 um/px.
    deformation
        Add a smooth warp to the H&E placement.
    shift
        What makes the sample unlike the cohort (nothing by default).
    axis_aligned
        Place the H&E by the pixel-size ratio and a whole-pixel shift only (no rotation, scale
        error or shear).

    Returns
    -------
    SamplePlan
    """
    size_mm = tuple(float(s) for s in size_mm)
    if len(size_mm) != 2 or min(size_mm) < 0.1 or max(size_mm) > 40:
        raise InputError(f"size_mm={size_mm} is out of range: give width and height between 0.1 and 40 mm")
    if not 0.05 <= he_pixel_size_um <= 5:
        raise InputError(f"he_pixel_size_um={he_pixel_size_um} is out of range: give a value between 0.05 and 5 um/px")
    if seed < 0:
        raise InputError(f"seed={seed} is negative: give a seed >= 0")
    size_um = (size_mm[0] * 1000.0, size_mm[1] * 1000.0)
    px = XENIUM_PIXEL_SIZE_UM
    morph_w, morph_h = int(np.ceil(size_um[0] / px)), int(np.ceil(size_um[1] / px))
    transform, (he_w, he_h) = random_transform(
        np.random.default_rng([seed, 3]), (morph_w, morph_h), he_pixel_size_um, px, HE_MARGIN_UM / he_pixel_size_um,
        deformation, axis_aligned,
    )
    return SamplePlan(
        seed=seed,
        size_um=size_um,
        he_pixel_size_um=he_pixel_size_um,
        morphology_shape=(morph_h, morph_w),
        he_shape=(he_h, he_w),
        transform=transform,
        stain=(unseen_stain if shift.stain == "unseen" else random_stain)(np.random.default_rng([seed, 4])),
        deformation=deformation,
        xenium_pixel_size_um=px,
        shift=shift,
    )
