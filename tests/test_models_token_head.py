"""The add-on token head: trained on per-token counts beside the paper's tile loss, scored per token."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_morphomol.errors import InputError
from napari_morphomol.models import ADDON_TOKEN_HEAD, TrainingSettings, load_checkpoint, train_model
from napari_morphomol.models.training import token_log1p, token_loss
from test_models_training import ADDON_GENES, CORE_GENES, FAST, N_ADDON, TinyTiles, tiny_config

LEARN = dataclasses.replace(FAST, max_epochs=12, warmup_epochs=0, lr_head=1e-2, batch_size=8, patience=12)


def test_token_losses_are_the_poisson_likelihood_and_mse_on_log1p():
    log_rate = torch.tensor([[[0.0, 1.0]]])
    counts = torch.tensor([[[2.0, 0.0]]])
    expected_poisson = ((1.0 - 2.0 * 0.0) + (np.e - 0.0)) / 2  # mean of exp(r) - k r
    assert float(token_loss(log_rate, counts, "poisson")) == pytest.approx(expected_poisson, rel=1e-6)
    softplus = np.log1p(np.exp([0.0, 1.0]))
    expected_mse = ((softplus[0] - np.log1p(2.0)) ** 2 + (softplus[1] - 0.0) ** 2) / 2
    assert float(token_loss(log_rate, counts, "mse_log1p")) == pytest.approx(expected_mse, rel=1e-6)
    np.testing.assert_allclose(token_log1p(log_rate).numpy(), np.log1p(np.exp(log_rate.numpy())), rtol=1e-6)


@pytest.mark.parametrize("loss", ["poisson", "mse_log1p"])
def test_a_token_head_learns_per_token_counts_and_the_card_says_how_it_scores(tmp_path, loss):
    config = tiny_config("expr_only_token", token_heads={ADDON_TOKEN_HEAD: N_ADDON})
    result = train_model(config, TinyTiles(48, seed=1), TinyTiles(16, seed=2), core_genes=CORE_GENES,
                         addon_genes=ADDON_GENES, checkpoint_path=tmp_path / "tokens.safetensors",
                         settings=dataclasses.replace(LEARN, token_loss=loss))
    training = result.card.training
    # the add-on genes copy core genes token by token, so tokens are learnable from their own counts
    assert training["validation_token_metrics"]["spearman"] > 0.25, training["validation_token_metrics"]  # chance: ~0
    assert training["validation_token_metrics"]["n_genes"] == N_ADDON
    assert set(training["validation_metrics_token_sum"]) >= {"spearman", "pearson", "mse"}
    assert training["better_tile_estimate"] in ("tile head", "token sum")
    assert training["how"]["settings"]["token_loss"] == loss
    assert result.validation.token_gene_metrics.shape == (N_ADDON, 3)
    model, card = load_checkpoint(result.checkpoint_path)
    assert card.model.token_heads == {ADDON_TOKEN_HEAD: N_ADDON}
    item = TinyTiles(1, seed=3)[0]
    with torch.no_grad():
        output = model.eval()(None, item["tokens"][None])
    assert output.token_outputs[ADDON_TOKEN_HEAD].shape == (1, 196, N_ADDON)


def test_token_head_training_needs_per_token_targets_and_a_known_loss(tmp_path):
    config = tiny_config("expr_only_token", token_heads={ADDON_TOKEN_HEAD: N_ADDON})

    class NoTokenTargets(TinyTiles):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            del item["token_target"]
            return item

    with pytest.raises(InputError, match="item\\['token_target'\\] must be a tensor \\(196, 4\\).*missing"):
        train_model(config, NoTokenTargets(8, 1), NoTokenTargets(4, 2), core_genes=CORE_GENES,
                    addon_genes=ADDON_GENES, settings=FAST)
    with pytest.raises(InputError, match="token_loss must be one of poisson, mse_log1p"):
        train_model(config, TinyTiles(8, 1), TinyTiles(4, 2), core_genes=CORE_GENES, addon_genes=ADDON_GENES,
                    settings=TrainingSettings(token_loss="l1"))


def test_min_mae_copies_its_core_gene_per_token_too():
    config = tiny_config("min_mae", token_heads={ADDON_TOKEN_HEAD: N_ADDON})
    result = train_model(config, TinyTiles(24, seed=1), TinyTiles(8, seed=2), core_genes=CORE_GENES,
                         addon_genes=ADDON_GENES, settings=FAST)
    item = TinyTiles(1, seed=3)[0]
    with torch.no_grad():
        output = result.model(None, item["tokens"][None])
    copied = item["tokens"][:, result.model.source_gene_index]
    np.testing.assert_allclose(token_log1p(output.token_outputs[ADDON_TOKEN_HEAD])[0].numpy(),
                               np.log1p(copied.numpy()), atol=1e-6)
    assert [spec.name for spec in result.model.output_specs()] == ["predictions", "embeddings", ADDON_TOKEN_HEAD]
    # the add-on genes copy core genes token by token, so the per-token copy is exact
    assert result.card.training["validation_token_metrics"]["spearman"] == pytest.approx(1.0)
