"""Stride-grid gene maps, tile rasters, placement and tile look-ups."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.analysis import StrideGrid, TokenGrid, explore_run
from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.errors import InputError

IDENTITY = np.eye(3)


@st.composite
def tile_sets(draw):
    n_rows, n_cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    cells = draw(st.lists(st.tuples(st.integers(0, n_rows - 1), st.integers(0, n_cols - 1)), min_size=1,
                          max_size=n_rows * n_cols, unique=True))
    values = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=len(cells), max_size=len(cells)))
    rows, cols = np.array(cells).T
    return rows, cols, (n_rows + 1, n_cols + 1), np.array(values, dtype=np.float32)


@settings(max_examples=60, deadline=None)
@given(tile_sets())
def test_stride_square_is_the_mean_of_the_tiles_covering_it(case):
    rows, cols, shape, values = case
    grid = StrideGrid.from_tiles(rows, cols, shape, stride_he_px=10.0, he_to_global=IDENTITY)
    raster = grid.stride_map(values)
    for r in range(shape[0]):
        for c in range(shape[1]):
            covering = values[(rows <= r) & (r <= rows + 1) & (cols <= c) & (c <= cols + 1)]
            if len(covering):
                assert raster[r, c] == pytest.approx(float(covering.mean()), abs=1e-5)
            else:
                assert np.isnan(raster[r, c])


@settings(max_examples=30, deadline=None)
@given(tile_sets(), st.floats(0.5, 50), st.floats(-1, 1), st.floats(-100, 100))
def test_tile_lookup_finds_each_tile_at_its_centre(case, stride, angle, shift):
    rows, cols, shape, _ = case
    c, s = np.cos(angle), np.sin(angle)
    he_to_global = np.array([[1.3 * c, -1.3 * s, shift], [1.3 * s, 1.3 * c, -shift], [0, 0, 1]])
    grid = StrideGrid.from_tiles(rows, cols, shape, stride_he_px=stride, he_to_global=he_to_global)
    centres_he = np.c_[(cols + 1) * stride, (rows + 1) * stride]
    centres_global = apply_affine_xy(he_to_global, centres_he)
    np.testing.assert_array_equal(grid.tiles_at_global(centres_global), np.arange(len(rows)))
    far = apply_affine_xy(he_to_global, np.array([[-10.0 * stride, -10.0 * stride]]))
    assert grid.tiles_at_global(far)[0] == -1


def test_stride_map_placement_matches_the_square_boxes():
    grid = StrideGrid.from_tiles([0], [0], (2, 2), stride_he_px=100.0, he_to_global=np.diag([2.0, 2.0, 1.0]))
    # pixel (1, 1) of the stride raster is the square [100, 200) H&E px: centre 150 -> global 300
    np.testing.assert_allclose(apply_affine_xy(grid.stride_pixel_to_global(), [[1.0, 1.0]]), [[300.0, 300.0]])


def test_grid_refuses_tiles_outside_and_wrong_lengths():
    with pytest.raises(InputError):
        StrideGrid.from_tiles([3], [0], (3, 3), 1.0, IDENTITY)
    grid = StrideGrid.from_tiles([0, 1], [0, 0], (3, 2), 1.0, IDENTITY)
    with pytest.raises(InputError):
        grid.stride_map(np.zeros(3))


@settings(max_examples=25, deadline=None)
@given(tile_sets(), st.integers(0, 2**31 - 1))
def test_token_map_is_the_mean_of_the_tile_tokens_on_each_raster_token(case, seed):
    """A raster token is covered by up to four tiles (14 tokens a tile, 7 a stride): its value is the
    mean of their tokens lying on it, tokens of a tile being row-major as the model gives them."""
    from napari_morphomol.tiling import TileGeometry

    rows, cols, shape, _ = case
    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=256 * shape[0], he_width_px=256 * shape[1])
    grid = TokenGrid.from_tiles(rows, cols, geometry, IDENTITY)
    values = np.random.default_rng(seed).normal(size=(len(rows), 196)).astype(np.float32)
    raster = grid.token_map(values)
    assert raster.shape == geometry.raster_shape
    sums, counts = np.zeros(raster.shape), np.zeros(raster.shape)
    for tile, (i, j) in enumerate(zip(rows, cols, strict=True)):
        sums[7 * i:7 * i + 14, 7 * j:7 * j + 14] += values[tile].reshape(14, 14)
        counts[7 * i:7 * i + 14, 7 * j:7 * j + 14] += 1
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(raster, sums / counts, atol=1e-5)  # NaN exactly where no tile is
    # token (r, c) is the square [c, c + 1) x [r, r + 1) tokens: centre (c + 0.5) * 256 / 7 H&E px
    np.testing.assert_allclose(apply_affine_xy(grid.token_pixel_to_global(), [[2.0, 3.0]]),
                               [[2.5 * 256 / 7, 3.5 * 256 / 7]])
    with pytest.raises(InputError, match="expected"):
        grid.token_map(values[:, :100])


@settings(max_examples=25, deadline=None)
@given(tile_sets(), st.floats(-5, 5, allow_nan=False))
def test_a_constant_field_stitches_to_that_constant(case, value):
    from napari_morphomol.tiling import TileGeometry

    rows, cols, shape, _ = case
    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=256 * shape[0], he_width_px=256 * shape[1])
    grid = TokenGrid.from_tiles(rows, cols, geometry, IDENTITY)
    raster = grid.token_map(np.full((len(rows), 196), value, np.float32))
    np.testing.assert_allclose(raster[grid.covered], np.float32(value), rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.8, 1.25), st.floats(-np.pi, np.pi), st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_a_point_source_lands_in_its_token_through_a_rotated_scaled_registration(scale, angle, fx, fy):
    """One add-on transcript, binned through the registration, lights one token; the token map
    places that token's centre within half a token of the transcript in ``global``."""
    import pandas as pd

    from napari_morphomol.tiling import GenePanel, TileGeometry, bin_transcripts

    xenium_pixel_size_um = 0.2125
    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=1024, he_width_px=1024)
    c, s_ = np.cos(angle) * scale, np.sin(angle) * scale
    he_to_global = np.array([[c, -s_, 3000.0], [s_, c, 3000.0], [0.0, 0.0, 1.0]])
    point_he = np.array([[fx * 1024, fy * 1024]])
    point_global = apply_affine_xy(he_to_global, point_he)
    um = point_global * xenium_pixel_size_um
    transcripts = pd.DataFrame({"feature_name": pd.Categorical(["ADD"]), "x_location": um[:, 0],
                                "y_location": um[:, 1], "qv": np.float32([40.0])})
    bins = bin_transcripts(transcripts, geometry, GenePanel(core=("CORE",), addon=("ADD",)), he_to_global,
                           xenium_pixel_size_um=xenium_pixel_size_um)
    lit = np.argwhere(bins.addon_tokens.dense[..., 0] > 0)
    assert len(lit) == 1 and bins.addon_tokens.dense.sum() == 1
    (r, col), = lit
    grid = TokenGrid.from_tiles([0], [0], geometry, he_to_global)
    centre = apply_affine_xy(grid.token_pixel_to_global(), [[float(col), float(r)]])
    half_token_global_px = 0.5 * np.sqrt(2) * grid.token_he_px * scale
    assert np.linalg.norm(centre - point_global) <= half_token_global_px + 1e-6


def test_explorer_maps_metrics_and_inspector(results_store):
    explorer = explore_run(results_store)
    results = explorer.results
    gene = results.measured_genes[0]
    predicted = explorer.gene_map(gene, "predicted")
    measured = explorer.gene_map(gene, "measured")
    residual = explorer.gene_map(gene, "residual")
    covered = np.isfinite(predicted)
    assert covered.sum() >= len(results.tiles)
    np.testing.assert_allclose(residual[covered], measured[covered] - predicted[covered], atol=1e-4)
    assert explorer.gene_map(gene) is predicted, "maps are cached per gene"
    assert list(explorer.metrics.columns) == ["spearman", "pearson", "mse"]
    assert set(explorer.metrics.index) == set(results.measured_genes)
    # every tile's own centre finds it; the inspector lists its top predicted genes
    centres = results.tiles[["um_x", "um_y"]].to_numpy()
    np.testing.assert_array_equal(explorer.tiles_at_um(centres), np.arange(len(centres)))
    report = explorer.tile_report(0, top=5)
    assert len(report) == 5 and report["predicted"].is_monotonic_decreasing
    assert report["predicted"].iloc[0] == pytest.approx(results.predictions[0].max())
    assert explorer.tile_summary(0)["n_transcripts"] == int(results.tiles["n_transcripts"].iloc[0])
    inside = explorer.tiles_in_polygon_um(np.array([[0, 0], [1e6, 0], [1e6, 1e6], [0, 1e6]]))
    assert len(inside) == len(centres)
    with pytest.raises(InputError):
        explorer.gene_map("NOT_A_GENE")


def test_partial_results_reads_only_a_running_store(results_store, tmp_path):
    from napari_morphomol.analysis import partial_results

    assert partial_results(tmp_path / "nothing.zarr") is None
    assert partial_results(results_store) is None, "a finished store has no partial folder"


def test_partial_results_show_the_finished_chunks(synthetic_sample, tiny_checkpoint, tmp_path, monkeypatch):
    """A run cancelled after its first chunk: its maps hold those tiles only, the rest is NaN.

    Chunks after the first wait for the cancel marker, so a fast machine cannot finish them all
    before the run's progress poll sees the first one done."""
    from napari_morphomol.analysis import explore_results, partial_results
    from napari_morphomol.inference import InferenceCancelled, PredictOptions, partial_path, predict, scheduling
    from napari_morphomol.io.sample import load_sample

    s = synthetic_sample
    store = tmp_path / "RESULTS.zarr"
    run_chunk, started = scheduling.run_chunk, []

    def run_chunk_after_the_first_waits(spec, chunk):
        started.append(chunk)
        deadline = time.monotonic() + 60
        while len(started) > 1 and not (partial_path(store) / scheduling.CANCEL_MARKER).exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return run_chunk(spec, chunk)

    monkeypatch.setattr(scheduling, "run_chunk", run_chunk_after_the_first_waits)
    finished = []
    with pytest.raises(InferenceCancelled):
        predict(load_sample(s.xenium_dir, s.he_path, s.alignment_csv),
                PredictOptions(checkpoint=tiny_checkpoint, store=store, batch_size=4, device="cpu", dtype="float32",
                               tiles_per_chunk=4, scheduler="synchronous"),
                progress=lambda done, total: finished.append(done), cancel=lambda: bool(finished) and finished[-1] >= 1)
    partial = partial_results(store)
    assert partial is not None
    done = np.isfinite(partial.predictions).all(axis=1)
    assert 0 < done.sum() < len(done)
    explorer = explore_results(partial)
    raster = explorer.gene_map(explorer.genes[0])
    assert np.isfinite(raster).any() and np.isnan(raster).any()
    assert explorer.metrics.empty or np.isfinite(explorer.metrics.to_numpy()).all()
