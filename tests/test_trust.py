"""Trust: conformal intervals, the out-of-distribution flag, their card, the run, the AnnData and the dock."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.analysis import explore_run
from napari_morphomol.cli import main
from napari_morphomol.errors import InputError
from napari_morphomol.inference import PredictOptions, open_results
from napari_morphomol.layers.run import INTERVAL_LAYER, OUTLIER_LAYER, PREDICTED_LAYER
from napari_morphomol.models import load_checkpoint, read_model_card
from napari_morphomol.models.fusion import token_outlier_score
from napari_morphomol.models.trust import (
    CALIBRATED_LEVELS,
    Calibration,
    conformal_quantiles,
    level_index,
    tile_interval,
    token_interval,
)
from test_widget_explore import open_run

# -- conformal intervals ----------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), level=st.sampled_from(CALIBRATED_LEVELS))
def test_normalised_conformal_coverage_is_nominal_on_exchangeable_data(seed, level):
    """Heteroscedastic data: the interval +- q sigma, q from 2,000 calibration points, covers the
    level of 20,000 new points within sampling error (the coverage given a calibration set is
    Beta distributed with sd sqrt(a (1 - a) / n) ~ 0.007 at 90 %)."""
    rng = np.random.default_rng(seed)
    n_cal, n_test, genes = 2000, 20_000, 3
    sigma_cal, sigma_test = rng.uniform(0.1, 2.0, (n_cal, genes)), rng.uniform(0.1, 2.0, (n_test, genes))
    residual_cal = rng.standard_normal((n_cal, genes)) * sigma_cal
    residual_test = rng.standard_normal((n_test, genes)) * sigma_test
    q = conformal_quantiles(np.abs(residual_cal) / sigma_cal)[level_index(level)]
    coverage = (np.abs(residual_test) <= q * sigma_test).mean(axis=0)
    tolerance = 5 * np.sqrt(level * (1 - level) / n_cal) + 3 * np.sqrt(level * (1 - level) / n_test)
    np.testing.assert_array_less(np.abs(coverage - level), tolerance)


def test_adaptive_intervals_are_narrower_than_a_constant_one_of_the_same_coverage():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.05, 2.0, (5000, 1))
    residual = rng.standard_normal((5000, 1)) * sigma
    q = conformal_quantiles(np.abs(residual[:2500]) / sigma[:2500])[level_index(0.9)]
    adaptive = q * sigma[2500:]
    constant = np.quantile(np.abs(residual[2500:]), (np.abs(residual[2500:]) <= adaptive).mean())
    assert adaptive.mean() < 0.9 * constant  # 1.64 against 1.93


def test_too_few_calibration_points_give_an_unbounded_interval_not_a_narrow_one():
    q = conformal_quantiles(np.arange(10.0)[:, None])  # 10 points: 0.99 needs rank 11
    assert np.isinf(q[level_index(0.99), 0]) and q[level_index(0.5), 0] == 5.0


def test_bounds_hold_the_prediction_and_never_go_below_zero_counts():
    predictions = np.array([[0.1, 3.0]])
    lower, upper = tile_interval(predictions, np.log(np.array([[1.0, 0.01]])), np.array([2.0, 2.0]))
    np.testing.assert_allclose(lower, [[0.0, 2.8]], rtol=1e-6)
    np.testing.assert_allclose(upper, [[2.1, 3.2]], rtol=1e-6)
    token_lower, token_upper = token_interval(np.log1p(np.array([0.0, 4.0])), np.array([1.0, 1.0]))
    assert token_lower[0] == 0 and token_upper[0] > 0  # an empty token can still hold a count
    np.testing.assert_allclose(np.expm1([token_lower[1], token_upper[1]]), [4 - np.sqrt(4.5), 4 + np.sqrt(4.5)],
                               rtol=1e-5)


def test_an_uncalibrated_level_is_refused_naming_the_calibrated_ones():
    with pytest.raises(InputError, match="0.5, 0.8, 0.9, 0.95, 0.99"):
        level_index(0.85)
    with pytest.raises(InputError, match="0.85"):
        PredictOptions(store="r.zarr", interval_level=0.85)


# -- out-of-distribution score ----------------------------------------------------------------------


def test_the_outlier_score_is_a_high_quantile_of_token_distances_to_the_reference():
    """Reference tokens 0, 1 and 10 on a line (neighbours: all three, k = 10 > 3): a tile of ten
    tokens at the origin scores their mean distance, 11 / 3; one token far off moves the 90th
    percentile, as a tenth of a tile unlike anything seen should."""
    import torch

    reference = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    centre, scale = torch.zeros(2), torch.ones(2)
    tile = torch.zeros(1, 10, 2)
    np.testing.assert_allclose(token_outlier_score(tile, reference, centre, scale).numpy(), [11 / 3], rtol=1e-6)
    tile[0, :2] = torch.tensor([0.0, 30.0])
    assert token_outlier_score(tile, reference, centre, scale).item() > 20
    shifted = token_outlier_score(torch.zeros(1, 10, 2) + 5.0, reference, centre + 5.0, scale)
    np.testing.assert_allclose(shifted.numpy(), [11 / 3], rtol=1e-6)  # standardised before the distances


def test_a_model_given_no_image_has_no_outlier_score_rather_than_a_wrong_one():
    import dataclasses

    import torch

    from napari_morphomol.models import build_model
    from napari_morphomol.models.trust import with_outlier_reference
    from test_models_training import TinyTiles, tiny_config

    config = tiny_config("early_fusion_add", unimodal_inputs=True)
    model = with_outlier_reference(build_model(config), TinyTiles(4, 0))
    assert model.config == dataclasses.replace(config, outlier_reference_tokens=model.outlier_reference.shape[0])
    assert model.outlier_reference.shape[1] == 2 * model.token_dim  # token feature and patch embedding
    tiles = TinyTiles(2, 1)
    both = model(tiles.images, tiles.tokens).outlier_score
    assert both.shape == (2, 1) and torch.isfinite(both).all()
    assert torch.isnan(model(None, tiles.tokens).outlier_score).all()


def test_a_dropout_model_scores_an_he_alone_against_image_only_tokens():
    """A model trained with modality dropout keeps a second reference, of image-only token features:
    its image route is scored against tokens of that route, not against fused ones."""
    import torch

    from napari_morphomol.models import build_model
    from napari_morphomol.models.trust import with_outlier_reference
    from test_models_training import TinyTiles, tiny_config

    model = with_outlier_reference(build_model(tiny_config("early_fusion_add", unimodal_inputs=True)), TinyTiles(4, 0))
    assert model.outlier_routes == ("both", "image")
    fused, image = model.outlier_reference_of("both")[0], model.outlier_reference_of("image")[0]
    assert fused.shape == image.shape and not torch.equal(fused, image)
    training = TinyTiles(4, 0)
    on_training = model(training.images, None).outlier_score  # the image route's own training tiles
    against_fused = model.outlier_reference_of("both")
    features = model.outlier_features(training.images,
                                      model.forward_tokens(model.forward_features(training.images, None)))
    from napari_morphomol.models.fusion import token_outlier_score

    assert (on_training[:, 0] < token_outlier_score(features, *against_fused)).all()


def test_a_dropout_model_has_a_variance_head_per_route():
    """The H&E alone errs more and elsewhere than both inputs: its spread comes from a head of its own."""
    import torch

    from napari_morphomol.models import build_model
    from test_models_training import TinyTiles, tiny_config

    model = build_model(tiny_config("early_fusion_add", unimodal_inputs=True, variance_head=True)).eval()
    assert set(model.variance_heads()) == {"both", "image"}
    with torch.no_grad():
        model.variance_head_image.weight.zero_()
        model.variance_head_image.bias.fill_(1.5)
    tiles = TinyTiles(2, 0)
    image_only = model(tiles.images, None).prediction_log_variance
    both = model(tiles.images, tiles.tokens).prediction_log_variance
    assert torch.allclose(image_only, torch.full_like(image_only, 1.5)) and not torch.allclose(both, image_only)
    assert set(build_model(tiny_config("early_fusion_add", variance_head=True)).variance_heads()) == {"both"}


# -- the card ---------------------------------------------------------------------------------------


def test_calibration_survives_save_and_load_bit_for_bit(trusted_checkpoint, tmp_path):
    import torch

    from napari_morphomol.models import save_checkpoint

    model, card = load_checkpoint(trusted_checkpoint)
    again = save_checkpoint(model, card, tmp_path / "again.safetensors")
    reloaded, _ = load_checkpoint(again)
    for name in ("outlier_reference", "outlier_centre", "outlier_scale"):
        assert torch.equal(getattr(model, name), getattr(reloaded, name))
    assert model.outlier_reference.shape == (card.model.outlier_reference_tokens, 2 * model.token_dim)
    for loaded in (load_checkpoint(again)[1], read_model_card(again)):
        for scale, values in card.calibration.scales.items():
            assert np.array_equal(loaded.calibration.scales[scale].quantiles, values.quantiles)
            assert loaded.calibration.scales[scale].quantiles.dtype == np.float64
        assert loaded.calibration.outliers == card.calibration.outliers
    assert set(card.calibration.scales) == {"tile", "token"}


def test_a_card_whose_calibration_does_not_fit_is_refused(trusted_checkpoint):
    card = read_model_card(trusted_checkpoint)
    values = card.calibration.to_card()
    with pytest.raises(InputError, match="levels x"):
        Calibration.from_card(values, card.model.n_addon_genes + 1)
    with pytest.raises(InputError, match="numeric threshold"):
        Calibration.from_card({**values, "outliers": {"threshold": "high"}}, card.model.n_addon_genes)
    with pytest.raises(InputError, match="between 0 and 1"):
        Calibration.from_card({**values, "levels": [0.9, 1.5, 0.5, 0.8, 0.95]}, card.model.n_addon_genes)


# -- a run ------------------------------------------------------------------------------------------


def test_predict_writes_bounds_around_every_prediction_and_a_flag_per_tile(trusted_results_store,
                                                                          trusted_checkpoint):
    results = open_results(trusted_results_store)
    trust, card = results.trust, read_model_card(trusted_checkpoint)
    assert trust.unavailable is None and trust.level == 0.9 and trust.samples == ("sample",)
    assert trust.lower.shape == trust.upper.shape == results.predictions.shape
    assert (trust.lower <= np.maximum(results.predictions, 0) + 1e-6).all()  # no bound below 0 counts
    assert (trust.upper >= results.predictions).all()
    assert (trust.lower >= 0).all()
    scores = results.output("outlier_score")[:, 0]
    np.testing.assert_array_equal(trust.outlier_score, scores)
    np.testing.assert_array_equal(trust.outlier_flag, scores > card.calibration.outliers.threshold)
    np.testing.assert_allclose(trust.token_quantile, card.calibration.quantile("token", 0.9))
    assert results.metadata["trust"]["n_flagged"] == int(trust.outlier_flag.sum())


def test_a_model_without_calibration_still_predicts_and_says_intervals_are_unavailable(results_store):
    results = open_results(results_store)
    assert results.trust.unavailable and "no calibration" in results.trust.unavailable
    explorer = explore_run(results_store)
    assert explorer.interval_refusal("tile") == results.trust.unavailable
    with pytest.raises(InputError, match="no calibration"):
        explorer.tile_values(explorer.genes[0], "interval")
    assert "lower" not in explorer.tile_report(0).columns
    assert "predicted_lower" not in explorer.adata.layers and "morphomol_trust" not in explorer.adata.uns


def test_the_anndata_carries_bounds_flags_coverage_and_the_calibration(trusted_results_store):
    explorer = explore_run(trusted_results_store)
    adata, trust = explorer.adata, explorer.trust
    np.testing.assert_array_equal(adata.layers["predicted_lower"], trust.lower)
    np.testing.assert_array_equal(adata.obs["out_of_distribution"].to_numpy(), trust.outlier_flag)
    uns = adata.uns["morphomol_trust"]
    assert uns["level"] == 0.9 and uns["tile_quantiles"].shape == (len(CALIBRATED_LEVELS), len(explorer.genes))
    gene = explorer.results.measured_genes[0]
    column = explorer.genes.index(gene)
    measured = adata.layers["measured"][:, column]
    inside = (measured >= trust.lower[:, column]) & (measured <= trust.upper[:, column])
    assert explorer.metrics.loc[gene, "coverage"] == pytest.approx(inside.mean())
    np.testing.assert_allclose(explorer.tile_values(gene, "interval"), trust.upper[:, column] - trust.lower[:, column])
    token_width = explorer.token_map(gene, "interval")
    assert np.nanmin(token_width) > 0 and np.isnan(token_width).sum() == np.isnan(explorer.token_map(gene)).sum()
    cells = explorer.cells
    assert (cells.layers["predicted_lower"] <= cells.X + 1e-6).all()
    assert (cells.layers["predicted_upper"] >= cells.X).all()
    assert cells.obs["out_of_distribution"].dtype == bool


def test_export_writes_bounds_as_layers_and_the_flag_in_obs(trusted_results_store, tmp_path):
    import anndata as ad
    import spatialdata as sd

    from napari_morphomol.export import TILE_TABLE

    h5ad, zarr_path = tmp_path / "run.h5ad", tmp_path / "run.zarr"
    assert main(["export", str(trusted_results_store), "--h5ad", str(h5ad), "--spatialdata", str(zarr_path)]) == 0
    for adata in (ad.read_h5ad(h5ad), sd.read_zarr(zarr_path)[TILE_TABLE]):
        assert {"predicted_lower", "predicted_upper", "measured"} <= set(adata.layers)
        assert {"outlier_score", "out_of_distribution"} <= set(adata.obs)
        assert adata.uns["morphomol_trust"]["level"] == 0.9 and "token_quantiles" in adata.uns["morphomol_trust"]


def test_predict_prints_the_flagged_tiles(synthetic_sample, trusted_checkpoint, tmp_path, capsys):
    s = synthetic_sample
    out = tmp_path / "r.zarr"
    assert main(["predict", str(s.xenium_dir), "--he", str(s.he_path), "--checkpoint", str(trusted_checkpoint),
                 "--alignment", str(s.alignment_csv), "--out", str(out), "--device", "cpu",
                 "--interval-level", "0.8"]) == 0
    assert "flagged out of distribution" in capsys.readouterr().out
    assert open_results(out).trust.level == 0.8


# -- the dock ---------------------------------------------------------------------------------------


def test_the_dock_shows_interval_width_greys_out_flagged_tiles_and_inspects_both(make_napari_viewer, qtbot,
                                                                                  trusted_results_store):
    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, trusted_results_store)
    explorer, trust = widget.explorer, widget.explorer.trust
    assert INTERVAL_LAYER in viewer.layers and not viewer.layers[INTERVAL_LAYER].visible
    outliers = viewer.layers[OUTLIER_LAYER]
    names = [layer.name for layer in viewer.layers]
    assert names.index(OUTLIER_LAYER) > names.index(PREDICTED_LAYER)  # greys the prediction out, not under it
    assert int((outliers.data == 1).any()) == int(trust.outlier_flag.any())
    assert "90% intervals" in widget.trust_note.text()
    gene = explorer.results.measured_genes[0]
    widget.show_gene(gene)
    viewer.layers[INTERVAL_LAYER].visible = True
    np.testing.assert_array_equal(viewer.layers[INTERVAL_LAYER].data, explorer.gene_map(gene, "interval"))
    headers = [widget.metrics_table.horizontalHeaderItem(i).text() for i in range(widget.metrics_table.columnCount())]
    assert headers[-1] == "coverage"
    tile = int(np.flatnonzero(trust.outlier_flag)[0]) if trust.outlier_flag.any() else 0
    row = explorer.results.tiles.iloc[tile]
    assert widget.inspect_at_um(float(row["um_x"]), float(row["um_y"])) == tile
    assert "outlier score" in widget.inspector_label.text()
    assert ("OUT OF DISTRIBUTION" in widget.inspector_label.text()) == bool(trust.outlier_flag[tile])
    assert widget.inspector_table.horizontalHeaderItem(3).text() == "90% interval"
    assert " - " in widget.inspector_table.item(0, 3).text()
    widget.resolution.setCurrentIndex(widget.resolution.findData("token"))
    np.testing.assert_array_equal(viewer.layers[INTERVAL_LAYER].data, explorer.token_map(gene, "interval"))


def test_the_dock_says_intervals_are_unavailable_for_an_uncalibrated_model(make_napari_viewer, qtbot, results_store):
    viewer = make_napari_viewer()
    widget = open_run(viewer, qtbot, results_store)
    assert INTERVAL_LAYER not in viewer.layers and OUTLIER_LAYER not in viewer.layers
    assert "unavailable" in widget.trust_note.text()
    widget.inspect_at_um(*widget.explorer.results.tiles[["um_x", "um_y"]].iloc[0].to_numpy(dtype=float))
    assert widget.inspector_table.item(0, 3).text() == "unavailable"
    assert "outlier" not in widget.inspector_label.text()


# -- the generator's shifts -------------------------------------------------------------------------


def test_the_generator_makes_each_shift_and_refuses_unknown_ones(tmp_path):
    from napari_morphomol.registration.formats import read_alignment_csv
    from napari_morphomol.synthetic import write_synthetic_sample
    from napari_morphomol.synthetic.plan import DatasetShift

    with pytest.raises(InputError, match="cohort, unseen"):
        DatasetShift(stain="purple")
    with pytest.raises(InputError, match="empty"):
        DatasetShift(tissue="sarcomatoid", tissue_region_um=(10, 10, 5, 20))
    common = dict(size_mm=(0.3, 0.3), seed=3, deformation=False)
    plain = write_synthetic_sample(tmp_path / "plain", **common)
    shifted = write_synthetic_sample(tmp_path / "shifted", shift=DatasetShift(registration_offset_um=(50.0, 0.0)),
                                     **common)
    moved = read_alignment_csv(shifted.alignment_csv) - read_alignment_csv(plain.alignment_csv)
    np.testing.assert_allclose(moved[:, 2], [50.0 / 0.2125, 0.0, 0.0], atol=1e-6)
    assert shifted.he_path.read_bytes() == plain.he_path.read_bytes()
    assert json.loads(shifted.ground_truth_json.read_text())["shift"]["registration_offset_um"] == [50.0, 0.0]
    sarcomatoid = write_synthetic_sample(tmp_path / "sarcomatoid", shift=DatasetShift(
        tissue="sarcomatoid", tissue_region_um=(0.0, 0.0, 150.0, 300.0)), **common)
    import pandas as pd

    cells = pd.read_parquet(sarcomatoid.ground_truth_cells)
    aspect = cells["nucleus_a_um"] / cells["nucleus_b_um"]
    inside = (cells["cell_type"] == "tumour") & (cells["x_um"] < 150.0)
    assert inside.any() and np.allclose(aspect[inside], 3.2, rtol=1e-3)
    assert (aspect[~inside & (cells["cell_type"] == "tumour")] < 2.5).all()
    assert "shift" not in json.loads(plain.ground_truth_json.read_text())
    stain = write_synthetic_sample(tmp_path / "stain", shift=DatasetShift(stain="unseen"), **common)
    truth = json.loads(stain.ground_truth_json.read_text())
    assert truth["stain"] != json.loads(plain.ground_truth_json.read_text())["stain"]


# -- calibrating on runs of held-out slides --------------------------------------------------------


def test_calibrate_on_runs_scores_tiles_stitched_tokens_and_cells(trusted_checkpoint, trusted_results_store,
                                                                 results_store, synthetic_sample, tmp_path, capsys):
    from napari_morphomol.analysis.calibration import run_scores

    out = tmp_path / "recalibrated.safetensors"
    assert main(["calibrate", str(trusted_checkpoint), str(results_store), "--out", str(out)]) == 2
    assert "was predicted with another model" in capsys.readouterr().err
    assert main(["calibrate", str(trusted_checkpoint), str(trusted_results_store), "--out",
                 str(trusted_checkpoint)]) == 2  # never over the model
    assert main(["calibrate", str(trusted_checkpoint), str(trusted_results_store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cell:" in printed and "out-of-distribution threshold" in printed
    card, old = read_model_card(out), read_model_card(trusted_checkpoint)
    assert set(card.calibration.scales) == {"tile", "token", "cell"}
    scores = run_scores(explore_run(trusted_results_store))
    token = scores["token"]
    measured = np.isfinite(token).any(axis=0)
    gene = int(np.flatnonzero(measured)[0])
    column = token[:, gene][np.isfinite(token[:, gene])]
    expected = np.sort(column)[int(np.ceil((len(column) + 1) * 0.9)) - 1]
    assert card.calibration.quantile("token", 0.9)[gene] == expected  # the stitched tokens' own quantile
    np.testing.assert_array_equal(card.calibration.quantile("token", 0.9)[~measured],
                                  old.calibration.quantile("token", 0.9)[~measured])  # unmeasured: kept
    assert card.calibration.outliers.threshold == pytest.approx(
        np.quantile(open_results(trusted_results_store).output("outlier_score")[:, 0], 0.99))
    rerun = tmp_path / "rerun.zarr"
    s = synthetic_sample
    assert main(["predict", str(s.xenium_dir), "--he", str(s.he_path), "--alignment", str(s.alignment_csv),
                 "--checkpoint", str(out), "--out", str(rerun), "--device", "cpu"]) == 0
    explorer = explore_run(rerun)
    np.testing.assert_allclose(explorer.trust.cell_quantile, card.calibration.quantile("cell", 0.9))
    lower, upper = token_interval(explorer.cells.X, explorer.trust.cell_quantile)
    np.testing.assert_allclose(explorer.cells.layers["predicted_upper"], upper, rtol=1e-6)


def test_a_dropout_model_is_calibrated_on_the_he_alone_too(dropout_trusted_checkpoint, synthetic_sample, tmp_path):
    """fit_calibration gives a dropout model the image route's own quantiles and threshold; they
    survive save and load bit for bit, and an H&E-alone run carries intervals and flags from them."""
    import torch

    from napari_morphomol.inference import PredictOptions, open_results, predict
    from napari_morphomol.io.sample import load_sample
    from napari_morphomol.models import save_checkpoint

    model, card = load_checkpoint(dropout_trusted_checkpoint)
    image = card.calibration.for_route("image", card.model.default_route)
    assert set(card.calibration.routes) == {"image"} and set(image.scales) == {"tile", "token"}
    assert not np.array_equal(image.scales["tile"].quantiles, card.calibration.scales["tile"].quantiles)
    assert image.outliers.threshold != card.calibration.outliers.threshold
    assert card.calibration.for_route("transcripts", "both") is None
    again = save_checkpoint(model, card, tmp_path / "again.safetensors")
    reloaded, loaded = load_checkpoint(again)
    assert torch.equal(model.outlier_reference_image, reloaded.outlier_reference_image)
    loaded_image = loaded.calibration.routes["image"]
    for scale, values in image.scales.items():
        assert np.array_equal(loaded_image.scales[scale].quantiles, values.quantiles)
    assert loaded_image.outliers == image.outliers

    out = predict(load_sample(he_path=synthetic_sample.he_path),
                  PredictOptions(checkpoint=dropout_trusted_checkpoint, store=tmp_path / "R.zarr", device="cpu",
                                 dtype="float32", batch_size=8))
    results = open_results(out)
    trust = results.trust
    assert results.route == "image" and trust.unavailable is None and trust.has_intervals and trust.has_flags
    assert trust.threshold == pytest.approx(image.outliers.threshold)
    # bounds around each prediction (the lower one at least 0 counts: an untrained model predicts below it)
    assert (trust.lower <= np.maximum(results.predictions, 0) + 1e-6).all()
    assert (trust.upper >= results.predictions - 1e-6).all() and (trust.upper > trust.lower).all()
