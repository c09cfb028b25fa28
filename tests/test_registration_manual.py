"""Headless steps behind the registration widget: pairing, checks, undo history, placement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spatialdata.transformations import get_transformation

from napari_morphomol.coords import GLOBAL, apply_affine_xy, layer_affine_um, napari_affine, scale_matrix
from napari_morphomol.elements import HE_IMAGE, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.io.sample import load_sample
from napari_morphomol.registration import REGISTRATION_ATTRS_KEY, read_alignment_csv, read_keypoints_csv
from napari_morphomol.registration.manual import (
    RegistrationHistory,
    SampleGeometry,
    fit_landmark_points,
    landmark_pairs_from_points,
    moved_layer_affine,
    sample_geometry,
    side_by_side_shift_um,
    unique_landmark_names,
)

GEOMETRY = SampleGeometry(he_size_xy=(2000.0, 1500.0), global_size_xy=(2600.0, 2000.0),
                          he_pixel_size_um=0.2737, xenium_pixel_size_um=0.2125)
TRUTH = np.array([[1.25, 0.08, 40.0], [-0.08, 1.25, 120.0], [0.0, 0.0, 1.0]])
HE_POINTS = np.array([[100.0, 100.0], [1800.0, 150.0], [900.0, 1300.0], [1500.0, 1000.0], [300.0, 900.0]])


def test_unequal_counts_say_which_side_needs_clicks():
    with pytest.raises(InputError, match="3 H&E points but 2 Xenium points.*last 1 H&E point.*Xenium image"):
        landmark_pairs_from_points(HE_POINTS[:3], HE_POINTS[:2])


def test_points_outside_their_image_are_named():
    glob = apply_affine_xy(TRUTH, HE_POINTS)
    he = HE_POINTS.copy()
    he[1] = [2100.0, 10.0]
    glob[3] = [-5.0, 30.0]
    with pytest.raises(InputError) as info:
        landmark_pairs_from_points(he, glob, names=["a", "b", "c", "d", "e"], geometry=GEOMETRY)
    assert "b lie outside the H&E image" in str(info.value)
    assert "d lie outside the Xenium image" in str(info.value)
    pairs = landmark_pairs_from_points(HE_POINTS, apply_affine_xy(TRUTH, HE_POINTS), geometry=GEOMETRY)
    assert pairs.names == ("Pt-0", "Pt-1", "Pt-2", "Pt-3", "Pt-4")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["", "Pt-0", "Pt-1", "a", "b"]), max_size=12))
def test_names_are_unique_and_kept_where_possible(names):
    out = unique_landmark_names(names)
    assert len(out) == len(names) and len(set(out)) == len(out) and all(out)
    for i, name in enumerate(names):
        if name and name not in names[:i]:
            assert out[i] == name


def test_fit_of_clicked_points_and_its_refusals():
    glob = apply_affine_xy(TRUTH, HE_POINTS)
    fitted = fit_landmark_points(HE_POINTS, glob, "affine", GEOMETRY)
    np.testing.assert_allclose(fitted.matrix, TRUTH, atol=1e-9)
    with pytest.raises(InputError, match="affine model needs at least 3"):
        fit_landmark_points(HE_POINTS[:2], glob[:2], "affine", GEOMETRY)
    # clicks entered the wrong way round: the scale is the inverse of the pixel-size ratio
    he = HE_POINTS * 0.6
    with pytest.raises(InputError, match="looks reversed.*Swap"):
        fit_landmark_points(apply_affine_xy(TRUTH, he), he, "affine", GEOMETRY)


@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.2, 3.0), st.floats(-np.pi, np.pi), st.floats(-500, 500), st.floats(0.5, 8.0), st.floats(-50, 50),
)
def test_moved_layer_keeps_its_own_map_to_he_px(scale, angle, shift, grid_px, offset):
    """A layer whose data is a coarser grid over the H&E ends where a fresh layer would."""
    c, s = np.cos(angle), np.sin(angle)
    old = np.array([[scale * c, -scale * s, shift], [scale * s, scale * c, -shift], [0, 0, 1]])
    new = TRUTH
    grid_to_he = np.array([[grid_px, 0, offset], [0, grid_px, offset], [0, 0, 1]])
    layer = layer_affine_um(old, 0.2125) @ napari_affine(grid_to_he)
    moved = moved_layer_affine(layer, old, new, 0.2125)
    np.testing.assert_allclose(moved, layer_affine_um(new, 0.2125) @ napari_affine(grid_to_he), atol=1e-8)


def test_side_by_side_puts_the_he_right_of_the_xenium_image():
    dx, dy = side_by_side_shift_um(TRUTH, GEOMETRY)
    w, h = GEOMETRY.he_size_xy
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float)
    shown = apply_affine_xy(scale_matrix(0.2125) @ TRUTH, corners) + [dx, dy]
    xenium_width_um = GEOMETRY.global_size_xy[0] * 0.2125
    np.testing.assert_allclose(shown[:, 0].min(), 1.05 * xenium_width_um)
    np.testing.assert_allclose(shown[:, 1].min(), 0.0, atol=1e-9)


def test_history_applies_undoes_and_redoes(synthetic_sample):
    sdata = load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path)
    geometry = sample_geometry(sdata)
    assert geometry.xenium_pixel_size_um == pytest.approx(0.2125)
    element = sdata.images[HE_IMAGE]
    assert GLOBAL not in get_transformation(element, get_all=True)
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    fitted = fit_landmark_points(pairs.he_px, pairs.global_px, "similarity", geometry)
    history = RegistrationHistory()
    assert not history.can_undo
    with pytest.raises(InputError, match="nothing to undo"):
        history.undo(sdata)

    history.apply(sdata, fitted)
    np.testing.assert_allclose(sample_info(sdata).he_to_global, fitted.best_affine)
    assert sdata.attrs[REGISTRATION_ATTRS_KEY]["model"] == "similarity"
    truth = read_alignment_csv(synthetic_sample.alignment_csv)
    history.apply_matrix(sdata, truth)
    assert REGISTRATION_ATTRS_KEY not in sdata.attrs
    np.testing.assert_allclose(
        get_transformation(element, GLOBAL).to_affine_matrix(("x", "y"), ("x", "y")), truth
    )
    history.undo(sdata)
    np.testing.assert_allclose(sample_info(sdata).he_to_global, fitted.best_affine)
    assert sdata.attrs[REGISTRATION_ATTRS_KEY]["model"] == "similarity"
    history.undo(sdata)
    assert sample_info(sdata).he_to_global is None and REGISTRATION_ATTRS_KEY not in sdata.attrs
    assert GLOBAL not in get_transformation(element, get_all=True)
    assert history.can_redo and not history.can_undo
    history.redo(sdata)
    history.redo(sdata)
    np.testing.assert_allclose(sample_info(sdata).he_to_global, truth)
    with pytest.raises(InputError, match="nothing to redo"):
        history.redo(sdata)
