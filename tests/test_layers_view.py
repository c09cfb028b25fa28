"""The docks' view maths (napari_morphomol.layers.view): contrast limits, the camera box, clicks."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_morphomol.layers.view import camera_box_xy_um, event_xy_um, is_click, percentile_limits

finite = st.floats(-1e6, 1e6, allow_nan=False)
values = arrays(np.float64, st.integers(0, 50), elements=st.one_of(finite, st.just(np.nan), st.just(np.inf)))


@given(values, st.booleans())
def test_percentile_limits_always_give_a_usable_range(v, symmetric):
    low, high = percentile_limits(v, symmetric=symmetric)
    assert np.isfinite([low, high]).all() and high > low
    ok = v[np.isfinite(v)]
    if symmetric and ok.size:
        assert low == -high
    if ok.size and not symmetric and ok.max() > ok.min():
        assert ok.min() <= low < high <= ok.max()


def test_percentile_limits_of_nothing_finite_are_0_to_1():
    assert percentile_limits(np.array([np.nan, np.inf])) == (0.0, 1.0)
    assert percentile_limits(np.zeros(5), symmetric=True) == (-1.0, 1.0)


@given(st.tuples(finite, finite), st.floats(1e-3, 1e3), st.tuples(st.integers(1, 4000), st.integers(1, 4000)))
def test_camera_box_is_centred_on_the_camera_and_sized_by_the_canvas(center_rc, zoom, canvas_hw):
    corners = camera_box_xy_um((0.0, *center_rc), zoom, canvas_hw)  # a leading (z) axis is ignored
    atol = 1e-9 * (1 + np.abs(center_rc).max())  # float64 rounding at the centre's magnitude
    np.testing.assert_allclose(corners.mean(axis=0), center_rc[::-1], atol=atol)
    width, height = corners[2] - corners[0]
    np.testing.assert_allclose([height, width], np.asarray(canvas_hw) / zoom, rtol=1e-9, atol=atol)


def test_event_position_is_read_as_x_y_and_small_moves_are_clicks():
    assert event_xy_um((5.0, 10.0, 20.0)) == (20.0, 10.0)
    assert is_click((10.0, 20.0), (10.5, 20.0), zoom=4.0)  # 2 screen px
    assert not is_click((10.0, 20.0), (11.0, 20.0), zoom=4.0)  # 4 screen px: a drag
