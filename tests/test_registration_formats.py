"""Landmark and matrix files: round trips, atomic writes, refusals, reversed-direction checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_morphomol.errors import InputError
from napari_morphomol.registration import (
    FitOptions,
    LandmarkPairs,
    check_direction,
    fit_transform,
    read_alignment_csv,
    read_bigwarp_csv,
    read_keypoints_csv,
    read_landmarks,
    write_alignment_csv,
    write_bigwarp_csv,
    write_keypoints_csv,
)

TRUTH = np.array([[1.2841, 0.0312, 812.25], [-0.0298, 1.2853, -431.5], [0.0, 0.0, 1.0]])


def example_pairs(n: int = 7, seed: int = 0) -> LandmarkPairs:
    rng = np.random.default_rng(seed)
    he = rng.uniform(0, 20000, (n, 2))
    glob = he @ TRUTH[:2, :2].T + TRUTH[:2, 2] + rng.normal(0, 2.0, (n, 2))
    return LandmarkPairs.from_arrays(he, glob)


coordinates = arrays(np.float64, (6, 2), elements=st.floats(-1e6, 1e6, allow_nan=False))


@settings(max_examples=30, deadline=None)
@given(he=coordinates, glob=coordinates)
def test_keypoints_round_trip_is_exact(tmp_path_factory, he, glob):
    path = tmp_path_factory.mktemp("kp") / "keypoints.csv"
    pairs = LandmarkPairs.from_arrays(he, glob)
    write_keypoints_csv(path, pairs)
    assert read_keypoints_csv(path).same_as(pairs)


def test_keypoints_file_layout_matches_xenium_explorer(tmp_path):
    path = tmp_path / "keypoints.csv"
    path.write_text("fixedX,fixedY,alignmentX,alignmentY\n100.5,200.25,10,20\n300,400,30,40\n")
    pairs = read_keypoints_csv(path)
    np.testing.assert_array_equal(pairs.global_px, [[100.5, 200.25], [300, 400]])
    np.testing.assert_array_equal(pairs.he_px, [[10, 20], [30, 40]])


def test_keypoints_writer_drops_inactive_pairs(tmp_path):
    pairs = example_pairs().with_active([True, False, True, True, True, True, True])
    write_keypoints_csv(tmp_path / "k.csv", pairs)
    back = read_keypoints_csv(tmp_path / "k.csv")
    assert len(back) == 6
    np.testing.assert_array_equal(back.he_px, pairs.he_px[pairs.active])


@pytest.mark.parametrize("model", ["affine", "similarity", "per-region"])
def test_files_read_back_to_the_same_transform(tmp_path, model):
    pairs = example_pairs(12)
    fitted = fit_transform(pairs, FitOptions(model), leave_one_out=False)
    write_keypoints_csv(tmp_path / "k.csv", pairs)
    write_bigwarp_csv(tmp_path / "b.csv", pairs)
    write_alignment_csv(tmp_path / "m.csv", fitted.best_affine)
    probe = np.random.default_rng(1).uniform(0, 20000, (100, 2))
    for path in ("k.csv", "b.csv"):
        again = fit_transform(read_landmarks(tmp_path / path), FitOptions(model), leave_one_out=False)
        np.testing.assert_allclose(again.apply_xy(probe), fitted.apply_xy(probe), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(read_alignment_csv(tmp_path / "m.csv"), fitted.best_affine)


@settings(max_examples=30, deadline=None)
@given(values=arrays(np.float64, (2, 3), elements=st.floats(-1e5, 1e5, allow_nan=False)))
def test_alignment_matrix_round_trip_is_exact(tmp_path_factory, values):
    m = np.vstack([values, [0.0, 0.0, 1.0]])
    m[0, 0] += 1e6  # keep it invertible
    m[1, 1] += 1e6
    path = tmp_path_factory.mktemp("m") / "he_imagealignment.csv"
    write_alignment_csv(path, m)
    np.testing.assert_array_equal(read_alignment_csv(path), m)


def test_bigwarp_round_trip_keeps_names_and_active_flags(tmp_path):
    pairs = LandmarkPairs.from_arrays(
        example_pairs(3).he_px, example_pairs(3).global_px, ["Pt-0", "gland tip", "Pt-2"], [True, False, True]
    )
    path = tmp_path / "landmarks.csv"
    write_bigwarp_csv(path, pairs)
    assert path.read_text().splitlines()[1].startswith('"gland tip","false",')
    assert read_bigwarp_csv(path).same_as(pairs)


def test_bigwarp_columns_are_moving_he_then_fixed_global(tmp_path):
    path = tmp_path / "bw.csv"
    path.write_text('"Pt-0","true","1.5","2.5","10.0","20.0"\n"Pt-1","false","3","4","30","40"\n')
    pairs = read_bigwarp_csv(path)
    np.testing.assert_array_equal(pairs.he_px, [[1.5, 2.5], [3, 4]])
    np.testing.assert_array_equal(pairs.global_px, [[10, 20], [30, 40]])
    assert pairs.active.tolist() == [True, False]


@pytest.mark.parametrize(
    "text, message",
    [
        ('"Pt-0","true","1","2","3","4","5","6"\n', "3-D"),
        ('"Pt-0","true","1","2","3"\n', "6"),
        ('"Pt-0","yes","1","2","3","4"\n', "neither true nor false"),
        ('"Pt-0","true","1","x","3","4"\n', "expected numbers"),
    ],
)
def test_bad_bigwarp_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_bigwarp_csv(path)


def test_bad_keypoints_and_matrix_files_say_what_is_wrong(tmp_path):
    (tmp_path / "k.csv").write_text("x,y,u,v\n1,2,3,4\n")
    with pytest.raises(InputError, match="fixedX,fixedY,alignmentX,alignmentY"):
        read_keypoints_csv(tmp_path / "k.csv")
    (tmp_path / "m.csv").write_text("1,0,0\n0,1,0\n")
    with pytest.raises(InputError, match="3 x 3"):
        read_alignment_csv(tmp_path / "m.csv")
    (tmp_path / "s.csv").write_text("1,2,0\n2,4,0\n0,0,1\n")
    with pytest.raises(InputError, match="singular"):
        read_alignment_csv(tmp_path / "s.csv")
    with pytest.raises(InputError, match="not found"):
        read_landmarks(tmp_path / "missing.csv")


def test_writers_never_overwrite_unless_asked_and_leave_no_temp_files(tmp_path):
    path = tmp_path / "alignment.csv"
    write_alignment_csv(path, TRUTH)
    with pytest.raises(InputError, match="already exists"):
        write_alignment_csv(path, np.eye(3))
    np.testing.assert_array_equal(read_alignment_csv(path), TRUTH)
    write_alignment_csv(path, np.eye(3), overwrite=True)
    np.testing.assert_array_equal(read_alignment_csv(path), np.eye(3))
    with pytest.raises(InputError, match="already exists"):
        write_keypoints_csv(path, example_pairs())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alignment.csv"]


def test_reversed_direction_is_detected_by_scale_and_footprint():
    he_size, global_size = (24000.0, 20000.0), (31000.0, 26000.0)
    check_direction(TRUTH, he_size_xy=he_size, global_size_xy=global_size, he_pixel_size_um=0.273)
    reversed_matrix = np.linalg.inv(TRUTH)
    with pytest.raises(InputError, match="reversed.*pixel-size ratio"):
        check_direction(reversed_matrix, he_pixel_size_um=0.273, source="keypoints.csv")
    # an H&E crop placed deep inside a large Xenium image lands off it when read reversed
    crop = TRUTH.copy()
    crop[:2, 2] = 15000.0, 12000.0
    small_he = (10000.0, 8000.0)
    check_direction(crop, he_size_xy=small_he, global_size_xy=global_size)
    with pytest.raises(InputError, match="reversed.*overlap"):
        check_direction(np.linalg.inv(crop), he_size_xy=small_he, global_size_xy=global_size)


def test_swapped_landmark_file_is_caught_through_its_fit():
    pairs = example_pairs(8)
    swapped = fit_transform(pairs.swapped(), FitOptions("affine"), leave_one_out=False)
    with pytest.raises(InputError, match="Swap the two sides"):
        check_direction(swapped.matrix, he_pixel_size_um=0.273)
