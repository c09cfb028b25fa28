"""Predictions per Xenium cell from a run's token map."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest

from napari_morphomol.analysis import cells_anndata, explore_run, read_xenium_cells
from napari_morphomol.coords import apply_affine_xy
from napari_morphomol.errors import InputError
from napari_morphomol.models import ADDON_TOKEN_HEAD
from napari_morphomol.registration import read_alignment_csv


@pytest.fixture(scope="module")
def cells(token_results_store):
    explorer = explore_run(token_results_store)
    return explorer, cells_anndata(explorer)


def test_per_cell_values_equal_a_slow_reference(cells, synthetic_sample):
    explorer, adata = cells
    results = explorer.results
    table = read_xenium_cells(synthetic_sample.xenium_dir).set_index("cell_id")
    he_to_global = read_alignment_csv(synthetic_sample.alignment_csv)
    geometry = results.metadata["geometry_args"]
    token_he_px = 256 / 7 * 0.5 / geometry["he_pixel_size_um"]  # 18.3 um tokens of the paper's tiles
    token_area_um2 = (256 / 7 * 0.5) ** 2
    log_rate = results.output(ADDON_TOKEN_HEAD)
    rows, cols = results.tiles["row"].to_numpy(), results.tiles["col"].to_numpy()
    for cell_id in adata.obs_names[:: max(1, adata.n_obs // 40)]:
        x_um, y_um, area = table.loc[cell_id, ["x_centroid", "y_centroid", "cell_area"]]
        he = apply_affine_xy(np.linalg.inv(he_to_global), [[x_um / 0.2125, y_um / 0.2125]])[0]
        c, r = int(np.floor(he[0] / token_he_px)), int(np.floor(he[1] / token_he_px))
        over = [(k, (r - 7 * i) * 14 + (c - 7 * j)) for k, (i, j) in enumerate(zip(rows, cols, strict=True))
                if 0 <= r - 7 * i < 14 and 0 <= c - 7 * j < 14]
        assert over, f"cell {cell_id} is kept but no tile covers it"
        token = np.mean([np.log1p(np.exp(log_rate[k, t])) for k, t in over], axis=0)
        expected = np.log1p(np.expm1(token) * area / token_area_um2)
        np.testing.assert_allclose(adata[cell_id].X.ravel(), expected, rtol=1e-4, atol=1e-5)


def test_the_cells_anndata_is_valid_and_scanpy_runs_on_it(cells, synthetic_sample, tmp_path):
    import scanpy as sc

    explorer, adata = cells
    n_cells = len(read_xenium_cells(synthetic_sample.xenium_dir))
    meta = adata.uns["morphomol_cells"]
    assert adata.n_obs + meta["n_cells_off_tiles"] == n_cells and adata.n_obs > 100
    assert adata.obs_names.is_unique and adata.obs_names.name == "cell_id"
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2) and np.isfinite(adata.X).all()
    assert list(adata.var_names) == explorer.results.addon_genes
    measured = adata.var["measured"].to_numpy()
    assert measured.sum() == len(explorer.results.measured_genes)
    assert np.isfinite(adata.layers["measured"][:, measured]).all()
    assert np.isnan(adata.layers["measured"][:, ~measured]).all()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert back.shape == adata.shape and back.uns["morphomol_cells"]["method"] == meta["method"]
    sc.pp.pca(back, n_comps=10)
    sc.pp.neighbors(back, n_neighbors=10)
    sc.tl.leiden(back, flavor="igraph", n_iterations=2, directed=False)
    assert back.obs["leiden"].nunique() >= 1


def test_no_cell_segmentation_or_a_tile_model_is_a_clear_message(tmp_path, synthetic_sample, results_store):
    bare = tmp_path / "xenium"
    shutil.copytree(synthetic_sample.xenium_dir, bare, ignore=shutil.ignore_patterns("cells.parquet", "*.zarr.zip"))
    with pytest.raises(InputError, match="no cells.parquet: this run has no cell segmentation.*token maps work"):
        read_xenium_cells(bare)
    with pytest.raises(InputError, match="predicts per tile only.*no cell view.*--token-head"):
        cells_anndata(explore_run(results_store))


def test_export_writes_the_cells_anndata(token_results_store, results_store, tmp_path, capsys):
    from napari_morphomol.cli import main

    out = tmp_path / "cells.h5ad"
    assert main(["export", str(token_results_store), "--cells-h5ad", str(out)]) == 0
    assert f"cells_h5ad: {out.resolve()}" in capsys.readouterr().out
    written = ad.read_h5ad(out)
    assert written.obs_names.name == "cell_id" and written.uns["morphomol"]["export"] == "cells"
    assert main(["export", str(token_results_store), "--cells-h5ad", str(out), "--overwrite"]) == 0  # ours: replaced
    refused = tmp_path / "refused.h5ad"
    assert main(["export", str(results_store), "--cells-h5ad", str(refused)]) == 2
    assert "predicts per tile only" in capsys.readouterr().err and not refused.exists()


def test_spatialdata_export_holds_the_token_maps(token_results_store, tmp_path):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    from napari_morphomol.export import MEASURED_TOKEN_IMAGE, PREDICTED_TOKEN_IMAGE, export_results

    out = export_results(token_results_store, spatialdata=tmp_path / "run.zarr", clusters=False)["spatialdata"]
    sdata = sd.read_zarr(out)
    explorer = explore_run(token_results_store)
    gene = explorer.results.measured_genes[0]
    for name, kind in ((PREDICTED_TOKEN_IMAGE, "predicted"), (MEASURED_TOKEN_IMAGE, "measured")):
        image = sdata.images[name]
        image = image["scale0"]["image"] if hasattr(image, "children") and image.children else image
        plane = np.asarray(image.sel(c=gene))
        np.testing.assert_allclose(plane, explorer.token_map(gene, kind), rtol=1e-5, equal_nan=True)
        placed = get_transformation(sdata.images[name], "global").to_affine_matrix(("x", "y"), ("x", "y"))
        grid = explorer.token_grid
        np.testing.assert_allclose(placed, grid.he_to_global @ np.diag([grid.token_he_px, grid.token_he_px, 1.0]))
    # the cells table annotates the Xenium cell labels, which lie in global px as the DAPI image
    from napari_morphomol.export import CELL_LABELS, CELL_TABLE

    table = sdata.tables[CELL_TABLE]
    assert table.uns["spatialdata_attrs"]["region"] == CELL_LABELS
    assert table.uns["spatialdata_attrs"]["instance_key"] == "label_id"
    labels = sdata.labels[CELL_LABELS]
    mask = labels["scale0"]["image"] if hasattr(labels, "children") and labels.children else labels
    corner = np.asarray(mask[:300, :300])
    present = set(np.unique(corner).tolist()) - {0}
    assert present and present <= set(range(1, len(read_xenium_cells(explorer.results.metadata["sample"]["xenium_dir"]))
                                            + 1))
    assert present & set(table.obs["label_id"].tolist())
    cells = explorer.cells
    np.testing.assert_allclose(table[cells.obs_names].X, cells.X, rtol=1e-6)
    assert get_transformation(sdata.labels[CELL_LABELS], "global").to_affine_matrix(("x", "y"), ("x", "y")).tolist() \
        == np.eye(3).tolist()


def test_a_moved_bundle_a_foreign_cells_table_and_an_old_run_are_clear_messages(tmp_path, token_results_store):
    import pandas as pd
    import zarr

    with pytest.raises(InputError, match="is not there \\(moved or renamed\\?\\).*move it back"):
        read_xenium_cells(tmp_path / "gone")
    (tmp_path / "other").mkdir()
    pd.DataFrame({"cell_id": ["a"], "x": [1.0]}).to_parquet(tmp_path / "other" / "cells.parquet")
    with pytest.raises(InputError, match="lacks the columns.*not a Xenium cells table"):
        read_xenium_cells(tmp_path / "other")
    old = tmp_path / "old.zarr"
    shutil.copytree(token_results_store, old)
    shutil.rmtree(old / "token_maps" / "measured")  # a run made before measured token maps were stored
    group = zarr.open_group(old, mode="r")
    assert "measured" not in group["token_maps"]
    explorer = explore_run(old)
    gene = explorer.results.measured_genes[0]
    assert np.isfinite(explorer.token_map(gene, "predicted")).any()
    with pytest.raises(InputError, match="holds no stitched measured token maps.*predict` again"):
        explorer.token_map(gene, "measured")


def test_napari_spatialdata_opens_the_token_map_and_the_cell_labels(token_results_store, tmp_path,
                                                                   make_napari_viewer, qtbot):
    import spatialdata as sd
    from napari_spatialdata import Interactive

    from napari_morphomol.export import CELL_LABELS, PREDICTED_TOKEN_IMAGE, export_results

    out = export_results(token_results_store, spatialdata=tmp_path / "run.zarr", clusters=False)["spatialdata"]
    viewer = make_napari_viewer()
    interactive = Interactive(sd.read_zarr(out), headless=True)
    assert interactive._viewer is viewer
    for element in (PREDICTED_TOKEN_IMAGE, CELL_LABELS):  # napari-spatialdata adds layers from a worker thread
        interactive.add_element(element, "global")
        qtbot.waitUntil(lambda name=element: interactive.get_layer(name) is not None, timeout=120_000)
    explorer = explore_run(token_results_store)
    expected = {PREDICTED_TOKEN_IMAGE: explorer.token_grid.shape, CELL_LABELS: explorer.cell_labels[0].shape}
    for name, shape in expected.items():
        layer = interactive.get_layer(name)
        assert tuple((layer.data[0] if layer.multiscale else layer.data).shape[-2:]) == tuple(shape)
