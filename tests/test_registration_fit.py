"""Transform fitting: recovery, inverses, quality figures and warnings, on synthetic point sets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.errors import InputError
from napari_morphomol.registration import FitOptions, LandmarkPairs, fit_transform

PX_UM = 0.2125


def affine_matrix(scale=1.3, angle_deg=7.0, shear=0.0, aniso=1.0, tx=250.0, ty=-120.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    lin = scale * rot @ np.array([[aniso, shear], [0.0, 1.0 / aniso]])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = tx, ty
    return m


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:2, :2].T + m[:2, 2]


def spread_points(n: int, seed: int = 0, size: float = 8000.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, size, (n, 2))


# ----------------------------------------------------------------------------- recovery


@pytest.mark.parametrize(
    "model, truth",
    [
        ("translation", affine_matrix(scale=1.0, angle_deg=0.0)),
        ("similarity", affine_matrix(scale=1.29, angle_deg=-12.0)),
        ("affine", affine_matrix(scale=1.29, angle_deg=3.0, shear=0.03, aniso=1.02)),
    ],
)
def test_global_models_recover_exact_transform(model, truth):
    he = spread_points(8)
    fitted = fit_transform(LandmarkPairs.from_arrays(he, apply(truth, he)), FitOptions(model))
    np.testing.assert_allclose(fitted.matrix, truth, atol=1e-8)
    assert fitted.rmse_um < 1e-6
    assert np.nanmax(fitted.loo_um) < 1e-6


well_conditioned = st.fixed_dictionaries(
    {
        "scale": st.floats(0.5, 3.0),
        "angle_deg": st.floats(-180, 180),
        "shear": st.floats(-0.2, 0.2),
        "aniso": st.floats(0.8, 1.25),
        "tx": st.floats(-1e4, 1e4),
        "ty": st.floats(-1e4, 1e4),
    }
)


@settings(max_examples=40, deadline=None)
@given(params=well_conditioned, seed=st.integers(0, 2**16))
def test_fit_of_applied_affine_recovers_it(params, seed):
    truth = affine_matrix(**params)
    he = spread_points(5, seed)
    fitted = fit_transform(LandmarkPairs.from_arrays(he, apply(truth, he)), FitOptions("affine"), leave_one_out=False)
    np.testing.assert_allclose(fitted.matrix, truth, rtol=1e-7, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(params=well_conditioned, seed=st.integers(0, 2**16))
def test_fit_of_applied_similarity_recovers_it(params, seed):
    truth = affine_matrix(**{**params, "shear": 0.0, "aniso": 1.0})
    he = spread_points(4, seed)
    fitted = fit_transform(LandmarkPairs.from_arrays(he, apply(truth, he)), FitOptions("similarity"),
                           leave_one_out=False)
    np.testing.assert_allclose(fitted.matrix, truth, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("model", ["affine", "similarity", "per-region", "tps"])
@settings(max_examples=15, deadline=None)
@given(params=well_conditioned, seed=st.integers(0, 2**16))
def test_inverse_composes_to_identity(model, params, seed):
    rng = np.random.default_rng(seed)
    truth = affine_matrix(**params)
    he = spread_points(18, seed)
    glob = apply(truth, he) + rng.normal(0, 5.0, he.shape)
    fitted = fit_transform(LandmarkPairs.from_arrays(he, glob), FitOptions(model), leave_one_out=False)
    pts = rng.uniform(-1000, 9000, (500, 2))
    np.testing.assert_allclose(fitted.inverse_apply_xy(fitted.apply_xy(pts)), pts, atol=1e-5)
    glob_pts = fitted.apply_xy(pts)
    np.testing.assert_allclose(fitted.apply_xy(fitted.inverse_apply_xy(glob_pts)), glob_pts, atol=1e-5)


# ----------------------------------------------------------------------------- quality


def test_residuals_and_leave_one_out_are_in_um_and_match_a_manual_refit():
    rng = np.random.default_rng(3)
    truth = affine_matrix()
    he = spread_points(7, 3)
    glob = apply(truth, he) + rng.normal(0, 2.0, he.shape)
    pairs = LandmarkPairs.from_arrays(he, glob)
    fitted = fit_transform(pairs, FitOptions("affine"), xenium_pixel_size_um=PX_UM)
    expected_res = np.linalg.norm(fitted.apply_xy(he) - glob, axis=1) * PX_UM
    np.testing.assert_allclose(fitted.residuals_um, expected_res)
    assert fitted.rmse_um == pytest.approx(np.sqrt(np.mean(expected_res**2)))
    keep = np.arange(7) != 2
    refit = fit_transform(LandmarkPairs.from_arrays(he[keep], glob[keep]), FitOptions("affine"), leave_one_out=False)
    manual = np.linalg.norm(refit.apply_xy(he[2:3]) - glob[2:3]) * PX_UM
    assert fitted.loo_um[2] == pytest.approx(manual)
    assert np.all(fitted.loo_um >= fitted.residuals_um - 1e-9)


def test_inactive_pair_is_not_used_but_keeps_a_residual():
    truth = affine_matrix()
    he = spread_points(6)
    glob = apply(truth, he)
    glob[4] += [400.0, 0.0]
    pairs = LandmarkPairs.from_arrays(he, glob, active=[True, True, True, True, False, True])
    fitted = fit_transform(pairs, FitOptions("affine"))
    np.testing.assert_allclose(fitted.matrix, truth, atol=1e-8)
    assert not fitted.used[4]
    assert fitted.residuals_um[4] == pytest.approx(400.0 * PX_UM)
    assert np.isnan(fitted.loo_um[4])


def test_robust_fit_flags_the_outlier_by_name():
    truth = affine_matrix()
    he = spread_points(10, 5)
    glob = apply(truth, he) + np.random.default_rng(5).normal(0, 1.0, he.shape)
    glob[7] += [300.0, -200.0]
    plain = fit_transform(LandmarkPairs.from_arrays(he, glob), FitOptions("affine"))
    assert any("Pt-7 disagrees" in w for w in plain.warnings)
    robust = fit_transform(LandmarkPairs.from_arrays(he, glob), FitOptions("affine", robust=True))
    assert robust.outliers.tolist() == [i == 7 for i in range(10)]
    assert any("Pt-7" in w and "robust" in w for w in robust.warnings)
    assert robust.rmse_um < 1.0 < plain.rmse_um


@pytest.mark.parametrize("model, need", [("translation", 1), ("similarity", 2), ("affine", 3), ("tps", 3)])
def test_too_few_pairs_says_how_many_the_model_needs(model, need):
    he = spread_points(need - 1) if need > 1 else np.empty((0, 2))
    pairs = LandmarkPairs.from_arrays(he, he)
    with pytest.raises(InputError, match=f"needs at least {need} active"):
        fit_transform(pairs, FitOptions(model))


def test_unknown_model_and_mismatched_arrays_are_input_errors():
    he = spread_points(4)
    with pytest.raises(InputError, match="unknown registration model"):
        fit_transform(LandmarkPairs.from_arrays(he, he), FitOptions("projective"))
    with pytest.raises(InputError, match="every landmark needs both"):
        LandmarkPairs.from_arrays(he, he[:3])
    with pytest.raises(InputError, match="NaN"):
        LandmarkPairs.from_arrays(he, np.where(he > 7000, np.nan, he))


def test_collinear_landmarks_are_warned_about():
    t = np.linspace(0, 5000, 6)
    he = np.column_stack([t, 0.5 * t + np.array([0, 3, -2, 1, 0, -1])])
    fitted = fit_transform(LandmarkPairs.from_arrays(he, apply(affine_matrix(), he)), FitOptions("affine"))
    assert any("one line" in w for w in fitted.warnings)


def test_mirror_extreme_scale_and_shear_are_warned_about():
    he = spread_points(6)
    mirror = np.diag([-1.3, 1.3, 1.0])
    fitted = fit_transform(LandmarkPairs.from_arrays(he, apply(mirror, he)), FitOptions("affine"))
    assert any("mirrors" in w for w in fitted.warnings)
    huge = np.diag([40.0, 40.0, 1.0])
    assert any("extreme" in w for w in fit_transform(LandmarkPairs.from_arrays(he, apply(huge, he))).warnings)
    sheared = affine_matrix(shear=0.4)
    assert any("stretches" in w for w in fit_transform(LandmarkPairs.from_arrays(he, apply(sheared, he))).warnings)
    clean = fit_transform(LandmarkPairs.from_arrays(he, apply(affine_matrix(scale=1.2847), he)), he_pixel_size_um=0.273)
    assert clean.warnings == ()
    wrong_size = fit_transform(LandmarkPairs.from_arrays(he, apply(affine_matrix(), he)), he_pixel_size_um=0.5)
    assert any("pixel-size ratio" in w for w in wrong_size.warnings)


# ----------------------------------------------------------------------------- per-region


def piecewise_truth(pts: np.ndarray) -> np.ndarray:
    """Left and right halves with different affines, joined smoothly over a 600 px band."""
    left = affine_matrix(angle_deg=2.0)
    right = affine_matrix(angle_deg=3.5, scale=1.32, tx=230.0)
    s = np.clip((pts[:, 0] - 3700.0) / 600.0, 0.0, 1.0)[:, None]
    s = s * s * (3 - 2 * s)
    return (1 - s) * apply(left, pts) + s * apply(right, pts)


def test_per_region_beats_single_affine_on_a_piecewise_deformation():
    rng = np.random.default_rng(11)
    he = spread_points(24, 11)
    pairs = LandmarkPairs.from_arrays(he, piecewise_truth(he) + rng.normal(0, 1.0, he.shape))
    test_pts = spread_points(5000, 12)
    truth = piecewise_truth(test_pts)
    err = {}
    for model in ("affine", "per-region"):
        fitted = fit_transform(pairs, FitOptions(model, n_regions=2 if model == "per-region" else None))
        err[model] = np.median(np.linalg.norm(fitted.apply_xy(test_pts) - truth, axis=1))
    assert err["per-region"] * 2 < err["affine"]


def test_per_region_blend_is_continuous_across_borders():
    he = spread_points(24, 11)
    fitted = fit_transform(LandmarkPairs.from_arrays(he, piecewise_truth(he)), FitOptions("per-region", n_regions=4))
    line = np.column_stack([np.linspace(0, 8000, 80001), np.full(80001, 4000.0)])
    steps = np.linalg.norm(np.diff(fitted.apply_xy(line), axis=0), axis=1)
    # 0.1 px apart in H&E: a smooth map moves neighbours by about scale * 0.1 px, never jumps
    assert steps.max() < 0.2
    assert len(fitted.transform.region_matrices) == 4


def test_per_region_with_polygons_uses_their_affines_inside_and_blends_between():
    he = spread_points(30, 4)
    halves = [
        np.array([[0, 0], [3950, 0], [3950, 8000], [0, 8000]], dtype=float),
        np.array([[3950, 0], [8000, 0], [8000, 8000], [3950, 8000]], dtype=float),
    ]
    fitted = fit_transform(LandmarkPairs.from_arrays(he, piecewise_truth(he)), FitOptions("per-region",
                                                                                          region_polygons_he_px=halves))
    tr = fitted.transform
    probe = np.array([[500.0, 4000.0], [7500.0, 4000.0], [3950.0, 4000.0]])
    w = tr.weights(probe[:, 0], probe[:, 1])
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    assert w[0, 0] > 0.99 and w[1, 1] > 0.99 and 0.3 < w[0, 2] < 0.7
    test_pts = spread_points(3000, 8)
    err_region = np.median(np.linalg.norm(fitted.apply_xy(test_pts) - piecewise_truth(test_pts), axis=1))
    err_affine = np.median(
        np.linalg.norm(fit_transform(fitted.pairs).apply_xy(test_pts) - piecewise_truth(test_pts), axis=1)
    )
    assert err_region * 2 < err_affine
    assert fitted.matrix is None and fitted.best_affine.shape == (3, 3)


def test_too_many_automatic_regions_for_the_landmarks_is_an_input_error():
    he = spread_points(8)
    with pytest.raises(InputError, match="3 per region"):
        fit_transform(LandmarkPairs.from_arrays(he, he), FitOptions("per-region", n_regions=3))


def test_region_polygons_need_the_per_region_model():
    he = spread_points(8)
    square = np.array([[0, 0], [1, 0], [1, 1]], dtype=float)
    with pytest.raises(InputError, match="per-region"):
        fit_transform(LandmarkPairs.from_arrays(he, he), FitOptions("affine", region_polygons_he_px=[square]))


def test_number_of_regions_needs_the_per_region_model():
    he = spread_points(8)
    with pytest.raises(InputError, match="only applies to the per-region"):
        fit_transform(LandmarkPairs.from_arrays(he, he), FitOptions("affine", n_regions=2))
