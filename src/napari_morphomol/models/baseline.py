"""The paper's Min-MAE baseline: each add-on gene copies the one core gene closest to it.

"Closest" = lowest mean absolute error between log1p tile totals over the training tiles. It
sets the bar a learned model has to clear: what a single measured gene already tells. With the
add-on token head in its config it also copies per token: the token output is the log of the
copied gene's count in that token, so its expected log1p count (``softplus``) is exactly
``log1p(count)``, the per-token form of the same copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

import torch
from torch import nn

from napari_morphomol.errors import InputError
from napari_morphomol.models.config import ADDON_TOKEN_HEAD, ModelConfig, OutputSpec
from napari_morphomol.models.fusion import ModelOutput

_ZERO_COUNT = 1e-12
"""A token without the copied gene predicts this count (log -27.6, softplus 1e-12)."""


class MinMAEBaseline(nn.Module):
    """Predicts log1p(tile total of the chosen core gene) for every add-on gene.

    The tile embedding is the log1p core-gene tile totals (G_core), the baseline's whole view
    of a tile. ``source_gene_index[a]`` is the core gene copied for add-on gene ``a``.
    """

    def __init__(self, config: ModelConfig, source_gene_index: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.variant != "min_mae":
            raise InputError(f"MinMAEBaseline needs variant 'min_mae', got {config.variant!r}.")
        self.config = config
        self.n_tokens = (config.img_size // config.patch_px) ** 2
        self.embedding_dim = config.n_core_genes
        index = torch.zeros(config.n_addon_genes, dtype=torch.int64) if source_gene_index is None else source_gene_index
        self.register_buffer("source_gene_index", index.to(torch.int64).clone())

    @property
    def token_heads(self) -> dict[str, int]:
        """The per-token copy (``ADDON_TOKEN_HEAD``) when the config asks for it; it has no weights."""
        return dict(self.config.token_heads)

    def output_specs(self) -> tuple[OutputSpec, ...]:
        """The tile predictions and the tile embedding (the core-gene totals), then the per-token copy."""
        tile = (OutputSpec("predictions", "tile", self.config.n_addon_genes),
                OutputSpec("embeddings", "tile", self.embedding_dim))
        return tile + tuple(OutputSpec(name, "token", width) for name, width in self.token_heads.items())

    def forward(self, images: torch.Tensor | None, token_counts: torch.Tensor | None) -> ModelOutput:
        if token_counts is None:
            raise InputError("The Min-MAE baseline needs core-panel transcript counts.")
        if token_counts.ndim != 3 or tuple(token_counts.shape[1:]) != (self.n_tokens, self.config.n_core_genes):
            raise InputError(
                f"Transcript counts must be (batch, {self.n_tokens}, {self.config.n_core_genes}); "
                f"got {tuple(token_counts.shape)}."
            )
        core_totals = torch.log1p(token_counts.float().sum(dim=1))
        token_outputs = {}
        if ADDON_TOKEN_HEAD in self.config.token_heads:  # log(count): softplus gives log1p(count) exactly
            copied = token_counts.float()[:, :, self.source_gene_index]
            token_outputs[ADDON_TOKEN_HEAD] = torch.log(copied.clamp_min(_ZERO_COUNT))
        return ModelOutput(core_totals[:, self.source_gene_index], core_totals, MappingProxyType(token_outputs))


def fit_min_mae_baseline(config: ModelConfig, batches: Iterable[Mapping[str, torch.Tensor]]) -> MinMAEBaseline:
    """Choose, per add-on gene, the core gene with the lowest training MAE; one pass, streaming.

    ``batches`` yield dicts with "tokens" (B, 196, G_core) counts and "target" (B, G_add) log1p.
    """
    absolute_error_sums = torch.zeros(config.n_core_genes, config.n_addon_genes, dtype=torch.float64)
    n_tiles = 0
    for batch in batches:
        core = torch.log1p(batch["tokens"].double().sum(dim=1))
        target = batch["target"].double()
        if core.shape[1] != config.n_core_genes or target.shape[1] != config.n_addon_genes:
            raise InputError(
                f"Training batches have {core.shape[1]} core and {target.shape[1]} add-on genes; the "
                f"model config says {config.n_core_genes} and {config.n_addon_genes}."
            )
        absolute_error_sums += (core[:, :, None] - target[:, None, :]).abs().sum(dim=0)
        n_tiles += core.shape[0]
    if n_tiles == 0:
        raise InputError("The training set is empty; the Min-MAE baseline needs at least one tile.")
    return MinMAEBaseline(config, absolute_error_sums.argmin(dim=0))
