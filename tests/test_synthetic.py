"""Synthetic sample generator: format, determinism, ground-truth consistency, biology."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
import zipfile

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from napari_morphomol.cli import main
from napari_morphomol.elements import MORPHOLOGY
from napari_morphomol.errors import InputError
from napari_morphomol.synthetic import (
    expected_cell_counts,
    load_ground_truth,
    true_global_to_he_px,
    true_he_to_global_px,
    write_synthetic_sample,
)

XENIUM_PX = 0.2125


def _h5_counts(path):
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        mat = sparse.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)
        names = [n.decode() for n in m["features/name"][()]]
        barcodes = [b.decode() for b in m["barcodes"][()]]
    return mat.T.tocsr(), names, barcodes


def test_spatialdata_io_reads_bundle_unchanged(synthetic_sample):
    import spatialdata_io

    sdata = spatialdata_io.xenium(synthetic_sample.xenium_dir)
    truth = load_ground_truth(synthetic_sample.ground_truth_json)
    h, w = truth.morphology_shape
    assert sdata[MORPHOLOGY]["scale0"]["image"].shape == (1, h, w)
    assert sdata["cell_labels"]["scale0"]["image"].shape == (h, w)
    assert sdata["nucleus_labels"]["scale0"]["image"].shape == (h, w)
    cells = pd.read_parquet(synthetic_sample.ground_truth_cells)
    table = sdata["table"]
    assert table.n_obs == len(cells)
    assert table.n_vars == len(truth.core_genes) + len(truth.addon_genes)
    assert list(table.obs["cell_id"]) == list(cells["cell_id"])
    assert len(sdata["cell_boundaries"]) == len(cells)
    assert len(sdata["nucleus_boundaries"]) == len(cells)
    assert len(sdata["transcripts"]) == truth.raw["n_transcripts"]


def test_cell_feature_matrix_counts_assigned_gene_transcripts_with_qv_at_least_20(synthetic_sample):
    x = synthetic_sample.xenium_dir
    counts, names, barcodes = _h5_counts(x / "cell_feature_matrix.h5")
    t = pd.read_parquet(x / "transcripts.parquet", columns=["cell_id", "feature_name", "qv"])
    keep = (t["cell_id"] != "UNASSIGNED") & (t["qv"] >= 20)
    expected = t[keep].groupby(["cell_id", "feature_name"]).size()
    row = {b: i for i, b in enumerate(barcodes)}
    col = {n: i for i, n in enumerate(names)}
    got = np.asarray(counts[[row[c] for c, _ in expected.index], [col[g] for _, g in expected.index]]).ravel()
    np.testing.assert_array_equal(got, expected.to_numpy())
    assert counts.sum() == expected.sum()
    cells = pd.read_parquet(x / "cells.parquet")
    assert list(cells["cell_id"]) == barcodes
    gene = np.array([not n.startswith(("NegControl", "Unassigned")) for n in names])
    np.testing.assert_array_equal(
        cells["transcript_counts"].to_numpy(), np.asarray(counts[:, gene].sum(axis=1)).ravel()
    )


def test_transcripts_have_quality_controls_and_realistic_counts(synthetic_sample):
    t = pq.read_table(synthetic_sample.xenium_dir / "transcripts.parquet").to_pandas()
    assert 0.05 < (t["qv"] < 20).mean() < 0.3
    categories = set(t["codeword_category"])
    assert {"predesigned_gene", "custom_gene", "negative_control_probe", "negative_control_codeword"} <= categories
    assert t.loc[t["feature_name"].str.startswith("NegControlProbe_"), "is_gene"].eq(False).all()
    assert t["transcript_id"].is_unique
    assert t["overlaps_nucleus"].isin([0, 1]).all()
    assert t.loc[t["cell_id"] == "UNASSIGNED", "overlaps_nucleus"].eq(0).all()
    per_cell = t[t["cell_id"] != "UNASSIGNED"].groupby("cell_id").size()
    assert 80 < per_cell.median() < 320
    area_mm2 = 0.36
    assert 0.5e6 < len(t) / area_mm2 < 2.5e6
    assert (t["z_location"] > 0).all()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def content(path):
        if path.suffix != ".zip":
            return path.read_bytes()
        with zipfile.ZipFile(path) as z:  # members carry write times: compare what they hold
            return b"".join(n.encode() + z.read(n) for n in sorted(z.namelist()))

    def digest(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    kwargs = dict(size_mm=(0.25, 0.2), n_core_genes=30, n_addon_genes=10)
    a = write_synthetic_sample(tmp_path / "a", seed=3, **kwargs)
    b = write_synthetic_sample(tmp_path / "b", seed=3, **kwargs)
    c = write_synthetic_sample(tmp_path / "c", seed=4, **kwargs)
    da, db, dc = digest(a.root), digest(b.root), digest(c.root)
    assert da == db
    assert da["xenium/transcripts.parquet"] != dc["xenium/transcripts.parquet"]
    assert da["he_image.ome.tif"] != dc["he_image.ome.tif"]


def test_refuses_non_empty_folder_and_bad_sizes(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(InputError, match="pick a new folder"):
        write_synthetic_sample(tmp_path / "full", size_mm=(0.2, 0.2))
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="size_mm"):
        write_synthetic_sample(tmp_path / "new", size_mm=(0.0, 0.2))
    with pytest.raises(InputError, match="add-on"):
        write_synthetic_sample(tmp_path / "new", size_mm=(0.2, 0.2), n_addon_genes=3)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["full"]
    (tmp_path / "empty").mkdir()
    sample = write_synthetic_sample(tmp_path / "empty", size_mm=(0.15, 0.15), n_core_genes=24, n_addon_genes=10)
    assert (sample.xenium_dir / "experiment.xenium").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


def test_he_pyramid_pixel_size_and_alignment_csv(synthetic_sample):
    truth = load_ground_truth(synthetic_sample.ground_truth_json)
    with tifffile.TiffFile(synthetic_sample.he_path) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert levels[0].shape == (*truth.he_shape, 3)
        assert len(levels) >= 2 and levels[1].shape[0] == (truth.he_shape[0] + 1) // 2
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels")
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(0.2737)
        assert tif.pages[0].description.isascii()
    matrix = np.loadtxt(synthetic_sample.alignment_csv, delimiter=",")
    np.testing.assert_allclose(matrix, truth.he_to_global_affine)
    scale = np.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    assert scale == pytest.approx(0.2737 / XENIUM_PX, rel=0.03)
    rotation = np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))
    assert 3 < abs(rotation) < 21


def test_he_covers_the_whole_morphology_image(synthetic_sample_deformed):
    truth = load_ground_truth(synthetic_sample_deformed.ground_truth_json)
    h, w = truth.morphology_shape
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float)
    he = true_global_to_he_px(corners, truth)
    assert (he > 0).all()
    assert (he[:, 0] < truth.he_shape[1]).all() and (he[:, 1] < truth.he_shape[0]).all()


def _he_at(sample, points_he_px):
    he = tifffile.imread(sample.he_path)
    cols = np.floor(points_he_px[:, 0]).astype(int)
    rows = np.floor(points_he_px[:, 1]).astype(int)
    return he[rows, cols].astype(float)


@pytest.mark.parametrize("which", ["synthetic_sample", "synthetic_sample_deformed"])
def test_nucleus_centres_land_on_dark_hematoxylin(which, request):
    sample = request.getfixturevalue(which)
    truth = load_ground_truth(sample.ground_truth_json)
    cells = pd.read_parquet(sample.ground_truth_cells)
    cells = cells[cells["nucleus_b_um"] > 1.5]
    centres_global = cells[["x_um", "y_um"]].to_numpy() / XENIUM_PX
    centres_he = true_global_to_he_px(centres_global, truth)
    np.testing.assert_allclose(cells[["he_x_px", "he_y_px"]].to_numpy(), centres_he, atol=1e-6)
    np.testing.assert_allclose(true_he_to_global_px(centres_he, truth), centres_global, atol=1e-6)
    nuclei = _he_at(sample, centres_he).mean(axis=1)
    he = tifffile.imread(sample.he_path).mean(axis=2)
    tissue = he[he < 225]
    assert np.median(nuclei) < 120
    assert (nuclei < np.median(tissue)).mean() > 0.95
    if which == "synthetic_sample_deformed":
        # the warp matters: the affine alone misses the nuclei by more than a pixel somewhere
        by_affine = (centres_he - truth.transform.affine[:2, 2]) @ np.linalg.inv(truth.transform.affine[:2, :2]).T
        miss_px = np.linalg.norm(by_affine - centres_he, axis=1)
        assert miss_px.max() > 3


def test_dapi_bright_at_nuclei_and_labels_match_cells(synthetic_sample):
    dapi = tifffile.imread(synthetic_sample.xenium_dir / "morphology_focus" / "morphology_focus_0000.ome.tif")
    cells = pd.read_parquet(synthetic_sample.ground_truth_cells)
    cols = np.floor(cells["x_um"].to_numpy() / XENIUM_PX).astype(int)
    rows = np.floor(cells["y_um"].to_numpy() / XENIUM_PX).astype(int)
    at_nuclei = dapi[rows, cols].astype(float)
    assert np.median(at_nuclei) > 4 * np.median(dapi)
    import zarr

    store = zarr.storage.ZipStore(synthetic_sample.xenium_dir / "cells.zarr.zip", mode="r")
    group = zarr.open_group(store, mode="r")
    nucleus = group["masks/0"][...]
    cell = group["masks/1"][...]
    store.close()
    labels = np.arange(1, len(cells) + 1)
    # overlapping nuclei hide a few centres
    assert (nucleus[rows, cols] == labels).mean() > 0.95
    assert (cell[rows, cols] == labels).mean() > 0.95
    inside = nucleus > 0
    np.testing.assert_array_equal(cell[inside], nucleus[inside])


def test_keypoints_follow_the_true_transform(synthetic_sample_deformed):
    truth = load_ground_truth(synthetic_sample_deformed.ground_truth_json)
    kp = pd.read_csv(synthetic_sample_deformed.keypoints_csv)
    assert list(kp.columns) == ["fixedX", "fixedY", "alignmentX", "alignmentY"]
    assert 8 <= len(kp) <= 12
    mapped = true_he_to_global_px(kp[["alignmentX", "alignmentY"]].to_numpy(), truth)
    error_px = np.linalg.norm(mapped - kp[["fixedX", "fixedY"]].to_numpy(), axis=1)
    assert 0.1 < np.median(error_px) < 6


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 4000), st.floats(0, 4000)), min_size=1, max_size=20),
    st.integers(0, 2**16),
)
def test_true_transform_inverse_and_grid_form_agree(points, seed):
    from napari_morphomol.synthetic.transform import random_transform

    transform, _ = random_transform(np.random.default_rng(seed), (3000, 3000), 0.2737, XENIUM_PX, 300, True)
    pts = np.array(points, dtype=float)
    back = transform.global_to_he_px(transform.he_to_global_px(pts))
    np.testing.assert_allclose(back, pts, atol=1e-6)
    cols = np.array([3, 17, 1500])
    rows = np.array([5, 2900])
    wx, wy = transform.he_grid_to_world_um(cols, rows, XENIUM_PX)
    uu, vv = np.meshgrid(cols + 0.5, rows + 0.5)
    ref = transform.he_to_global_px(np.column_stack([uu.ravel(), vv.ravel()])) * XENIUM_PX
    np.testing.assert_allclose(np.column_stack([wx.ravel(), wy.ravel()]), ref, atol=2e-3)


def _addon_signal(sample):
    """Per-gene correlations of add-on counts with cell states (tumour cells only)."""
    truth = load_ground_truth(sample.ground_truth_json)
    counts, names, _ = _h5_counts(sample.xenium_dir / "cell_feature_matrix.h5")
    cells = pd.read_parquet(sample.ground_truth_cells)
    tumour = (cells["cell_type"] == "tumour").to_numpy()
    x = np.log1p(counts.toarray()[tumour])
    col = {n: i for i, n in enumerate(names)}

    def corr(genes, state):
        s = cells.loc[tumour, state].to_numpy().astype(float)
        return np.array([np.corrcoef(x[:, col[g]], s)[0, 1] for g in genes])

    return truth, x, col, corr, cells, tumour


def _held_out_corr(features: np.ndarray, target: np.ndarray) -> float:
    """Correlation with the target of a ridge prediction fitted on the other half of the cells."""
    z = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-9)
    z = np.column_stack([z, np.ones(len(z))])
    half = np.arange(len(z)) % 2 == 0
    a, b = z[half], z[~half]
    w = np.linalg.solve(a.T @ a + 50.0 * np.eye(a.shape[1]), a.T @ target[half])
    return float(np.corrcoef(b @ w, target[~half])[0, 1])


def test_addon_genes_need_both_modalities(synthetic_sample):
    truth, x, col, corr, cells, tumour = _addon_signal(synthetic_sample)
    programs = truth.raw["panel"]
    prolif = [g for g, p in programs["addon_programs"].items() if p == "state:proliferating"]
    ifn_addon = [g for g, p in programs["addon_programs"].items() if p == "state:ifn"]
    ifn_core = [g for g, p in programs["core_programs"].items() if p == "state:ifn"]
    # morphology state drives add-on genes, and core genes do not predict it: a ridge fit on half
    # the tumour cells predicts the other half no better than chance, while the nuclei do
    assert corr(prolif, "proliferating").mean() > 0.4
    p_state = cells.loc[tumour, "proliferating"].to_numpy().astype(float)
    core = x[:, [col[g] for g in truth.core_genes]]
    assert _held_out_corr(core, p_state) < 0.2
    nuclei = cells.loc[tumour, ["nucleus_radius_um", "chromatin_darkness"]].to_numpy()
    assert _held_out_corr(nuclei, p_state) > 0.8
    loadings = np.array(programs["loadings"])
    latents = truth.raw["latents"]
    morph = [latents.index(m) for m in truth.raw["morphology_states"]]
    assert not loadings[: len(truth.core_genes)][:, morph].any()
    # hidden state drives add-on genes and core genes alike, and leaves the nuclei unchanged
    assert corr(ifn_addon, "ifn").mean() > 0.3
    assert corr(ifn_core, "ifn").mean() > 0.3
    ifn = cells.loc[tumour, "ifn"].to_numpy()
    assert _held_out_corr(core, ifn) > 0.5
    assert abs(_held_out_corr(nuclei, ifn)) < 0.2
    radius = cells.loc[tumour, "nucleus_radius_um"].to_numpy()
    # proliferating nuclei are larger and darker (visible in H&E)
    p = cells.loc[tumour, "proliferating"].to_numpy()
    assert radius[p].mean() > 1.15 * radius[~p].mean()
    dark = cells.loc[tumour, "chromatin_darkness"].to_numpy()
    assert dark[p].mean() > 1.3 * dark[~p].mean()


def test_samples_of_a_cohort_share_the_gene_biology(synthetic_sample, synthetic_sample_deformed):
    """Seeds vary the tissue, not what each gene responds to: a model trained on some samples
    must meet the same gene programs, biases and loadings on a held-out one."""
    first, second = (json.loads(s.ground_truth_json.read_text()) for s in (synthetic_sample, synthetic_sample_deformed))
    assert first["seed"] != second["seed"]
    assert first["panel"] == second["panel"]
    assert first["n_cells"] != second["n_cells"]


def test_ground_truth_json_describes_the_sample(synthetic_sample_deformed):
    raw = json.loads(synthetic_sample_deformed.ground_truth_json.read_text())
    assert raw["deformation"]["enabled"] and len(raw["deformation"]["components"]) > 0
    panel = json.loads(synthetic_sample_deformed.panel_json.read_text())
    assert panel == {"core": raw["panel"]["core"], "addon": raw["panel"]["addon"]}
    assert len(panel["core"]) == 380 and len(panel["addon"]) == 100
    assert not set(panel["core"]) & set(panel["addon"])
    cells = pd.read_parquet(synthetic_sample_deformed.ground_truth_cells)
    assert set(cells["cell_type"]) <= set(raw["cell_types"])
    assert set(cells["region"]) <= set(raw["regions"]) - {"background"}
    assert len(set(cells["cell_type"])) >= 5
    experiment = json.loads((synthetic_sample_deformed.xenium_dir / "experiment.xenium").read_text())
    assert experiment["pixel_size"] == XENIUM_PX
    assert experiment["analysis_sw_version"] == "xenium-3.0.0.15"
    assert experiment["num_cells"] == len(cells)


def test_cli_synth_writes_a_sample(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([
        "synth", str(out), "--size-mm", "0.2", "0.15", "--core-genes", "30", "--addon-genes", "10",
        "--seed", "2", "--no-deformation",
    ]) == 0
    printed = capsys.readouterr().out
    assert "transcripts/s" in printed and "cells:" in printed
    assert (out / "xenium" / "transcripts.parquet").is_file()
    assert load_ground_truth(out).raw["deformation"]["enabled"] is False
    assert main(["synth", str(out), "--size-mm", "0.2", "0.15"]) == 2
    assert "pick a new folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_cells():
    from napari_morphomol.synthetic.tissue import make_cells, make_fields

    size_um = (300.0, 250.0)
    return make_cells(0, make_fields(np.random.default_rng([0, 0]), size_um), size_um)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 330), st.floats(-30, 280)), min_size=1, max_size=50))
def test_owning_cell_is_nearest_centre_within_its_radius(small_cells, points):
    from napari_morphomol.synthetic.tissue import owning_cell

    pts = np.array(points, dtype=np.float32)
    owner = owning_cell(small_cells, pts[:, 0], pts[:, 1])
    centres = np.column_stack([small_cells.x_um, small_cells.y_um]).astype(np.float32)
    d2 = ((pts[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    nearest = d2.argmin(axis=1)
    inside = d2[np.arange(len(pts)), nearest] < small_cells.cell_radius_um[nearest].astype(np.float32) ** 2
    expected = np.where(inside, nearest, -1)
    # exact ties between two centres are measure-zero; allow them anyway
    tie = np.sort(d2, axis=1)[:, :2]
    np.testing.assert_array_equal(owner[~np.isclose(tie[:, 0], tie[:, 1])], expected[~np.isclose(tie[:, 0], tie[:, 1])])


def test_expected_cell_counts_are_what_the_counts_were_drawn_from(synthetic_sample):
    """The noise-free expectation (the fine-maps benchmark's ceiling) is recomputed from the ground
    truth alone: the measured counts scatter around it as Poisson draws thinned by quality and by
    transcripts landing outside their cell."""
    truth = load_ground_truth(synthetic_sample.ground_truth_json)
    expected = expected_cell_counts(synthetic_sample.root)
    assert list(expected.columns) == truth.addon_genes
    counts, names, barcodes = _h5_counts(synthetic_sample.xenium_dir / "cell_feature_matrix.h5")
    assert list(expected.index) == barcodes
    measured = counts.toarray()[:, [names.index(g) for g in truth.addon_genes]]
    kept = measured.sum() / expected.to_numpy().sum()
    assert 0.6 < kept <= 1.0  # qv < 20 and transcripts outside their cell are not counted
    # the tissue's most variable genes: the expectation explains their counts as Poisson noise allows
    variable = np.argsort(-expected.to_numpy().std(axis=0))[:10]
    for g in variable:
        r = np.corrcoef(np.log1p(expected.to_numpy()[:, g]), np.log1p(measured[:, g]))[0, 1]
        assert r > 0.5, truth.addon_genes[g]
    with pytest.raises(InputError, match="no genes"):
        expected_cell_counts(synthetic_sample.root, ["NOT_A_GENE"])
