"""The bounded-memory transcript index: exactly the in-memory counts, and the transcripts in a box."""

import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.elements import MORPHOLOGY, TRANSCRIPTS
from napari_morphomol.errors import InputError
from napari_morphomol.io.features import XeniumDataWarning
from napari_morphomol.io.sample import load_sample, transcripts_file
from napari_morphomol.io.transcript_density import MIN_QV, build_transcript_density

FEATURES = ["ACTB", "EPCAM", "KRT8", "NegControlProbe_1", "ZEROGENE"]
"""ZEROGENE is a category without a transcript."""


def in_memory_counts(df: pd.DataFrame, extent_um, bin_um: float) -> dict:
    """The reference: every transcript's bin by plain pandas, all in memory."""
    nx, ny = max(int(np.ceil(extent_um[0] / bin_um)), 1), max(int(np.ceil(extent_um[1] / bin_um)), 1)
    x, y = df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    named = finite & df["feature_name"].notna().to_numpy()
    good = named & (df["qv"].to_numpy() >= MIN_QV)
    with np.errstate(invalid="ignore"):
        ix, iy = np.floor(x / bin_um), np.floor(y / bin_um)
    inside = good & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    rasters = {}
    for name in df["feature_name"].cat.categories:
        mine = inside & (df["feature_name"] == name).to_numpy()
        raster = np.zeros((ny, nx))
        np.add.at(raster, (iy[mine].astype(int), ix[mine].astype(int)), 1)
        rasters[name] = raster
    return {"rasters": rasters, "non_finite": int((~finite).sum()), "unnamed": int((finite & ~named).sum()),
            "low_qv": int((named & ~good).sum()), "outside": int((good & ~inside).sum())}


def random_transcripts(seed: int, n: int, extent_um) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = rng.choice(FEATURES[:-1], n)
    x = rng.uniform(-20, extent_um[0] + 20, n).astype(np.float32)
    y = rng.uniform(-20, extent_um[1] + 20, n).astype(np.float32)
    x[rng.random(n) < 0.02] = np.nan
    y[rng.random(n) < 0.01] = np.inf
    frame = pd.DataFrame({"x": x, "y": y, "feature_name": pd.Categorical(names, categories=FEATURES),
                          "qv": rng.uniform(0, 40, n).astype(np.float32)})
    frame.loc[rng.random(n) < 0.01, "feature_name"] = None
    return frame


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 3000), bin_um=st.sampled_from([1.0, 4.0, 7.5, 60.0]),
       partitions=st.integers(1, 5))
def test_index_counts_equal_the_in_memory_ones(seed, n, bin_um, partitions):
    extent_um = (310.0, 170.0)
    frame = random_transcripts(seed, n, extent_um)
    points = dd.from_pandas(frame, npartitions=partitions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XeniumDataWarning)
        density = build_transcript_density(points, extent_um=extent_um, bin_um=bin_um)
    expected = in_memory_counts(frame, extent_um, bin_um)
    assert density.features == FEATURES
    for name, raster in expected["rasters"].items():
        np.testing.assert_array_equal(density.raster([name]), raster)
    genes = [f for f in FEATURES if not f.startswith("NegControl")]
    np.testing.assert_array_equal(density.raster(), sum(expected["rasters"][g] for g in genes))
    assert density.gene_totals().to_dict() == {g: expected["rasters"][g].sum() for g in genes}
    assert (density.n_non_finite, density.n_unnamed, density.n_low_qv, density.n_outside) == (
        expected["non_finite"], expected["unnamed"], expected["low_qv"], expected["outside"])
    assert density.n_binned + density.n_non_finite + density.n_unnamed + density.n_low_qv + density.n_outside == n


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), box=st.tuples(*[st.floats(-50, 400) for _ in range(4)]),
       genes=st.lists(st.sampled_from(FEATURES), min_size=1, max_size=3, unique=True))
def test_transcripts_in_box_are_those_a_filter_finds(seed, box, genes):
    extent_um = (310.0, 170.0)
    frame = random_transcripts(seed, 4000, extent_um)
    with pytest.warns(XeniumDataWarning):
        density = build_transcript_density(dd.from_pandas(frame, npartitions=3), extent_um=extent_um, bin_um=4.0)
    x0, x1, y0, y1 = box
    found = density.transcripts_in_box(genes, x_range_um=(x0, x1), y_range_um=(y0, y1))
    x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
    grid_um = np.ceil(np.asarray(extent_um) / 4.0) * 4.0  # the bins cover the extent rounded up to whole bins
    inside_extent = (x >= 0) & (x < grid_um[0]) & (y >= 0) & (y < grid_um[1])
    mask = ((x >= x0) & (x < x1) & (y >= y0) & (y < y1) & inside_extent & frame["feature_name"].isin(genes).to_numpy()
            & (frame["qv"].to_numpy() >= MIN_QV))
    expected = frame.loc[mask, ["x", "y", "feature_name"]].astype({"feature_name": str})
    key = ["x", "y", "feature_name"]
    assert found.attrs["n_in_box"] == len(expected)
    pd.testing.assert_frame_equal(found.sort_values(key).reset_index(drop=True),
                                  expected.sort_values(key).reset_index(drop=True), check_dtype=False)


def test_a_crowded_box_gives_an_even_subset():
    frame = random_transcripts(0, 20_000, (310.0, 170.0))
    with pytest.warns(XeniumDataWarning):
        density = build_transcript_density(dd.from_pandas(frame, npartitions=2), extent_um=(310.0, 170.0))
    found = density.transcripts_in_box(["ACTB", "EPCAM"], x_range_um=(0, 310), y_range_um=(0, 170), max_points=500)
    assert len(found) == 500 and found.attrs["n_in_box"] > 3000
    assert found["x"].min() < 40 and found["x"].max() > 270  # spread over the box, not its first blocks
    again = density.transcripts_in_box(["ACTB", "EPCAM"], x_range_um=(0, 310), y_range_um=(0, 170), max_points=500)
    pd.testing.assert_frame_equal(found, again)


def test_a_sample_indexes_as_its_points_count(synthetic_sample):
    sdata = load_sample(synthetic_sample.xenium_dir)
    points = sdata.points[TRANSCRIPTS]
    height_px, width_px = sdata.images[MORPHOLOGY]["scale0"]["image"].shape[1:]
    extent_um = (width_px * 0.2125, height_px * 0.2125)
    assert transcripts_file(points) is not None  # the index reads the parquet file itself
    assert transcripts_file(points[points["x"] > 10]) is None  # a derived element is read through dask
    density = build_transcript_density(points, extent_um=extent_um)
    frame = points[["x", "y", "feature_name", "qv"]].compute()
    expected = in_memory_counts(frame, extent_um, 4.0)
    for gene in ["EPCAM", density.gene_totals().idxmax()]:
        np.testing.assert_array_equal(density.raster([gene]), expected["rasters"][gene])
    empty = density.transcripts_in_box(["EPCAM"], x_range_um=(-500, -100), y_range_um=(0, 100))
    assert len(empty) == 0 and list(empty.columns) == ["x", "y", "feature_name"]


def test_scratch_files_go_on_close_and_a_bad_scratch_folder_is_refused(tmp_path):
    frame = random_transcripts(1, 100, (100.0, 100.0)).dropna()
    points = dd.from_pandas(frame, npartitions=1)
    density = build_transcript_density(points, extent_um=(100.0, 100.0), scratch_dir=tmp_path)
    assert density.scratch.parent == tmp_path and any(density.scratch.iterdir())
    density.close()
    assert not density.scratch.exists()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(InputError, match="set MORPHOMOL_CACHE"):
        build_transcript_density(points, extent_um=(100.0, 100.0), scratch_dir=not_a_folder)
    with pytest.raises(InputError, match="unknown genes"):
        build_transcript_density(points, extent_um=(100.0, 100.0)).raster(["NOPE"])
