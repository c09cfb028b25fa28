"""Register an H&E image to a Xenium run from landmark pairs (and/or automatic ones).

Fits the chosen model H&E px -> Xenium morphology px, prints each landmark's residual and
leave-one-out error (um: how well a point not used in the fit is placed), the RMSE and any
warnings, and writes Xenium's 3 x 3 alignment CSV plus a JSON record of the whole fit beside
it (``ALIGNMENT.registration.json``). Per-region and spline models are not one affine: the CSV
then holds the best single affine, and the JSON the full model (landmarks, regions, settings).

Landmark files: Xenium Explorer keypoints CSV (header fixedX,fixedY,alignmentX,alignmentY)
or BigWarp landmarks CSV (no header; moving = H&E px, fixed = Xenium morphology px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_morphomol._atomic import guard_output
from napari_morphomol.commands._arguments import real_number, whole_number
from napari_morphomol.commands._sample_inputs import input_paths
from napari_morphomol.errors import InputError
from napari_morphomol.registration import (
    REGISTRATION_MODELS,
    FitOptions,
    LandmarkPairs,
    read_landmarks,
    write_alignment_csv,
    write_bigwarp_csv,
    write_keypoints_csv,
    write_registration_json,
)
from napari_morphomol.registration.apply import REGISTRATION_JSON
from napari_morphomol.registration.auto import propose_landmarks_for_sample
from napari_morphomol.registration.formats import ALIGNMENT_CSV, BIGWARP_CSV, KEYPOINTS_CSV

NAME = "register"
HELP = "fit H&E px -> Xenium px from landmark pairs; print residuals (um), write alignment CSV"


def add_arguments(parser):
    parser.add_argument("xenium_dir", help="Xenium output folder (holds experiment.xenium)")
    parser.add_argument("--he", required=True, help="H&E image (pyramidal OME-TIFF/SVS/TIFF)")
    parser.add_argument("--landmarks", help="landmark pairs: Xenium Explorer keypoints CSV or BigWarp CSV")
    parser.add_argument("--auto", action="store_true", help="find landmark pairs automatically (DAPI vs hematoxylin)")
    parser.add_argument("--model", choices=tuple(REGISTRATION_MODELS), default="affine",
                        help="transform model (default: affine)")
    parser.add_argument("--robust", action="store_true",
                        help="RANSAC: leave out landmarks that miss by more than --outlier-um")
    parser.add_argument("--outlier-um", type=real_number(0.0, open_minimum=True, unit="um"), default=15.0,
                        help="robust fit outlier threshold in um (default 15)")
    parser.add_argument("--regions", type=whole_number(1), help="per-region model: number of automatic regions")
    parser.add_argument("--he-pixel-size-um", type=real_number(0.0, 1000.0, open_minimum=True, unit="um/px"),
                        help="H&E um/px when the image does not record it")
    parser.add_argument("--out", required=True, help="alignment CSV to write (3x3, H&E px -> Xenium px)")
    parser.add_argument("--save-landmarks", help="also write the landmark pairs used (e.g. the automatic ones)")
    parser.add_argument(
        "--landmarks-format", choices=("keypoints", "bigwarp"), default="keypoints",
        help="format of --save-landmarks (default: Xenium Explorer keypoints)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files that napari-morphomol wrote (never an input)")


def open_images(xenium_dir: str, he_path: str, he_pixel_size_um: float | None):
    """The sample's images and pixel sizes (the one place this command reads input data)."""
    from napari_morphomol.io.sample import load_sample

    return load_sample(xenium_dir, he_path, he_pixel_size_um=he_pixel_size_um)


def run(args) -> int:
    from napari_morphomol.registration.manual import fit_checked, sample_geometry

    if not args.landmarks and not args.auto:
        raise InputError("give landmark pairs (--landmarks FILE), ask for automatic ones (--auto), or both")
    out = Path(args.out)
    record_path = out.with_name(out.stem + ".registration.json")
    landmarks_kind = BIGWARP_CSV if args.landmarks_format == "bigwarp" else KEYPOINTS_CSV
    targets = [(out, ALIGNMENT_CSV), (record_path, REGISTRATION_JSON)]
    if args.save_landmarks:
        targets.append((Path(args.save_landmarks), landmarks_kind))
    if len({path.resolve() for path, _ in targets}) < len(targets):
        raise InputError(f"--save-landmarks {args.save_landmarks} is also --out or its record {record_path}; "
                         "give it its own name")
    inputs = input_paths(args)
    for path, kind in targets:
        guard_output(path, kind, inputs=inputs, overwrite=args.overwrite)
    sdata = open_images(args.xenium_dir, args.he, args.he_pixel_size_um)
    parts = []
    if args.landmarks:
        parts.append(read_landmarks(args.landmarks))
    if args.auto:
        auto = propose_landmarks_for_sample(sdata)
        print(
            f"automatic: rotation {auto.angle_deg:.2f} deg, coarse correlation {auto.coarse_correlation:.2f}, "
            f"{len(auto.pairs)} pairs proposed"
        )
        parts.append(auto.pairs)
    pairs = parts[0] if len(parts) == 1 else _concatenate(parts)
    options = FitOptions(args.model, robust=args.robust, outlier_threshold_um=args.outlier_um, n_regions=args.regions)
    fitted = fit_checked(pairs, options, sample_geometry(sdata), source=args.landmarks or "the automatic landmarks")
    table = fitted.quality_table()[["name", "used", "residual_um", "loo_um"]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:8.2f}", na_rep="     n/a"))
    finite = np.isfinite(fitted.loo_um)
    loo = f", leave-one-out median {np.median(fitted.loo_um[finite]):.2f} um" if finite.any() else ""
    print(f"model {fitted.model}: RMSE {fitted.rmse_um:.2f} um over {int(fitted.used.sum())} pairs{loo}")
    for warning in fitted.warnings:
        print(f"warning: {warning}")
    write_alignment_csv(out, fitted.best_affine, overwrite=args.overwrite, inputs=inputs)
    write_registration_json(record_path, fitted, overwrite=args.overwrite, inputs=inputs)
    if fitted.matrix is None:
        print(f"note: {out} holds the best single affine; the {fitted.model} model is in {record_path}")
    print(f"wrote {out} and {record_path}")
    if args.save_landmarks:
        writer = write_bigwarp_csv if args.landmarks_format == "bigwarp" else write_keypoints_csv
        writer(args.save_landmarks, pairs, overwrite=args.overwrite, inputs=inputs)
        print(f"wrote {args.save_landmarks}")
    return 0


def _concatenate(parts: list[LandmarkPairs]) -> LandmarkPairs:
    return LandmarkPairs.from_arrays(
        np.vstack([p.he_px for p in parts]),
        np.vstack([p.global_px for p in parts]),
        [n for p in parts for n in p.names],
        np.concatenate([p.active for p in parts]),
    )
