"""Training and evaluation of the model family with Lightning, as in the paper.

Data contract (what the tiling step's torch Dataset yields, one dict per tile):

- ``"image"``: uint8 tensor (3, 224, 224), channels-first RGB, the 512 px tile resized once;
- ``"tokens"``: float32 tensor (196, G_core), core-panel transcript counts per 16 px token of
  the 224 px tile, row-major (top to bottom, then left to right), not log-transformed;
- ``"target"``: float32 tensor (G_add,), log1p of add-on counts summed over the tile.

Splits are grouped by sample (``split_by_sample``) so no tissue section is seen in training
and validation. Defaults follow the reference code: AdamW, 1e-4 head / 1e-5 backbone, weight
decay 1e-3, 5 warm-up epochs then cosine to 1e-6 over 35 epochs, batch 256 x 2 accumulation,
gradient clip 1.0, MSE, early stopping on validation MSE (patience 10), bf16 on GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_morphomol._native_libraries import keep_triton_out_beside_system_llvm

keep_triton_out_beside_system_llvm()  # must run before lightning and timm are imported

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from napari_morphomol.errors import InputError
from napari_morphomol.models.baseline import fit_min_mae_baseline
from napari_morphomol.models.checkpoint import ModelCard, build_model, save_checkpoint
from napari_morphomol.models.config import ADDON_TOKEN_HEAD, ModelConfig
from napari_morphomol.models.metrics import mean_metrics, per_gene_metrics
from napari_morphomol.models.trust import LOG_VARIANCE_RANGE, fit_calibration
from napari_morphomol.tiling.geometry import TileSpec

VALIDATION_METRIC = "val/mse"
TOKEN_LOSSES = ("poisson", "mse_log1p")
"""Per-token losses of the add-on token head: Poisson likelihood of the counts on its log rate, or
MSE of ``softplus(output)`` on log1p counts."""


@dataclass(frozen=True)
class TrainingSettings:
    """How to train; defaults are the paper's. ``modality_dropout`` is the fraction of batches
    that lose one modality (half image, half transcripts) for models with unimodal_inputs."""

    lr_head: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-3
    max_epochs: int = 35
    warmup_epochs: int = 5
    lr_min: float = 1e-6
    batch_size: int = 256
    accumulate_grad_batches: int = 2
    gradient_clip: float = 1.0
    patience: int = 10
    seed: int = 0
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    modality_dropout: float = 0.0
    progress_bar: bool = False
    token_loss: str = "poisson"
    """Loss of the add-on token head (:data:`TOKEN_LOSSES`), added to the tile MSE."""
    token_loss_weight: float = 1.0

    def resolved_precision(self) -> str:
        """bf16 mixed precision on a GPU, fp32 on the CPU unless set."""
        if self.precision != "auto":
            return self.precision
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"


@dataclass(frozen=True)
class SampleSplit:
    """Tile indices per split; every sample's tiles fall in exactly one split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    samples: dict[str, tuple[str, ...]]


def split_by_sample(
    sample_ids: Sequence[str], *, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> SampleSplit:
    """Assign whole samples to train/val/test (at least one sample each for train and val)."""
    sample_ids = np.asarray(sample_ids, dtype=str)
    samples = np.unique(sample_ids)
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError("Split fractions must be in [0, 1) and sum to less than 1 (validation > 0).")
    n_val = max(1, round(val_fraction * len(samples)))
    n_test = max(1, round(test_fraction * len(samples))) if test_fraction > 0 else 0
    if len(samples) - n_val - n_test < 1:
        raise InputError(
            f"{len(samples)} sample(s) cannot be split into train, validation"
            + (" and test" if n_test else "")
            + " without sharing a tissue section; give more samples or smaller fractions."
        )
    shuffled = np.random.default_rng(seed).permutation(samples)
    groups = {"val": shuffled[:n_val], "test": shuffled[n_val : n_val + n_test], "train": shuffled[n_val + n_test :]}
    indices = {name: np.flatnonzero(np.isin(sample_ids, members)) for name, members in groups.items()}
    return SampleSplit(
        train=indices["train"],
        val=indices["val"],
        test=indices["test"],
        samples={name: tuple(sorted(members)) for name, members in groups.items()},
    )


def is_primary_process() -> bool:
    """False in the extra processes a distributed launcher (Lightning's DDP, torchrun, SLURM)
    starts: they rerun the whole command, and only the first process may write and report."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def check_tile_dataset(dataset: Dataset, config: ModelConfig, what: str) -> None:
    """Fail early, with the contract spelled out, when a dataset's items do not fit the model."""
    if len(dataset) == 0:
        raise InputError(f"The {what} set is empty.")
    item = dataset[0]
    n_tokens = (config.img_size // config.patch_px) ** 2
    expected = {
        "image": ((3, config.img_size, config.img_size), torch.uint8),
        "tokens": ((n_tokens, config.n_core_genes), None),
        "target": ((config.n_addon_genes,), None),
    }
    if ADDON_TOKEN_HEAD in config.token_heads:
        expected["token_target"] = ((n_tokens, config.n_addon_genes), None)
    for key, (shape, dtype) in expected.items():
        value = item.get(key) if isinstance(item, dict) else None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or (dtype and value.dtype != dtype):
            described = (
                "missing" if value is None
                else f"{getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))}"
            )
            raise InputError(
                f"{what} item[{key!r}] must be a tensor {shape}" + (f" {dtype}" if dtype else "")
                + f"; got {described}."
            )


class FusionTrainingModule(L.LightningModule):
    """MSE on log1p add-on targets; the optimiser and schedule of the reference code."""

    def __init__(self, model: nn.Module, settings: TrainingSettings) -> None:
        super().__init__()
        self.model = model
        self.settings = settings

    def forward(self, images: torch.Tensor | None, token_counts: torch.Tensor | None):
        return self.model(images, token_counts)

    def _inputs(self, batch: dict[str, torch.Tensor], training: bool):
        config = self.model.config
        images = batch["image"] if config.uses_image else None
        tokens = batch["tokens"] if config.uses_transcripts else None
        if training and config.unimodal_inputs and self.settings.modality_dropout > 0:
            draw = float(torch.rand(()))
            if draw < self.settings.modality_dropout / 2:
                images = None
            elif draw < self.settings.modality_dropout:
                tokens = None
        return images, tokens

    def _losses(self, batch: dict[str, torch.Tensor], training: bool) -> dict[str, torch.Tensor]:
        """The paper's tile MSE (``"mse"``), the per-token loss when the model has the add-on token
        head (``"token_loss"``) and the variance head's Gaussian likelihood (``"variance_nll"``)."""
        output = self.model(*self._inputs(batch, training))
        target = batch["target"].float()
        losses = {"mse": F.mse_loss(output.predictions.float(), target)}
        if ADDON_TOKEN_HEAD in output.token_outputs:
            losses["token_loss"] = token_loss(output.token_outputs[ADDON_TOKEN_HEAD], batch["token_target"],
                                              self.settings.token_loss)
        if output.prediction_log_variance is not None:
            losses["variance_nll"] = variance_nll(output.prediction_log_variance, output.predictions, target)
        return losses

    def _log(self, split: str, losses: dict[str, torch.Tensor], n: int) -> None:
        for name, value in losses.items():
            self.log(f"{split}/{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch, training=True)
        self._log("train", losses, len(batch["target"]))
        weights = {"mse": 1.0, "token_loss": self.settings.token_loss_weight, "variance_nll": 1.0}
        return sum(weights[name] * value for name, value in losses.items())

    def validation_step(self, batch, batch_idx):
        self._log("val", self._losses(batch, training=False), len(batch["target"]))

    def configure_optimizers(self):
        settings = self.settings
        optimizer = torch.optim.AdamW(
            [
                {"params": self.model.head_parameters(), "lr": settings.lr_head},
                {
                    "params": [p for p in self.model.backbone_parameters() if p.requires_grad],
                    "lr": settings.lr_backbone,
                },
            ],
            weight_decay=settings.weight_decay,
        )
        warmup_epochs = min(settings.warmup_epochs, settings.max_epochs - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, settings.max_epochs - warmup_epochs), eta_min=settings.lr_min
        )
        if warmup_epochs > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-2, total_iters=warmup_epochs)
            schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])
        else:
            schedule = cosine
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def token_loss(log_rate: torch.Tensor, counts: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-token loss of the add-on token head (``log_rate``: (B, tokens, genes)) on raw counts.

    ``"poisson"``: the Poisson negative log likelihood of the counts at rate ``exp(log_rate)``
    (constant terms dropped); ``"mse_log1p"``: MSE of ``softplus(log_rate)`` on ``log1p(counts)``.
    """
    log_rate, counts = log_rate.float(), counts.float()
    if kind == "poisson":
        return F.poisson_nll_loss(log_rate, counts, log_input=True, full=False)
    return F.mse_loss(F.softplus(log_rate), torch.log1p(counts))


def variance_nll(log_variance: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log likelihood (constants dropped) of the tile targets under the
    predicted mean and log variance. The mean is detached: the variance head learns the squared
    residuals of the tile head without changing what the tile head learns."""
    log_variance = log_variance.float().clamp(*LOG_VARIANCE_RANGE)
    squared = (targets.float() - predictions.detach().float()) ** 2
    return 0.5 * (log_variance + squared * torch.exp(-log_variance)).mean()


def token_log1p(log_rate: torch.Tensor) -> torch.Tensor:
    """The add-on token head's expected log1p count per token: ``log1p(exp(log_rate))``."""
    return F.softplus(log_rate.float())


class BestWeights(Callback):
    """Keeps the weights of the best validation epoch in memory, so no pickled checkpoint is
    written during training; restored at the end (early stopping would otherwise leave the last)."""

    def __init__(self) -> None:
        self.best_score = float("inf")
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        score = float(trainer.callback_metrics[VALIDATION_METRIC])
        self.history.append({"epoch": trainer.current_epoch, "val_mse": score})
        if score < self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.model.state_dict().items()}

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.history and "train/mse" in trainer.callback_metrics:
            self.history[-1]["train_mse"] = float(trainer.callback_metrics["train/mse"])


@dataclass(frozen=True)
class Evaluation:
    """Predictions, targets and embeddings (tiles in dataset order) and their metrics."""

    predictions: np.ndarray
    targets: np.ndarray
    embeddings: np.ndarray
    gene_metrics: pd.DataFrame
    means: dict[str, float]
    token_gene_metrics: pd.DataFrame | None = None
    """With the add-on token head: per gene over every token of every tile (log1p counts)."""
    token_means: dict[str, float] | None = None
    token_sum_means: dict[str, float] | None = None
    """The tile scored by the sum of its token predictions instead of the tile head."""
    log_variances: np.ndarray | None = None
    """With a variance head: the log variance of each tile prediction (tiles, genes)."""


@dataclass(frozen=True)
class TrainingResult:
    model: nn.Module
    card: ModelCard
    checkpoint_path: Path | None
    history: list[dict[str, float]]
    validation: Evaluation


def _loader(dataset: Dataset, settings: TrainingSettings, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=settings.num_workers,
        persistent_workers=settings.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def start_at_mean_target(model: nn.Module, dataset: Dataset) -> torch.Tensor:
    """Set the head's bias to the mean training target (log1p counts are far from 0), so the
    first epochs learn the signal rather than each gene's offset; returns that mean, which is
    also the constant predictor a model has to beat."""
    targets = torch.stack([dataset[i]["target"].float() for i in range(len(dataset))])
    mean = targets.mean(dim=0)
    with torch.no_grad():
        model.head.bias.copy_(mean)
        if ADDON_TOKEN_HEAD in model.token_heads:  # the mean count per token, as a log rate: a tile's
            # per-token counts sum to its count, so that is the mean tile count over the tokens of a tile
            per_token = torch.expm1(targets).mean(dim=0) / model.n_tokens
            model.token_heads[ADDON_TOKEN_HEAD].bias.copy_(per_token.clamp_min(1e-3).log())
        for head in model.variance_heads().values():  # start at the spread of the constant predictor
            head.bias.copy_(targets.var(dim=0).clamp_min(1e-4).log())
    return mean


def train_model(
    config: ModelConfig,
    train_dataset: Dataset,
    val_dataset: Dataset,
    *,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    checkpoint_path: str | Path | None = None,
    settings: TrainingSettings = TrainingSettings(),
    backbone_weights: str | Path | None = None,
    tile_geometry: TileSpec = TileSpec(),
    data_summary: dict[str, Any] | None = None,
    calibration_dataset: Dataset | None = None,
    calibration_samples: Sequence[str] = (),
) -> TrainingResult:
    """Train one variant, keep the best validation epoch, evaluate it and save a checkpoint.

    Runs on whatever Lightning finds (``settings.accelerator/devices/num_nodes/strategy``, so
    DDP over GPUs or nodes when launched that way); only global rank 0 writes the checkpoint.
    The Min-MAE baseline is fitted in one pass instead.

    Parameters
    ----------
    config
        The architecture (a row of ``VARIANT_TABLE`` and its sizes).
    train_dataset, val_dataset
        Tile datasets (``TileDataset`` / ``CohortDataset``) giving image, tokens and target per tile.
    core_genes, addon_genes
        The panel, in the order of the model's inputs and outputs.
    checkpoint_path
        Where the .safetensors checkpoint goes (written atomically); None keeps it in memory only.
    settings
        Optimiser, schedule, batch size, early stopping, modality dropout and where to run.
    backbone_weights
        None (random init), "hub" or a local weights file for the ViT.
    tile_geometry
        How the tiles were cut (recorded in the card; ``predict`` cuts tiles the same way).
    data_summary
        Free-form description of the training data, kept in the card.
    calibration_dataset, calibration_samples
        Tiles of held-out samples (neither trained nor early-stopped on, ideally) and their names:
        when given, the model gets its outlier reference and the card a
        :class:`~napari_morphomol.models.trust.Calibration` (conformal quantiles of the variance
        head's and the token head's predictions, and the outlier score's threshold).

    Returns
    -------
    TrainingResult
        The model at its best validation epoch, its card (with metrics) and the checkpoint path.

    Raises
    ------
    InputError
        A config and settings that disagree (modality dropout, token heads without targets) or
        datasets that do not fit the config.
    """
    card_without_results = ModelCard(config, tuple(core_genes), tuple(addon_genes), tile_geometry)
    _check_training_inputs(config, settings, train_dataset, val_dataset)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    if config.variant_spec.neural:
        fitted = _fit_with_lightning(config, settings, train_dataset, val_dataset, backbone_weights)
    else:
        fitted = _FittedModel(
            fit_min_mae_baseline(config, _loader(train_dataset, settings, shuffle=False)),
            {"method": "Min-MAE: per add-on gene, the core gene with the lowest training MAE (log1p tile totals)"})
    model, history, target_mean = fitted.model, fitted.history, fitted.target_mean
    device, bf16 = fitted.device, fitted.bf16
    if config.variance_head:
        refit_variance_head(model, val_dataset, batch_size=min(settings.batch_size, 64), device=device)
    validation = evaluate_model(
        model, val_dataset, addon_genes=addon_genes, batch_size=min(settings.batch_size, 64), device=device, bf16=bf16
    )
    model.cpu()
    training = {
        "how": {**fitted.how, "settings": dataclasses.asdict(settings)},
        "data": {"n_train_tiles": len(train_dataset), "n_val_tiles": len(val_dataset),
                 **({"train_target_mean": target_mean} if target_mean is not None else {}), **(data_summary or {})},
        "validation_metrics": validation.means,
        "validation_gene_metrics": validation.gene_metrics.reset_index().to_dict(orient="list"),
        **_token_summary(validation),
        "history": history,
    }
    card = dataclasses.replace(card_without_results, training=training)
    if calibration_dataset is not None:
        check_tile_dataset(calibration_dataset, config, "calibration")
        model, calibration = fit_calibration(model, calibration_dataset, train_dataset,
                                             samples=tuple(calibration_samples),
                                             batch_size=min(settings.batch_size, 64), device=device)
        model.cpu()
        card = dataclasses.replace(card, model=model.config, calibration=calibration)
    written = None
    if checkpoint_path is not None and fitted.is_writer:
        written = save_checkpoint(model, card, checkpoint_path)
    return TrainingResult(model, card, written, history, validation)


VARIANCE_REFIT = {"steps": 200, "lr": 1e-2, "weight_decay": 0.1}
"""How the variance head is refit on validation residuals (Adam, full batch)."""


def refit_variance_head(model: nn.Module, val_dataset: Dataset, *, batch_size: int = 64,
                        device: str | torch.device = "cpu") -> nn.Module:
    """Fit the variance head again, alone, on the validation tiles' squared residuals.

    Training residuals are small (the mean was fitted to them) and say little about the errors on
    a new slide; the validation sample's residuals are errors on tissue the mean never saw.
    Measured on the trust benchmark (``benchmarks/bench_trust.py``): the AUROC of the spread for
    the 10 % largest test errors goes from 0.71 (trained head) to 0.84 (refit). The head starts
    from the mean log squared residual per gene, with zero weights, and is strongly regularised
    (weight decay 0.1): a few hundred tiles of one sample must not teach it that sample's quirks.
    A model trained with modality dropout has a head per route (``FusionModel.variance_heads``):
    each is refit on the residuals of its own route (the image route's on the H&E alone).
    """
    for route, head in model.variance_heads().items():
        outputs = [(batch["target"].float(), arrays) for batch, arrays in
                   model_outputs(model, val_dataset, batch_size=batch_size, device=device, route=route)]
        embeddings = torch.cat([torch.from_numpy(arrays["embeddings"]) for _, arrays in outputs])
        squared = torch.cat([(target - torch.from_numpy(arrays["predictions"])) ** 2 for target, arrays in outputs])
        _fit_log_variance(head.cpu(), embeddings, squared)
    model.to(device)
    return model


def _fit_log_variance(head: nn.Linear, embeddings: torch.Tensor, squared: torch.Tensor) -> None:
    """Fit ``head`` alone to the squared residuals (Gaussian likelihood), from the mean log squared
    residual per gene with zero weights."""
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(squared.mean(dim=0).clamp_min(1e-6).log())
    optimiser = torch.optim.Adam(head.parameters(), lr=VARIANCE_REFIT["lr"],
                                 weight_decay=VARIANCE_REFIT["weight_decay"])
    with torch.enable_grad():
        for _ in range(VARIANCE_REFIT["steps"]):
            log_variance = head(embeddings).clamp(*LOG_VARIANCE_RANGE)
            loss = 0.5 * (log_variance + squared * torch.exp(-log_variance)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


def _token_summary(validation: Evaluation) -> dict[str, Any]:
    """The card's per-token validation figures, and which tile estimate scored better."""
    if validation.token_means is None:
        return {}
    head, summed = validation.means["spearman"], validation.token_sum_means["spearman"]
    return {
        "validation_token_metrics": validation.token_means,
        "validation_token_gene_metrics": validation.token_gene_metrics.reset_index().to_dict(orient="list"),
        "validation_metrics_token_sum": validation.token_sum_means,
        "better_tile_estimate": "token sum" if summed > head else "tile head",
    }


def _check_training_inputs(config: ModelConfig, settings: TrainingSettings, train_dataset: Dataset,
                           val_dataset: Dataset) -> None:
    """Refuse a config and settings that disagree, or datasets that do not fit the config."""
    if config.unimodal_inputs != (settings.modality_dropout > 0):
        raise InputError(
            "A model accepts one modality at inference only if trained so: set both unimodal_inputs=True "
            "and modality_dropout > 0 (e.g. 0.2), or neither."
        )
    untrained = sorted(set(config.token_heads) - {ADDON_TOKEN_HEAD})
    if untrained:
        raise InputError(
            f"The model config has token heads without targets ({', '.join(untrained)}): the tiles store holds "
            f"per-token targets for the add-on panel only; name that head {ADDON_TOKEN_HEAD!r} or remove the others."
        )
    if settings.token_loss not in TOKEN_LOSSES:
        raise InputError(f"token_loss must be one of {', '.join(TOKEN_LOSSES)}, got {settings.token_loss!r}.")
    if not settings.token_loss_weight >= 0:
        raise InputError(f"token_loss_weight must be 0 or more, got {settings.token_loss_weight!r}.")
    check_tile_dataset(train_dataset, config, "training")
    check_tile_dataset(val_dataset, config, "validation")


@dataclasses.dataclass
class _FittedModel:
    """What a fit hands back to :func:`train_model`: the model at its best epoch and how it got there."""

    model: nn.Module
    how: dict[str, Any]
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    target_mean: list[float] | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False
    is_writer: bool = dataclasses.field(default_factory=is_primary_process)


def _fit_with_lightning(config: ModelConfig, settings: TrainingSettings, train_dataset: Dataset, val_dataset: Dataset,
                        backbone_weights: str | Path | None) -> _FittedModel:
    """Fit a neural variant with Lightning, early-stopped on validation; the best epoch's weights."""
    model = build_model(config, backbone_weights)
    target_mean = start_at_mean_target(model, train_dataset).tolist()
    module = FusionTrainingModule(model, settings)
    best = BestWeights()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    trainer = L.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        precision=settings.resolved_precision(),
        max_epochs=settings.max_epochs,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        gradient_clip_val=settings.gradient_clip,
        callbacks=[EarlyStopping(VALIDATION_METRIC, patience=settings.patience, mode="min"), best],
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=settings.progress_bar,
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(module, _loader(train_dataset, settings, True), _loader(val_dataset, settings, False))
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
    model.load_state_dict(best.state)
    how = {
        "method": "Lightning fit, best validation epoch kept",
        "best_epoch": best.best_epoch,
        "epochs_run": trainer.current_epoch,
        "backbone_weights": None if backbone_weights is None else Path(backbone_weights).name,
        "precision": settings.resolved_precision(),
    }
    return _FittedModel(model, how, best.history, target_mean, module.device,
                        settings.resolved_precision().startswith("bf16"), trainer.is_global_zero)


def model_outputs(model: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: str | torch.device = "cpu",
                  bf16: bool = False, route: str | None = None
                  ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]]:
    """Run ``model`` over ``dataset`` in order, yielding each batch and its outputs as float32 numpy:
    ``predictions``, ``embeddings``, with a variance head ``prediction_log_variance``, with an outlier
    reference ``outlier_score``, and with the add-on token head ``token_rate`` (counts per token) and
    ``token_log1p`` (its expected log1p). ``route`` (:data:`~napari_morphomol.models.config.ROUTES`;
    None: every input the model reads) chooses what it is given."""
    config = model.config
    reads_image, reads_tokens = config.route_reads(route)
    device = torch.device(device)
    model = model.to(device).eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images = batch["image"].to(device) if reads_image else None
            tokens = batch["tokens"].to(device) if reads_tokens else None
            output = model(images, tokens)
            arrays = {"predictions": output.predictions.float().cpu().numpy(),
                      "embeddings": output.embeddings.float().cpu().numpy()}
            if output.prediction_log_variance is not None:
                arrays["prediction_log_variance"] = output.prediction_log_variance.float().cpu().numpy()
            if output.outlier_score is not None:
                arrays["outlier_score"] = output.outlier_score.float().cpu().numpy()
            if ADDON_TOKEN_HEAD in output.token_outputs:
                log_rate = output.token_outputs[ADDON_TOKEN_HEAD].float()
                arrays["token_rate"] = torch.exp(log_rate).cpu().numpy()
                arrays["token_log1p"] = token_log1p(log_rate).cpu().numpy()
            yield batch, arrays


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    addon_genes: Sequence[str],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    route: str | None = None,
) -> Evaluation:
    """Predict every tile of ``dataset`` and score it per gene (Pearson, Spearman, MSE); ``route``
    as for :func:`model_outputs` (None: every input the model reads)."""
    config = model.config
    check_tile_dataset(dataset, config, "evaluation")
    outputs: dict[str, list[np.ndarray]] = {}
    for batch, arrays in model_outputs(model, dataset, batch_size=batch_size, device=device, bf16=bf16,
                                       route=route):
        arrays["targets"] = batch["target"].float().numpy()
        if "token_log1p" in arrays:
            arrays["token_targets"] = batch["token_target"].float().numpy()
        for name, array in arrays.items():
            outputs.setdefault(name, []).append(array)
    got = {name: np.concatenate(arrays) for name, arrays in outputs.items()}
    predicted, measured = got["predictions"], got["targets"]
    gene_metrics = per_gene_metrics(predicted, measured, addon_genes)
    evaluation = Evaluation(predicted, measured, got["embeddings"], gene_metrics, mean_metrics(gene_metrics),
                            log_variances=got.get("prediction_log_variance"))
    if "token_log1p" not in got:
        return evaluation
    token_predicted, token_counts = got["token_log1p"], got["token_targets"]
    n_genes = token_predicted.shape[-1]
    token_metrics = per_gene_metrics(token_predicted.reshape(-1, n_genes), np.log1p(token_counts).reshape(-1, n_genes),
                                     addon_genes)
    token_sum = np.log1p(np.expm1(token_predicted).sum(axis=1))  # the tile's expected count from its tokens
    token_sum_metrics = mean_metrics(per_gene_metrics(token_sum, measured, addon_genes))
    return dataclasses.replace(evaluation, token_gene_metrics=token_metrics, token_means=mean_metrics(token_metrics),
                               token_sum_means=token_sum_metrics)
