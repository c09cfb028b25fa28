"""The one coordinate convention: (x, y) in the core, (row, col) in napari, um on screen."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_morphomol.coords import (
    apply_affine_xy,
    layer_affine_um,
    napari_affine,
    napari_to_xy,
    xy_affine_from_napari,
    xy_to_napari,
)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
points = arrays(np.float64, st.tuples(st.integers(1, 20), st.just(2)), elements=finite)
matrices = arrays(np.float64, (2, 3), elements=st.floats(-10, 10, allow_nan=False))


def full(m23):
    return np.vstack([m23, [0.0, 0.0, 1.0]])


@given(points)
def test_swap_round_trip(p):
    np.testing.assert_array_equal(napari_to_xy(xy_to_napari(p)), p)
    np.testing.assert_array_equal(xy_to_napari(p)[:, 0], p[:, 1])


@given(matrices, points)
def test_napari_affine_maps_the_same_points(m23, p):
    """A matrix applied in (x, y) and its napari form applied in (row, col) agree."""
    m = full(m23)
    expected = apply_affine_xy(m, p)
    rc = apply_affine_xy(napari_affine(m), xy_to_napari(p))
    np.testing.assert_allclose(napari_to_xy(rc), expected, atol=1e-6)
    np.testing.assert_allclose(xy_affine_from_napari(napari_affine(m)), m)


def test_layer_affine_um_places_h_and_e_pixels_in_micrometres():
    """An H&E pixel at (x=100, y=10) mapped by a pure scale lands at pixel size x position, in (row, col)."""
    he_to_global = np.array([[2.0, 0.0, 5.0], [0.0, 2.0, 7.0], [0.0, 0.0, 1.0]])
    affine = layer_affine_um(he_to_global, 0.25)
    row, col = apply_affine_xy(affine, np.array([[10.0, 100.0]]))[0]
    assert (col, row) == (0.25 * (2 * 100 + 5), 0.25 * (2 * 10 + 7))
