"""The bulk inverse of per-region and spline registrations: an inverse grid read bilinearly.

Checked against the exact Newton inverse over random fits (everywhere inside the grid, near region
borders, off the grid), and for what the grid must not change: records, forward maps, dtypes.
Polygon regions are solved exactly by compiled Newton steps instead, checked against numpy's."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from napari_morphomol.errors import InputError
from napari_morphomol.registration import (
    FitOptions,
    LandmarkPairs,
    fit_transform,
    read_registration_json,
    registration_record,
    transform_xy_columns,
    transforms,
    write_registration_json,
)
from napari_morphomol.registration.transforms import INVERSE_GRID_TOLERANCE_PX, InverseGrid

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
"""Each example builds a grid; a failing one is reported as found (shrinking took minutes)."""

fits = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "n": st.integers(12, 48),
        "size_px": st.floats(3000.0, 40000.0),
        "scale": st.floats(0.8, 2.0),
        "angle_deg": st.floats(-180.0, 180.0),
        "warp_px": st.floats(0.0, 40.0),
        "wavelength_px": st.floats(1500.0, 12000.0),
        "noise_px": st.floats(0.0, 5.0),
        "n_regions": st.one_of(st.none(), st.integers(2, 4)),
    }
)


def landmarks(seed, n, size_px, scale, angle_deg, warp_px, wavelength_px, noise_px, **_) -> LandmarkPairs:
    rng = np.random.default_rng(seed)
    he = rng.uniform(0, size_px, (n, 2))
    a = np.deg2rad(angle_deg)
    linear = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    glob = he @ linear.T + [812.0, -431.0] + warp_px * np.sin(he[:, ::-1] / wavelength_px)
    return LandmarkPairs.from_arrays(he, glob + rng.normal(0, noise_px, he.shape) if noise_px else glob)


def grid_box(grid: InverseGrid) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corners of the grid, in global px."""
    rows, cols = grid.nodes_he_px.shape[:2]
    origin = np.array(grid.origin_global_px)
    return origin, origin + grid.pitch_global_px * np.array([cols - 1, rows - 1])


def errors_px(fitted, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    hx, hy = transform_xy_columns(fitted, gx, gy, inverse=True)
    exact = fitted.inverse_apply_xy(np.column_stack([gx, gy]))
    return np.hypot(hx - exact[:, 0], hy - exact[:, 1])


def border_points_global(fitted, rng, per_pair: int = 200) -> np.ndarray:
    """Points on the bisectors between region centres (where the blend changes fastest), in global px."""
    centres = np.asarray(fitted.transform.weights.centres_he_px)
    points = []
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            mid, along = 0.5 * (centres[i] + centres[j]), centres[j] - centres[i]
            across = np.array([-along[1], along[0]])
            t = rng.uniform(-1.5, 1.5, per_pair)[:, None]
            off = rng.normal(0, 0.05, per_pair)[:, None]
            points.append(mid + t * across + off * along)
    return fitted.apply_xy(np.vstack(points))


def check_against_exact(fitted, seed: int) -> InverseGrid:
    grid = fitted.transform.inverse_grid()
    assert isinstance(grid, InverseGrid)
    assert grid.max_error_px <= transforms.INVERSE_GRID_CHECK_FRACTION * INVERSE_GRID_TOLERANCE_PX
    rng = np.random.default_rng(seed)
    lo, hi = grid_box(grid)
    inside = rng.uniform(lo, hi, (20_000, 2))
    assert errors_px(fitted, inside[:, 0], inside[:, 1]).max() <= INVERSE_GRID_TOLERANCE_PX
    # off the grid: solved exactly (by the same Newton steps, which stop where a step is below their tolerance)
    span = hi - lo
    outside = np.vstack([lo - rng.uniform(0.01, 0.3, (500, 2)) * span, hi + rng.uniform(0.01, 0.3, (500, 2)) * span])
    assert errors_px(fitted, outside[:, 0], outside[:, 1]).max() <= transforms.INVERSE_TOLERANCE_PX
    return grid


@settings(max_examples=25, deadline=None, phases=NO_SHRINK)
@given(fit=fits)
def test_soft_voronoi_grid_stays_within_tolerance_everywhere(fit):
    options = FitOptions("per-region", n_regions=fit["n_regions"])
    fitted = fit_transform(landmarks(**fit), options, leave_one_out=False)
    check_against_exact(fitted, fit["seed"])
    border = border_points_global(fitted, np.random.default_rng(fit["seed"]))
    assert errors_px(fitted, border[:, 0], border[:, 1]).max() <= INVERSE_GRID_TOLERANCE_PX


@settings(max_examples=10, deadline=None, phases=NO_SHRINK)
@given(fit=fits, cuts=st.lists(st.floats(0.2, 0.8), min_size=1, max_size=3, unique=True))
def test_polygon_region_grid_stays_within_tolerance_everywhere(fit, cuts):
    size = fit["size_px"]
    edges = [0.0, *sorted(c * size for c in cuts), size]
    strips = [((x0, 0.0), (x1, 0.0), (x1, size), (x0, size)) for x0, x1 in zip(edges[:-1], edges[1:])]
    fitted = fit_transform(landmarks(**fit), FitOptions("per-region", region_polygons_he_px=strips),
                           leave_one_out=False)
    assert fitted.transform.inverse_grid() is None
    rng = np.random.default_rng(fit["seed"])
    lo, hi = fitted.transform.weights.extent_he_px
    # everywhere, across the strips' borders, and beyond the weight grid
    he = np.vstack([rng.uniform(lo - 0.3 * (hi - lo), hi + 0.3 * (hi - lo), (5000, 2)),
                    np.column_stack([np.repeat(edges[1:-1], 500) + rng.normal(0, 0.05 * size, 500 * len(cuts)),
                                     rng.uniform(0, size, 500 * len(cuts))])])
    glob = fitted.apply_xy(he)
    assert errors_px(fitted, glob[:, 0], glob[:, 1]).max() <= transforms.INVERSE_TOLERANCE_PX


def test_smooth_thin_plate_spline_grid_stays_within_tolerance():
    pairs = landmarks(seed=3, n=16, size_px=6000.0, scale=1.3, angle_deg=5.0, warp_px=10.0, wavelength_px=4000.0,
                      noise_px=0.0)
    fitted = fit_transform(pairs, FitOptions("tps"), leave_one_out=False)
    check_against_exact(fitted, seed=3)


def benchmark_like_fit():
    pairs = landmarks(seed=0, n=36, size_px=40000 / 1.3, scale=1.285, angle_deg=-1.3, warp_px=15.0,
                      wavelength_px=3000.0, noise_px=0.0)
    return fit_transform(pairs, FitOptions("per-region"), leave_one_out=False)


def test_grid_is_small_and_float32_columns_read_as_their_float64_values():
    fitted = benchmark_like_fit()
    grid = fitted.transform.inverse_grid()
    assert grid.nbytes < 10e6
    lo, hi = grid_box(grid)
    pts = np.random.default_rng(0).uniform(lo, hi, (10_000, 2)).astype(np.float32)
    x32, y32 = transform_xy_columns(fitted, pts[:, 0], pts[:, 1], inverse=True)
    x64, y64 = transform_xy_columns(fitted, pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64), inverse=True)
    assert x32.dtype == np.float64
    np.testing.assert_array_equal(x32, x64)
    np.testing.assert_array_equal(y32, y64)


def test_grid_is_built_once_per_transform_even_from_many_threads(monkeypatch):
    fitted = benchmark_like_fit()
    builds = []
    build = type(fitted.transform)._build_inverse_grid

    def counted(self):
        builds.append(threading.get_ident())
        return build(self)

    monkeypatch.setattr(type(fitted.transform), "_build_inverse_grid", counted)
    with ThreadPoolExecutor(4) as pool:
        grids = list(pool.map(lambda _: fitted.transform.inverse_grid(), range(8)))
    assert len(builds) == 1
    assert all(g is grids[0] for g in grids)


def test_grid_changes_no_record(tmp_path):
    fitted = benchmark_like_fit()
    before = json.dumps(registration_record(fitted))
    first = write_registration_json(tmp_path / "before.json", fitted).read_bytes()
    transform_xy_columns(fitted, np.array([1000.0, 2000.0]), np.array([3000.0, 4000.0]), inverse=True)
    assert fitted.transform.inverse_grid() is not None
    assert json.dumps(registration_record(fitted)) == before
    assert write_registration_json(tmp_path / "after.json", fitted).read_bytes() == first
    again = read_registration_json(tmp_path / "after.json")
    read_back = json.dumps(registration_record(again))
    assert again.transform.inverse_grid() is not None
    assert json.dumps(registration_record(again)) == read_back


def test_forward_maps_and_exact_inverse_do_not_use_the_grid():
    fitted = benchmark_like_fit()
    pts = np.random.default_rng(1).uniform(0, 30000, (5000, 2))
    forward = transform_xy_columns(fitted, pts[:, 0], pts[:, 1])
    exact = transform_xy_columns(fitted, pts[:, 0], pts[:, 1], inverse=True, exact=True)
    assert "_inverse_grid" not in vars(fitted.transform)
    np.testing.assert_allclose(np.column_stack(forward), fitted.apply_xy(pts), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.column_stack(exact), fitted.inverse_apply_xy(pts), rtol=0, atol=1e-7)


def test_a_model_the_grid_cannot_follow_is_inverted_exactly(monkeypatch):
    monkeypatch.setattr(transforms, "INVERSE_GRID_MAX_CELLS", 64)
    fitted = benchmark_like_fit()
    assert fitted.transform.inverse_grid() is None
    pts = np.random.default_rng(2).uniform(0, 40000, (5000, 2))
    hx, hy = transform_xy_columns(fitted, pts[:, 0], pts[:, 1], inverse=True)
    np.testing.assert_allclose(np.column_stack([hx, hy]), fitted.inverse_apply_xy(pts), rtol=0,
                               atol=transforms.INVERSE_TOLERANCE_PX)


def test_polygon_regions_whose_start_grid_fails_start_every_point_at_the_best_affine(monkeypatch):
    """Where the exact inverse fails somewhere on the start grid's extent (a fold far from the
    points), the bulk inverse still solves the points, each started from the best affine."""

    def folds(*_):
        raise InputError("the exact inverse did not converge")

    size = 12000.0
    strips = [((0.0, 0.0), (5000.0, 0.0), (5000.0, size), (0.0, size)),
              ((5000.0, 0.0), (size, 0.0), (size, size), (5000.0, size))]
    pairs = landmarks(seed=5, n=24, size_px=size, scale=1.2, angle_deg=20.0, warp_px=20.0, wavelength_px=3000.0,
                      noise_px=1.0)
    fitted = fit_transform(pairs, FitOptions("per-region", region_polygons_he_px=strips), leave_one_out=False)
    monkeypatch.setattr(type(fitted.transform), "_grid_with_measured_error", folds)
    he = np.random.default_rng(5).uniform(-0.2 * size, 1.2 * size, (3000, 2))
    glob = fitted.apply_xy(he)
    hx, hy = transform_xy_columns(fitted, glob[:, 0], glob[:, 1], inverse=True)
    assert vars(fitted.transform)["_polygon_start"][0] is None
    np.testing.assert_allclose(np.column_stack([hx, hy]), fitted.inverse_apply_xy(glob), rtol=0,
                               atol=transforms.INVERSE_TOLERANCE_PX)
