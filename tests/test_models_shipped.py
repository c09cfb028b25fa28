"""The model shipped in napari_morphomol/data: loads, fits the synthetic panel, predicts."""

from __future__ import annotations

import json

import numpy as np

from napari_morphomol.models import evaluate_model, load_checkpoint, match_gene_panel, shipped_model_path
from napari_morphomol.models.data import TileDataset, tile_sample_folder
from napari_morphomol.tiling import GenePanel


def test_shipped_model_is_small_and_documented():
    path = shipped_model_path()
    assert path.stat().st_size <= 15 * 1024**2
    _, card = load_checkpoint(path)
    assert card.model.variant == "early_fusion_add"
    assert card.model.token_heads == {"addon_tokens": len(card.addon_genes)}  # the fine maps' token head
    assert card.provenance["retrain_command"].startswith("python benchmarks/bench_trust.py")
    assert "--ship" in card.provenance["retrain_command"]
    assert card.model.variance_head and card.model.outlier_reference_tokens > 0  # trust: intervals and the flag
    assert set(card.calibration.scales) == {"tile", "token", "cell"} and card.calibration.outliers.threshold > 0
    assert card.calibration.samples == ("seed106", "seed107")
    test = card.training["test"]
    assert set(test["metrics"]) >= {"pearson", "spearman", "mse"}
    assert set(test["fine_maps"]) >= {"18 um", "37 um", "73 um", "128 um", "256 um", "cell"}
    assert test["fine_maps"]["18 um"]["token"]["spearman"] > test["fine_maps"]["18 um"]["tile"]["spearman"]
    # the benchmark's figures travel with it (docs/trust.md); intervals never cover less than the
    # level allows for (over-covering a new slide is wider than needed, not dishonest)
    assert test["trust"]["tile"]["variance head (one model)"]["coverage_mean"] >= 0.88
    # the H&E alone (issue 16): trained with modality dropout, calibrated on that route too
    assert card.model.routes == ("both", "image", "transcripts") and set(card.calibration.routes) == {"image"}
    assert card.training["how"]["settings"]["modality_dropout"] == 0.2
    assert test["route_metrics"]["both"]["spearman"] > test["route_metrics"]["image"]["spearman"] > 0.3


def test_shipped_model_predicts_the_fixture_sample(synthetic_sample, tmp_path):
    model, card = load_checkpoint(shipped_model_path())
    panel = json.loads(synthetic_sample.panel_json.read_text())
    assert list(card.core_genes) == panel["core"] and list(card.addon_genes) == panel["addon"]
    assert match_gene_panel(card, panel["core"] + panel["addon"]).extra_genes == ()

    store = tile_sample_folder(synthetic_sample.root, tmp_path / "fixture.tiles.zarr",
                               panel=GenePanel(core=card.core_genes, addon=card.addon_genes))
    tiles = TileDataset.from_store(store)
    evaluation = evaluate_model(model, tiles, addon_genes=card.addon_genes)
    assert evaluation.predictions.shape == (len(tiles), len(card.addon_genes)) and len(tiles) >= 4
    assert np.isfinite(evaluation.predictions).all()
    # the constant predictor of the same training data (mean training target per gene) has no
    # correlation and a larger error
    constant = np.array(card.training["data"]["train_target_mean"])
    constant_mse = ((evaluation.targets - constant) ** 2).mean()
    model_mse = ((evaluation.predictions - evaluation.targets) ** 2).mean()
    assert model_mse < 0.9 * constant_mse
    assert evaluation.means["pearson"] > 0.3
