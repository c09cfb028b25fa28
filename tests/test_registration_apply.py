"""Moving transcripts with a fitted registration, the JSON record, and the SpatialData element."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from napari_morphomol.elements import HE_IMAGE
from napari_morphomol.errors import InputError
from napari_morphomol.registration import (
    HE_X_PX,
    HE_Y_PX,
    REGISTRATION_ATTRS_KEY,
    FitOptions,
    LandmarkPairs,
    fit_transform,
    read_registration_json,
    set_he_registration,
    transcripts_with_he_px,
    transform_xy_columns,
    write_registration_json,
)
from napari_morphomol.registration.transforms import INVERSE_GRID_TOLERANCE_PX

TRUTH = np.array([[1.2841, 0.0312, 812.25], [-0.0298, 1.2853, -431.5], [0.0, 0.0, 1.0]])


def fitted_example(model: str, n: int = 18):
    rng = np.random.default_rng(2)
    he = rng.uniform(0, 20000, (n, 2))
    glob = he @ TRUTH[:2, :2].T + TRUTH[:2, 2] + rng.normal(0, 4.0, (n, 2))
    return fit_transform(LandmarkPairs.from_arrays(he, glob), FitOptions(model), leave_one_out=False)


@pytest.mark.parametrize("model", ["affine", "per-region", "tps"])
@pytest.mark.parametrize("inverse", [False, True])
def test_chunked_columns_match_point_mapping(model, inverse):
    fitted = fitted_example(model)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 25000, 10_001), rng.uniform(0, 25000, 10_001)
    ox, oy = transform_xy_columns(fitted, x, y, inverse=inverse, exact=True, chunk_points=1000, workers=2)
    mapping = fitted.inverse_apply_xy if inverse else fitted.apply_xy
    np.testing.assert_allclose(np.column_stack([ox, oy]), mapping(np.column_stack([x, y])), rtol=0, atol=1e-7)


def test_per_region_inverse_columns_come_from_the_grid_within_its_tolerance():
    fitted = fitted_example("per-region")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 25000, 10_001), rng.uniform(0, 25000, 10_001)
    ox, oy = transform_xy_columns(fitted, x, y, inverse=True, chunk_points=1000, workers=2)
    exact = fitted.inverse_apply_xy(np.column_stack([x, y]))
    error = np.hypot(ox - exact[:, 0], oy - exact[:, 1])
    assert 0 < error.max() <= INVERSE_GRID_TOLERANCE_PX


def test_affine_columns_keep_float32():
    fitted = fitted_example("affine")
    x = np.linspace(0, 20000, 1000, dtype=np.float32)
    ox, oy = transform_xy_columns(fitted, x, x, inverse=True)
    assert ox.dtype == np.float32 and oy.dtype == np.float32
    expected = fitted.inverse_apply_xy(np.column_stack([x, x]).astype(np.float64))
    np.testing.assert_allclose(np.column_stack([ox, oy]), expected, atol=0.01)


def test_mismatched_columns_are_refused():
    with pytest.raises(InputError, match="equal length"):
        transform_xy_columns(fitted_example("affine"), np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("model", ["affine", "per-region"])
def test_transcripts_get_he_px_columns_lazily(model):
    fitted = fitted_example(model)
    rng = np.random.default_rng(1)
    um = rng.uniform(0, 4000, (5000, 2))
    frame = pd.DataFrame({"x": um[:, 0], "y": um[:, 1], "feature_name": "EPCAM"})
    lazy = transcripts_with_he_px(dd.from_pandas(frame, npartitions=4), fitted)
    assert isinstance(lazy, dd.DataFrame)
    out = lazy.compute()
    expected = fitted.inverse_apply_xy(um / fitted.xenium_pixel_size_um)
    np.testing.assert_allclose(out[[HE_X_PX, HE_Y_PX]].to_numpy(), expected, rtol=0, atol=INVERSE_GRID_TOLERANCE_PX)
    assert list(out.columns[:3]) == ["x", "y", "feature_name"]
    with pytest.raises(InputError, match="no column 'x_location'"):
        transcripts_with_he_px(frame, fitted, x_um_column="x_location")


@pytest.mark.parametrize("model", ["affine", "per-region", "tps"])
def test_registration_json_reproduces_the_fit(tmp_path, model):
    fitted = fitted_example(model)
    path = write_registration_json(tmp_path / "registration.json", fitted)
    again = read_registration_json(path)
    probe = np.random.default_rng(3).uniform(0, 20000, (200, 2))
    np.testing.assert_allclose(again.apply_xy(probe), fitted.apply_xy(probe), rtol=0, atol=1e-9)
    with pytest.raises(InputError, match="already exists"):
        write_registration_json(path, fitted)


def test_edited_registration_json_is_refused(tmp_path):
    import json

    path = write_registration_json(tmp_path / "r.json", fitted_example("affine"))
    record = json.loads(path.read_text())
    record["best_affine"][0][2] += 5.0
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="does not reproduce"):
        read_registration_json(path)


def test_he_element_gets_the_affine_to_global_and_the_record():
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    image = Image2DModel.parse(np.zeros((3, 40, 50), dtype=np.uint8), dims=("c", "y", "x"))
    sdata = SpatialData(images={HE_IMAGE: image})
    fitted = fitted_example("per-region")
    set_he_registration(sdata, fitted)
    transform = get_transformation(sdata.images[HE_IMAGE], to_coordinate_system="global")
    matrix = transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(matrix, fitted.best_affine)
    assert sdata.attrs[REGISTRATION_ATTRS_KEY]["model"] == "per-region"
    assert len(sdata.attrs[REGISTRATION_ATTRS_KEY]["region_matrices"]) >= 2
    with pytest.raises(InputError, match="no image 'he'"):
        set_he_registration(sdata, fitted, image_key="he")
