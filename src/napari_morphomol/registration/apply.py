"""Apply a fitted registration to transcripts (in chunks) and to a SpatialData sample.

SpatialData can hold one affine per element and coordinate system, so the H&E element gets
``best_affine`` (for translation, similarity and affine fits this *is* the fit). A per-region
or spline model cannot be one affine: the element still gets the best single affine (good for
display), and the full model travels as a JSON record in ``sdata.attrs[REGISTRATION_ATTRS_KEY]``
(see :func:`registration_record`); points are always moved with the full model, via
:func:`transform_xy_columns` or :func:`transcripts_with_he_px`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd

from napari_morphomol._atomic import json_file_kind, write_text_atomic
from napari_morphomol.coords import GLOBAL
from napari_morphomol.elements import HE_IMAGE, SAMPLE_ATTRS_KEY
from napari_morphomol.errors import InputError
from napari_morphomol.registration.fit import FitOptions, FittedTransform, fit_transform
from napari_morphomol.registration.landmarks import LandmarkPairs
from napari_morphomol.registration.transforms import EXACT_CHUNK_POINTS, filling, map_columns_chunked

AFFINE_CHUNK_POINTS = 1 << 20
"""Points per chunk for affine maps and grid reads: a few passes over a few MB per column."""

REGISTRATION_ATTRS_KEY = "morphomol_registration"
"""Where a sample keeps the record of the registration applied to it (``sdata.attrs``); the
sample's own record (:data:`napari_morphomol.elements.SAMPLE_ATTRS_KEY`) keeps its best affine
current in ``he_to_global``."""
RECORD_FORMAT = "napari-morphomol.registration/1"
REGISTRATION_JSON = json_file_kind("registration record", "format", RECORD_FORMAT)
HE_X_PX = "he_x_px"
HE_Y_PX = "he_y_px"


def transform_xy_columns(
    fitted: FittedTransform,
    x: np.ndarray,
    y: np.ndarray,
    *,
    inverse: bool = False,
    exact: bool = False,
    chunk_points: int | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map point columns H&E px -> ``global`` px (``inverse=True``: ``global`` px -> H&E px).

    Columns stay columns (as in a parquet table) and are processed in chunks on a thread pool.
    Affine fits keep float32 columns float32; other models compute in float64. The inverse of a
    per-region or spline fit is read from its inverse grid (built on the first call), within
    ``INVERSE_GRID_TOLERANCE_PX`` H&E px of the exact Newton inverse, unless ``exact``.

    Parameters
    ----------
    fitted
        The registration.
    x, y
        1-D columns of equal length: H&E px, or ``global`` px with ``inverse``.
    inverse
        Map ``global`` px -> H&E px.
    exact
        Solve a non-affine inverse by Newton steps for every point (about 10 x slower).
    chunk_points
        Points per chunk; None: a size that suits the model.
    workers
        Threads; None: one per CPU.

    Returns
    -------
    tuple of numpy.ndarray
        The mapped x and y columns.

    Raises
    ------
    InputError
        Columns of different lengths or not 1-D; a non-affine inverse that does not converge.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"x and y must be 1-D columns of equal length, got {x.shape} and {y.shape}")
    transform = fitted.transform
    if inverse and not exact and fitted.matrix is None:
        dtype, chunk, mapping = np.float64, AFFINE_CHUNK_POINTS, transform.bulk_inverse_columns
    else:
        mapping = filling(partial(transform.map_columns, inverse=inverse))
        affine = fitted.matrix is not None
        dtype = np.result_type(x.dtype, y.dtype, np.float32) if affine else np.float64
        chunk = AFFINE_CHUNK_POINTS if affine else EXACT_CHUNK_POINTS
    return map_columns_chunked(mapping, x, y, dtype, chunk_points or chunk, workers)


def transcripts_with_he_px(
    transcripts: dd.DataFrame | pd.DataFrame,
    fitted: FittedTransform,
    *,
    x_um_column: str = "x",
    y_um_column: str = "y",
) -> dd.DataFrame | pd.DataFrame:
    """Add columns ``he_x_px``, ``he_y_px``: each transcript's position in H&E px.

    Transcripts are in um (spatialdata-io's points ``x``, ``y``; ``x_location``, ``y_location``
    in ``transcripts.parquet``); a dask dataframe is mapped lazily, partition by partition.
    """
    for col in (x_um_column, y_um_column):
        if col not in transcripts.columns:
            raise InputError(
                f"transcripts have no column {col!r} (columns: {list(transcripts.columns)}); "
                "name the um coordinate columns"
            )
    px = fitted.xenium_pixel_size_um

    def add_columns(df: pd.DataFrame) -> pd.DataFrame:
        gx = df[x_um_column].to_numpy(dtype=np.float64) / px
        gy = df[y_um_column].to_numpy(dtype=np.float64) / px
        hx, hy = transform_xy_columns(fitted, gx, gy, inverse=True, workers=1)
        return df.assign(**{HE_X_PX: hx, HE_Y_PX: hy})

    if isinstance(transcripts, dd.DataFrame):
        meta = transcripts._meta.assign(**{HE_X_PX: np.float64(), HE_Y_PX: np.float64()})
        return transcripts.map_partitions(add_columns, meta=meta)
    return add_columns(transcripts)


def registration_record(fitted: FittedTransform) -> dict:
    """The registration as plain JSON types: landmarks, options, results and quality."""
    t = fitted.transform
    record = {
        "format": RECORD_FORMAT,
        "direction": "he_px -> global_px",
        "model": fitted.model,
        "options": fitted.options.as_dict(),
        "xenium_pixel_size_um": fitted.xenium_pixel_size_um,
        "matrix": None if fitted.matrix is None else fitted.matrix.tolist(),
        "best_affine": fitted.best_affine.tolist(),
        "landmarks": {
            "names": list(fitted.pairs.names),
            "active": fitted.pairs.active.tolist(),
            "he_px": fitted.pairs.he_px.tolist(),
            "global_px": fitted.pairs.global_px.tolist(),
        },
        "used": fitted.used.tolist(),
        "outliers": fitted.outliers.tolist(),
        "residuals_um": fitted.residuals_um.tolist(),
        "loo_um": [None if np.isnan(v) else float(v) for v in fitted.loo_um],
        "rmse_um": fitted.rmse_um,
        "warnings": list(fitted.warnings),
    }
    if hasattr(t, "region_matrices"):
        record["region_matrices"] = t.region_matrices.tolist()
        record["region_centres_he_px"] = np.asarray(t.weights.centres_he_px).tolist()
        record["blend_sigma_px"] = float(t.weights.sigma_px)
    return record


def fitted_from_record(record: dict) -> FittedTransform:
    """Redo the fit a record describes and check it gives the recorded transform."""
    if record.get("format") != RECORD_FORMAT:
        raise InputError(f"not a napari-morphomol registration record (format {record.get('format')!r})")
    lm = record["landmarks"]
    pairs = LandmarkPairs.from_arrays(lm["he_px"], lm["global_px"], lm["names"], lm["active"])
    fitted = fit_transform(pairs, FitOptions(**record["options"]), xenium_pixel_size_um=record["xenium_pixel_size_um"])
    if not np.allclose(fitted.best_affine, record["best_affine"], rtol=1e-9, atol=1e-9):
        raise InputError("the registration record does not reproduce its own transform; it was edited or damaged")
    return fitted


def write_registration_json(path: str | Path, fitted: FittedTransform, *, overwrite: bool = False, inputs=()) -> Path:
    """The registration record as JSON; ``inputs`` are paths the file may not replace."""
    return write_text_atomic(path, json.dumps(registration_record(fitted), indent=1) + "\n", REGISTRATION_JSON,
                             inputs=inputs, overwrite=overwrite)


def read_registration_json(path: str | Path) -> FittedTransform:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"registration file not found: {path}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a JSON registration record ({exc})") from exc
    return fitted_from_record(record)


def set_he_registration(sdata, fitted: FittedTransform, image_key: str = HE_IMAGE) -> None:
    """Give the H&E element its transform to ``global`` and record the full model in attrs.

    The element gets ``best_affine``; ``attrs[REGISTRATION_ATTRS_KEY]`` gets the full record, and
    the loader's ``attrs['morphomol']['he_to_global']`` (when present) the same best affine.
    """
    from spatialdata.transformations import Affine, set_transformation

    if image_key not in sdata.images:
        raise InputError(f"the sample has no image {image_key!r} (images: {list(sdata.images)}); load the H&E first")
    affine = Affine(fitted.best_affine, input_axes=("x", "y"), output_axes=("x", "y"))
    set_transformation(sdata.images[image_key], affine, to_coordinate_system=GLOBAL)
    sdata.attrs[REGISTRATION_ATTRS_KEY] = registration_record(fitted)
    sample_attrs = sdata.attrs.get(SAMPLE_ATTRS_KEY)
    if isinstance(sample_attrs, dict) and "he_to_global" in sample_attrs:
        sample_attrs["he_to_global"] = fitted.best_affine.tolist()

