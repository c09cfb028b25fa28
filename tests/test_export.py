"""Export of a prediction run: .h5ad for scanpy, .zarr for SpatialData / napari-spatialdata, landmarks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from napari_morphomol.cli import main
from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.elements import HE_IMAGE, MORPHOLOGY, TRANSCRIPTS
from napari_morphomol.errors import InputError
from napari_morphomol.export import (
    HE_OVERVIEW,
    MEASURED_IMAGE,
    PREDICTED_IMAGE,
    TILE_TABLE,
    TILES,
    export_results,
    open_export,
    tile_shapes,
    write_landmarks_csv,
)
from napari_morphomol.export.registration import run_registration
from napari_morphomol.inference import open_results
from napari_morphomol.models import per_gene_metrics


@pytest.fixture(scope="module")
def exported(tmp_path_factory, results_store):
    """One export through the command line, shared by the read-back tests."""
    out = tmp_path_factory.mktemp("export")
    h5ad, zarr_path = out / "run.h5ad", out / "run.zarr"
    assert main(["export", str(results_store), "--h5ad", str(h5ad), "--spatialdata", str(zarr_path)]) == 0
    return h5ad, zarr_path


def test_cli_writes_only_the_targets(exported):
    h5ad, zarr_path = exported
    assert sorted(p.name for p in h5ad.parent.iterdir()) == ["run.h5ad", "run.zarr"]


def test_h5ad_schema_and_scanpy_runs_on_it(exported, results_store):
    import scanpy as sc

    results = open_results(results_store)
    adata = sc.read_h5ad(exported[0])
    assert adata.shape == (len(results.tiles), len(results.addon_genes))
    assert list(adata.var_names) == results.addon_genes
    np.testing.assert_array_equal(adata.X, results.predictions)
    np.testing.assert_array_equal(adata.obs["tile_id"], results.tiles["tile_id"])
    np.testing.assert_allclose(adata.obsm["spatial"], results.tiles[["global_x", "global_y"]].to_numpy())
    np.testing.assert_array_equal(adata.obsm["X_embedding"], results.embeddings)
    measured_columns = [results.addon_genes.index(g) for g in results.measured_genes]
    np.testing.assert_allclose(adata.layers["measured"][:, measured_columns], results.measured_log1p)
    metrics = per_gene_metrics(results.predictions[:, measured_columns], results.measured_log1p, results.measured_genes)
    np.testing.assert_allclose(adata.var.loc[results.measured_genes, "spearman"], metrics["spearman"])
    assert adata.obsm["X_pca"].shape == (adata.n_obs, min(31, adata.n_obs - 1))
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    for key in ("leiden_0.5", "leiden_1.0"):
        assert adata.obs[key].dtype == "category"
        assert len(adata.uns[f"{key}_colors"]) == len(adata.obs[key].cat.categories)
    np.testing.assert_allclose(adata.uns["registration"]["he_to_global"], results.metadata["registration"]["matrix"])
    assert json.loads(adata.uns["model_card"]) == results.metadata["model_card"]

    sc.pp.neighbors(adata, n_neighbors=5)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, key_added="again")
    assert adata.obs["again"].notna().all()


def test_zarr_table_annotates_tile_shapes_in_global(exported, results_store):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    results = open_results(results_store)
    sdata = sd.read_zarr(exported[1])
    assert {HE_OVERVIEW, PREDICTED_IMAGE, MEASURED_IMAGE} == set(sdata.images)  # the sample is referred to
    assert sd.get_element_annotators(sdata, TILES) == {TILE_TABLE}
    table = sdata.tables[TILE_TABLE]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == TILES
    assert sorted(table.obs[attrs["instance_key"]]) == sorted(sdata.shapes[TILES].index)
    # a tile square mapped by an affine keeps its centre: the polygon centroid is the tile centre
    shapes = sdata.shapes[TILES].loc[table.obs[attrs["instance_key"]].to_numpy()]
    centroids = np.column_stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y])
    np.testing.assert_allclose(centroids, results.tiles[["global_x", "global_y"]].to_numpy(), atol=1e-6)
    # the 2 x 2 stride squares of tile (row, col) are centred on the tile centre in global
    image = sdata.images[PREDICTED_IMAGE]
    matrix = get_transformation(image, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    block_centres = results.tiles[["col", "row"]].to_numpy(dtype=float) + 1.0
    np.testing.assert_allclose(apply_affine_xy(matrix, block_centres),
                               results.tiles[["global_x", "global_y"]].to_numpy(), atol=1e-6)
    assert list(image.c.values) == results.addon_genes
    # a stride square covered by one tile only holds that tile's prediction
    tile_at = {(r, c): k for k, (r, c) in enumerate(results.tiles[["row", "col"]].to_numpy())}
    alone = [(k, r, c) for (r, c), k in tile_at.items()
             if not ({(r - 1, c - 1), (r - 1, c), (r, c - 1)} & tile_at.keys())]
    assert alone
    values = np.asarray(image.data)
    for k, r, c in alone:
        np.testing.assert_allclose(values[:, r, c], results.predictions[k], rtol=1e-6)
    full = open_export(exported[1])  # with the sample's own elements attached
    assert TRANSCRIPTS in full.points and MORPHOLOGY in full.images
    he = get_transformation(full.images[HE_IMAGE], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(he, results.metadata["registration"]["matrix"])


def test_napari_spatialdata_opens_the_zarr(exported, make_napari_viewer, qtbot):
    import spatialdata as sd
    from napari_spatialdata import Interactive

    viewer = make_napari_viewer()
    sdata = sd.read_zarr(exported[1])
    interactive = Interactive(sdata, headless=True)
    assert interactive._viewer is viewer
    for element in (TILES, PREDICTED_IMAGE):  # napari-spatialdata adds layers from a worker thread
        interactive.add_element(element, "global")
        qtbot.waitUntil(lambda name=element: interactive.get_layer(name) is not None, timeout=120_000)
    assert len(interactive.get_layer(TILES).data) == len(sdata.shapes[TILES])
    assert interactive.get_layer(PREDICTED_IMAGE).data.shape[0] == len(sdata.images[PREDICTED_IMAGE].c)


@pytest.mark.parametrize("model", ["affine", "per-region"])
def test_landmarks_and_tile_shapes_follow_a_landmark_registration(results_store, synthetic_sample, tmp_path, model):
    from napari_morphomol.registration import FitOptions, fit_transform, read_keypoints_csv, registration_record

    results = open_results(results_store)
    pairs = read_keypoints_csv(synthetic_sample.keypoints_csv)
    fitted = fit_transform(pairs, FitOptions(model, n_regions=2 if model == "per-region" else None))
    results = dataclasses.replace(results, metadata={**results.metadata, "registration": registration_record(fitted)})
    written = write_landmarks_csv(results, tmp_path / "landmarks.csv")
    back = read_keypoints_csv(written)
    np.testing.assert_array_equal(back.he_px, pairs.he_px[pairs.active])
    np.testing.assert_array_equal(back.global_px, pairs.global_px[pairs.active])
    shapes = tile_shapes(results, run_registration(results.metadata))
    corner = np.asarray(shapes.geometry.iloc[0].exterior.coords[0])
    first = results.tiles.iloc[0]
    np.testing.assert_allclose(corner, fitted.apply_xy(np.array([[first.he_x0, first.he_y0]]))[0])
    if model == "per-region":  # the full model, not its best affine
        best = apply_affine_xy(fitted.best_affine, np.array([[first.he_x0, first.he_y0]]))[0]
        assert not np.allclose(corner, best, atol=1e-3)


def test_no_landmarks_for_a_matrix_registration(results_store, tmp_path):
    with pytest.raises(InputError, match="no landmarks"):
        export_results(results_store, landmarks=tmp_path / "landmarks.csv")
    assert not (tmp_path / "landmarks.csv").exists()


def test_existing_file_is_kept_unless_overwrite(results_store, tmp_path):
    earlier = tmp_path / "run.h5ad"
    earlier.write_bytes(b"earlier")
    with pytest.raises(InputError, match="already exists"):
        export_results(results_store, h5ad=earlier, spatialdata=tmp_path / "run.zarr")
    assert earlier.read_bytes() == b"earlier"
    assert not (tmp_path / "run.zarr").exists(), "targets are checked before any work"


def test_inputs_are_never_targets(results_store):
    with pytest.raises(InputError, match="input of the run"):
        export_results(results_store, h5ad=results_store / "run.h5ad")
    assert not (results_store / "run.h5ad").exists()


def test_nothing_asked_is_an_input_error(results_store):
    with pytest.raises(InputError, match="nothing to export"):
        export_results(results_store)
