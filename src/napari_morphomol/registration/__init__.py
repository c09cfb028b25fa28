"""Landmark registration of an H&E image to Xenium ``global`` px (headless: no Qt, no napari).

Fit with :func:`fit_transform` (landmarks clicked, read from a file, or proposed by
:func:`propose_landmarks_for_sample`), read and write landmark and matrix files with the ``read_*`` /
``write_*`` functions, move transcripts with :func:`transform_xy_columns` or
:func:`transcripts_with_he_px` (per-region and spline inverses read from an :class:`InverseGrid`,
within ``INVERSE_GRID_TOLERANCE_PX`` of the exact one; :func:`map_columns_chunked` maps columns in
chunks over threads, a columns map made a mapping by :func:`filling`), and put the result on a
SpatialData sample with :func:`set_he_registration`.
"""

from napari_morphomol.registration.apply import (
    HE_X_PX,
    HE_Y_PX,
    REGISTRATION_ATTRS_KEY,
    fitted_from_record,
    read_registration_json,
    registration_record,
    set_he_registration,
    transcripts_with_he_px,
    transform_xy_columns,
    write_registration_json,
)
from napari_morphomol.registration.auto import AutoRegistration, propose_landmarks, propose_landmarks_for_sample
from napari_morphomol.registration.fit import (
    REGISTRATION_MODELS,
    FitOptions,
    FittedTransform,
    RegistrationModel,
    fit_transform,
)
from napari_morphomol.registration.formats import (
    check_direction,
    read_alignment_csv,
    read_bigwarp_csv,
    read_keypoints_csv,
    read_landmarks,
    write_alignment_csv,
    write_bigwarp_csv,
    write_keypoints_csv,
)
from napari_morphomol.registration.landmarks import LandmarkPairs
from napari_morphomol.registration.transforms import (
    INVERSE_GRID_TOLERANCE_PX,
    AffineXY,
    HeGlobalTransform,
    InverseGrid,
    PerRegionAffine,
    ThinPlateSplineXY,
    filling,
    map_columns_chunked,
)

__all__ = [
    "HE_X_PX",
    "HE_Y_PX",
    "INVERSE_GRID_TOLERANCE_PX",
    "REGISTRATION_ATTRS_KEY",
    "REGISTRATION_MODELS",
    "AffineXY",
    "AutoRegistration",
    "FitOptions",
    "FittedTransform",
    "HeGlobalTransform",
    "InverseGrid",
    "LandmarkPairs",
    "PerRegionAffine",
    "RegistrationModel",
    "ThinPlateSplineXY",
    "check_direction",
    "filling",
    "fit_transform",
    "fitted_from_record",
    "map_columns_chunked",
    "read_alignment_csv",
    "read_bigwarp_csv",
    "read_keypoints_csv",
    "read_landmarks",
    "propose_landmarks",
    "propose_landmarks_for_sample",
    "read_registration_json",
    "registration_record",
    "set_he_registration",
    "transcripts_with_he_px",
    "transform_xy_columns",
    "write_alignment_csv",
    "write_bigwarp_csv",
    "write_keypoints_csv",
    "write_registration_json",
]
