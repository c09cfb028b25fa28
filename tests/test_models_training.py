"""Training, evaluation, Min-MAE baseline, metrics, tables and sample-grouped splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import Dataset

from napari_morphomol.errors import InputError
from napari_morphomol.models import (
    ModelConfig,
    TrainingSettings,
    build_model,
    evaluate_model,
    fit_min_mae_baseline,
    load_checkpoint,
    per_gene_metrics,
    split_by_sample,
    train_model,
    variant_table,
    write_variant_table,
)
from napari_morphomol.models.training import FusionTrainingModule, start_at_mean_target

TINY_VIT = dict(depth=2, embed_dim=48, num_heads=3)
N_CORE, N_ADDON = 6, 4
CORE_GENES = [f"C{i}" for i in range(N_CORE)]
ADDON_GENES = [f"A{i}" for i in range(N_ADDON)]
#: Add-on gene a is a copy of core gene COPIED_CORE[a], so the data has a learnable answer.
COPIED_CORE = [4, 0, 2, 2]


class TinyTiles(Dataset):
    """Tiles following the tiling contract: uint8 CHW image, (196, G_core) counts, log1p target."""

    def __init__(self, n_tiles: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n_tiles, 3, 224, 224), dtype=torch.uint8, generator=generator)
        rates = torch.rand(n_tiles, 1, N_CORE, generator=generator) * 3
        self.tokens = torch.poisson(rates.expand(n_tiles, 196, N_CORE).contiguous(), generator=generator)
        self.targets = torch.log1p(self.tokens.sum(dim=1)[:, COPIED_CORE])
        self.token_targets = self.tokens[:, :, COPIED_CORE].contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "tokens": self.tokens[index], "target": self.targets[index],
                "token_target": self.token_targets[index]}


def tiny_config(variant: str, **overrides) -> ModelConfig:
    return ModelConfig(
        n_core_genes=N_CORE, n_addon_genes=N_ADDON, variant=variant, backbone_kwargs=TINY_VIT, **overrides
    )


FAST = TrainingSettings(max_epochs=2, warmup_epochs=1, batch_size=4, accumulate_grad_batches=1, num_workers=0)


@pytest.mark.parametrize("variant", ["early_fusion_add", "late_fusion_concat_tile"])
def test_train_model_fits_keeps_best_epoch_and_writes_a_loadable_checkpoint(tmp_path, variant):
    train, val = TinyTiles(8, seed=0), TinyTiles(4, seed=1)
    result = train_model(
        tiny_config(variant),
        train,
        val,
        core_genes=CORE_GENES,
        addon_genes=ADDON_GENES,
        checkpoint_path=tmp_path / "model.safetensors",
        settings=FAST,
        data_summary={"samples": ["s1", "s2"]},
    )
    assert [entry["epoch"] for entry in result.history] == [0, 1]
    assert all(np.isfinite(entry["val_mse"]) and np.isfinite(entry["train_mse"]) for entry in result.history)
    best = min(entry["val_mse"] for entry in result.history)
    assert result.validation.means["mse"] == pytest.approx(best, rel=1e-4)
    loaded, card = load_checkpoint(result.checkpoint_path)
    train_mean = train.targets.mean(dim=0).tolist()
    assert card.training["data"] == {"n_train_tiles": 8, "n_val_tiles": 4, "train_target_mean": train_mean,
                                     "samples": ["s1", "s2"]}
    assert card.training["how"]["settings"]["lr_backbone"] == 1e-5
    assert card.training["validation_metrics"]["mse"] == pytest.approx(best, rel=1e-4)
    again = evaluate_model(loaded, val, addon_genes=ADDON_GENES)
    np.testing.assert_allclose(again.predictions, result.validation.predictions, rtol=1e-6, atol=1e-6)
    assert again.embeddings.shape == (4, 96 if "concat" in variant else 48)


def test_bf16_mixed_training_runs_and_the_card_says_so(tmp_path):
    """The GPU default (bf16 autocast) is the same code path on the CPU, so it is tested here."""
    bf16 = TrainingSettings(max_epochs=2, warmup_epochs=1, batch_size=4, accumulate_grad_batches=1,
                            precision="bf16-mixed")
    result = train_model(tiny_config("early_fusion_add"), TinyTiles(8, seed=0), TinyTiles(4, seed=1),
                         core_genes=CORE_GENES, addon_genes=ADDON_GENES, settings=bf16,
                         checkpoint_path=tmp_path / "bf16.safetensors")
    assert result.card.training["how"]["precision"] == "bf16-mixed"
    assert all(np.isfinite(entry["val_mse"]) for entry in result.history)
    # weights stay fp32 (autocast casts per operation), so the checkpoint loads as any other
    loaded, _ = load_checkpoint(result.checkpoint_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert np.isfinite(result.validation.predictions).all()


def test_training_is_deterministic_and_learns(tmp_path):
    quick = TrainingSettings(
        max_epochs=6, warmup_epochs=0, batch_size=4, accumulate_grad_batches=1, lr_head=3e-2, lr_backbone=3e-2
    )
    train, val = TinyTiles(16, seed=0), TinyTiles(8, seed=1)
    runs = [
        train_model(
            tiny_config("expr_only_tile"), train, val, core_genes=CORE_GENES, addon_genes=ADDON_GENES, settings=quick
        )
        for _ in range(2)
    ]
    first, second = (dict(run.model.state_dict()) for run in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    history = runs[0].history
    # the head starts at the mean training target: learning means beating that constant
    constant_mse = float(((val.targets - train.targets.mean(dim=0)) ** 2).mean())
    assert history[-1]["val_mse"] < 0.5 * constant_mse


def test_head_starts_at_the_mean_training_target():
    model = build_model(tiny_config("early_fusion_add"))
    train = TinyTiles(6, seed=2)
    mean = start_at_mean_target(model, train)
    torch.testing.assert_close(model.head.bias, train.targets.mean(dim=0))
    torch.testing.assert_close(mean, train.targets.mean(dim=0))


def test_optimizer_groups_and_schedule_follow_the_paper():
    model = build_model(tiny_config("early_fusion_add"))
    module = FusionTrainingModule(model, TrainingSettings(max_epochs=35, warmup_epochs=5))
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    head, backbone = optimizer.param_groups
    assert head["lr"] == pytest.approx(1e-6) and backbone["lr"] == pytest.approx(1e-7)  # warm-up starts at 1 %
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert id(model.expression_encoder[0].weight) in {id(p) for p in backbone["params"]}
    assert head["weight_decay"] == 1e-3
    rates = []
    for _ in range(35):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[4] == pytest.approx(1e-4)  # warm-up done after 5 epochs
    assert rates[-1] == pytest.approx(1e-6)  # cosine down to the floor
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_bad_datasets_are_explained():
    class ChannelsLast(TinyTiles):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            return {**item, "image": item["image"].permute(1, 2, 0)}

    with pytest.raises(InputError, match=r"item\['image'\] must be a tensor \(3, 224, 224\) torch.uint8"):
        train_model(
            tiny_config("morph_only"), ChannelsLast(2, 0), TinyTiles(2, 1),
            core_genes=CORE_GENES, addon_genes=ADDON_GENES, settings=FAST,
        )
    with pytest.raises(InputError, match="disjoint"):
        train_model(
            tiny_config("morph_only"), TinyTiles(2, 0), TinyTiles(2, 1),
            core_genes=CORE_GENES, addon_genes=CORE_GENES[:4],
        )


def test_min_mae_baseline_copies_the_closest_core_gene(tmp_path):
    train, val = TinyTiles(12, seed=0), TinyTiles(6, seed=1)
    result = train_model(
        ModelConfig(n_core_genes=N_CORE, n_addon_genes=N_ADDON, variant="min_mae"),
        train,
        val,
        core_genes=CORE_GENES,
        addon_genes=ADDON_GENES,
        checkpoint_path=tmp_path / "baseline.safetensors",
    )
    assert result.model.source_gene_index.tolist() == COPIED_CORE
    assert result.validation.means["mse"] == pytest.approx(0.0, abs=1e-10)
    loaded, _ = load_checkpoint(result.checkpoint_path)
    assert loaded.source_gene_index.tolist() == COPIED_CORE
    batches = [
        {"tokens": train.tokens[:5], "target": train.targets[:5]},
        {"tokens": train.tokens[5:], "target": train.targets[5:]},
    ]
    streamed = fit_min_mae_baseline(result.model.config, batches)
    assert streamed.source_gene_index.tolist() == COPIED_CORE


def test_per_gene_metrics_match_scipy_and_constant_genes_are_nan():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(30, 3))
    predictions = targets + rng.normal(scale=0.5, size=(30, 3))
    predictions[:, 2] = 1.0
    metrics = per_gene_metrics(predictions, targets, ["g0", "g1", "g2"])
    for i, gene in enumerate(["g0", "g1"]):
        assert metrics.loc[gene, "pearson"] == pytest.approx(pearsonr(predictions[:, i], targets[:, i])[0])
        assert metrics.loc[gene, "spearman"] == pytest.approx(spearmanr(predictions[:, i], targets[:, i])[0])
    assert np.isnan(metrics.loc["g2", "pearson"]) and np.isnan(metrics.loc["g2", "spearman"])
    assert metrics["mse"].tolist() == pytest.approx(((predictions - targets) ** 2).mean(axis=0).tolist())
    with pytest.raises(InputError, match="tiles, 2 genes"):
        per_gene_metrics(predictions, targets, ["g0", "g1"])


def test_variant_table_has_one_row_per_variant_and_writes_csv_and_markdown(tmp_path):
    def run(value):
        return pd.DataFrame(
            {"spearman": [value, value + 0.2], "pearson": [value, value], "mse": [1.0, 3.0]}, index=["a", "b"]
        )

    table = variant_table({"early_fusion_add": [run(0.3), run(0.5)], "min_mae": run(0.1)})
    assert list(table.index) == ["early_fusion_add", "min_mae"]
    assert table.loc["early_fusion_add", "spearman_mean"] == pytest.approx(0.5)
    assert table.loc["early_fusion_add", "pearson_sd"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert np.isnan(table.loc["min_mae", "mse_sd"]) and table.loc["min_mae", "mse_mean"] == 2.0
    csv_path, markdown_path = write_variant_table(table, tmp_path / "table_a1")
    assert pd.read_csv(csv_path, index_col=0).shape == table.shape
    markdown = markdown_path.read_text()
    assert "| early_fusion_add | 0.500 ± 0.141 | 0.400 ± 0.141 | 2.000 ± 0.000 | 2 | 2 |" in markdown
    assert "| min_mae | 0.200 | 0.100 | 2.000 | 1 | 2 |" in markdown


@settings(max_examples=40, deadline=None)
@given(
    samples=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=60),
    val_fraction=st.floats(0.05, 0.5),
    test_fraction=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 5),
)
def test_splits_never_share_a_sample(samples, val_fraction, test_fraction, seed):
    n_samples = len(set(samples))
    try:
        split = split_by_sample(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    except InputError as error:
        assert n_samples <= 3, error
        return
    groups = [set(np.asarray(samples)[indices]) for indices in (split.train, split.val, split.test)]
    assert groups[0] and groups[1]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(len(samples)))
    assert (
        split_by_sample(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed).samples
        == split.samples
    )


def test_single_modality_training_needs_modality_dropout_and_then_serves_one_modality():
    train, val = TinyTiles(8, seed=0), TinyTiles(4, seed=1)
    config = tiny_config("early_fusion_concat", unimodal_inputs=True)
    with pytest.raises(InputError, match="modality_dropout > 0"):
        train_model(config, train, val, core_genes=CORE_GENES, addon_genes=ADDON_GENES, settings=FAST)
    dropout = TrainingSettings(max_epochs=1, batch_size=2, accumulate_grad_batches=1, modality_dropout=0.5)
    result = train_model(config, train, val, core_genes=CORE_GENES, addon_genes=ADDON_GENES, settings=dropout)
    model = result.model
    assert model(train.images[:2], None).predictions.shape == (2, N_ADDON)
    assert model(None, train.tokens[:2]).predictions.shape == (2, N_ADDON)
