"""Registration scored against the synthetic samples' ground truth, and the CLI end to end."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from napari_morphomol.cli import main
from napari_morphomol.io.sample import load_sample
from napari_morphomol.registration import (
    FitOptions,
    LandmarkPairs,
    fit_transform,
    read_alignment_csv,
    read_keypoints_csv,
    read_registration_json,
    transform_xy_columns,
    write_keypoints_csv,
)
from napari_morphomol.registration.auto import propose_landmarks_for_sample
from napari_morphomol.synthetic import load_ground_truth, true_global_to_he_px, true_he_to_global_px


def transcripts_global_px(sample, ground_truth) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(sample.xenium_dir / "transcripts.parquet", columns=["x_location", "y_location"])
    px = ground_truth.xenium_pixel_size_um
    return table["x_location"].to_numpy() / px, table["y_location"].to_numpy() / px


def displacement_um(fitted, sample, ground_truth) -> np.ndarray:
    """How far each transcript lands from where it truly belongs, mapped into H&E px and back."""
    gx, gy = transcripts_global_px(sample, ground_truth)
    hx, hy = transform_xy_columns(fitted, gx, gy, inverse=True)
    back = true_he_to_global_px(np.column_stack([hx, hy]), ground_truth)
    return np.hypot(back[:, 0] - gx, back[:, 1] - gy) * ground_truth.xenium_pixel_size_um


def clicked_pairs(ground_truth, per_side: tuple[int, int], noise_px: float, seed: int) -> LandmarkPairs:
    """Landmarks on a grid over the Xenium image, both sides clicked with Gaussian noise."""
    rng = np.random.default_rng(seed)
    height, width = ground_truth.morphology_shape
    gx, gy = np.meshgrid(np.linspace(0.1, 0.9, per_side[0]) * width, np.linspace(0.1, 0.9, per_side[1]) * height)
    glob = np.column_stack([gx.ravel(), gy.ravel()])
    he = true_global_to_he_px(glob, ground_truth)
    return LandmarkPairs.from_arrays(he + rng.normal(0, noise_px, he.shape), glob + rng.normal(0, noise_px, he.shape))


def test_six_clicked_pairs_give_an_affine_within_1um(synthetic_sample):
    truth = load_ground_truth(synthetic_sample.ground_truth_json)
    fitted = fit_transform(clicked_pairs(truth, (3, 2), noise_px=2.0, seed=0), FitOptions("affine"))
    error = displacement_um(fitted, synthetic_sample, truth)
    assert np.median(error) < 1.0
    assert fitted.warnings == ()


def test_per_region_beats_a_single_affine_twice_on_the_deformed_sample(synthetic_sample_deformed):
    truth = load_ground_truth(synthetic_sample_deformed.ground_truth_json)
    pairs = clicked_pairs(truth, (6, 6), noise_px=2.0, seed=0)
    single = np.median(displacement_um(fit_transform(pairs, FitOptions("affine")), synthetic_sample_deformed, truth))
    regions = fit_transform(pairs, FitOptions("per-region"))
    per_region = np.median(displacement_um(regions, synthetic_sample_deformed, truth))
    assert per_region * 2 < single
    assert len(regions.transform.region_matrices) >= 4


@pytest.mark.parametrize("which", ["synthetic_sample", "synthetic_sample_deformed"])
def test_automatic_registration_lands_within_20um(request, which):
    sample = request.getfixturevalue(which)
    truth = load_ground_truth(sample.ground_truth_json)
    auto = propose_landmarks_for_sample(load_sample(sample.xenium_dir, sample.he_path))
    fitted = fit_transform(auto.pairs, FitOptions("affine"))
    error = displacement_um(fitted, sample, truth)
    assert error.max() < 20.0
    assert len(auto.pairs) >= 3


def test_cli_fits_keypoints_prints_quality_and_writes_the_alignment(synthetic_sample, tmp_path, capsys):
    truth = load_ground_truth(synthetic_sample.ground_truth_json)
    out = tmp_path / "alignment.csv"
    argv = [
        "register", str(synthetic_sample.xenium_dir), "--he", str(synthetic_sample.he_path),
        "--landmarks", str(synthetic_sample.keypoints_csv), "--out", str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "RMSE" in printed and "leave-one-out" in printed and "Pt-11" in printed
    matrix = read_alignment_csv(out)
    fitted = read_registration_json(tmp_path / "alignment.registration.json")
    np.testing.assert_allclose(fitted.matrix, matrix, rtol=0, atol=1e-9)
    assert np.median(displacement_um(fitted, synthetic_sample, truth)) < 1.0
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_refuses_a_keypoints_file_with_swapped_sides(synthetic_sample, tmp_path, capsys):
    swapped = tmp_path / "swapped.csv"
    write_keypoints_csv(swapped, read_keypoints_csv(synthetic_sample.keypoints_csv).swapped())
    code = main([
        "register", str(synthetic_sample.xenium_dir), "--he", str(synthetic_sample.he_path),
        "--landmarks", str(swapped), "--out", str(tmp_path / "a.csv"),
    ])
    assert code == 2
    assert "reversed" in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists()


def test_cli_per_region_with_automatic_pairs_saves_them(synthetic_sample_deformed, tmp_path, capsys):
    out = tmp_path / "alignment.csv"
    code = main([
        "register", str(synthetic_sample_deformed.xenium_dir), "--he", str(synthetic_sample_deformed.he_path),
        "--auto", "--landmarks", str(synthetic_sample_deformed.keypoints_csv), "--model", "per-region",
        "--out", str(out), "--save-landmarks", str(tmp_path / "pairs.csv"), "--landmarks-format", "bigwarp",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "automatic: rotation" in printed and "auto-0" in printed
    assert "best single affine" in printed
    assert read_registration_json(tmp_path / "alignment.registration.json").model == "per-region"
    assert (tmp_path / "pairs.csv").read_text().startswith('"Pt-0","true"')
