"""Checkpoints: safetensors weights with the JSON model card in the same file's metadata.

safetensors holds only tensors and strings, so opening a checkpoint can never run code. The
card is checked field by field before it is used to build anything.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from napari_morphomol import __version__
from napari_morphomol.errors import InputError
from napari_morphomol.models.baseline import MinMAEBaseline
from napari_morphomol.models.config import IMAGE_MEAN, IMAGE_STD, ModelConfig, ModelTileGeometry
from napari_morphomol.models.fusion import FusionModel

CARD_METADATA_KEY = "morphomol_model_card"
CARD_FORMAT = "napari-morphomol-model"
CARD_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, feed and judge a model; stored as JSON with its weights.

    ``training`` holds the data summary, metrics and the settings of the run (free-form JSON);
    ``provenance`` where the weights came from.
    """

    model: ModelConfig
    core_genes: tuple[str, ...]
    addon_genes: tuple[str, ...]
    tile_geometry: ModelTileGeometry = ModelTileGeometry()
    training: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, genes, count in (
            ("core", self.core_genes, self.model.n_core_genes),
            ("add-on", self.addon_genes, self.model.n_addon_genes),
        ):
            if len(genes) != count:
                raise InputError(f"The model has {count} {name} genes but the card lists {len(genes)}.")
            if len(set(genes)) != len(genes):
                raise InputError(f"The {name} gene list has duplicates.")
        overlap = sorted(set(self.core_genes) & set(self.addon_genes))
        if overlap:
            raise InputError(f"Core and add-on panels must be disjoint; both contain {overlap[:10]}.")
        if self.tile_geometry.img_size != self.model.img_size or self.tile_geometry.patch_px != self.model.patch_px:
            raise InputError(
                f"Tile geometry ({self.tile_geometry.img_size} px, patch {self.tile_geometry.patch_px}) "
                f"differs from the model's ({self.model.img_size} px, patch {self.model.patch_px})."
            )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CARD_FORMAT,
                "format_version": CARD_FORMAT_VERSION,
                "model": self.model.to_dict(),
                "core_genes": list(self.core_genes),
                "addon_genes": list(self.addon_genes),
                "tile_geometry": self.tile_geometry.to_dict(),
                "normalisation": {
                    "image": {"scale": "uint8 / 255", "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
                    "transcripts": "log1p of counts per token (tile-level: of the mean over tokens)",
                    "target": "log1p of add-on counts summed over the tile",
                },
                "training": _finite_or_null(self.training),
                "provenance": self.provenance,
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"The model card is not valid JSON ({error}).") from error
        if not isinstance(values, dict) or values.get("format") != CARD_FORMAT:
            raise InputError(f"This is not a napari-morphomol model card (format is not {CARD_FORMAT!r}).")
        version = values.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > CARD_FORMAT_VERSION:
            raise InputError(
                f"Model card format version {version!r} is not supported (this napari-morphomol reads up to "
                f"{CARD_FORMAT_VERSION}); update napari-morphomol."
            )
        genes = {}
        for key in ("core_genes", "addon_genes"):
            listed = values.get(key)
            if not isinstance(listed, list) or not all(isinstance(g, str) for g in listed):
                raise InputError(f"Model card field {key!r} must be a list of gene names (strings).")
            genes[key] = tuple(listed)
        for key in ("training", "provenance"):
            if not isinstance(values.get(key, {}), dict):
                raise InputError(f"Model card field {key!r} must be a JSON object.")
        return cls(
            model=ModelConfig.from_dict(values.get("model")),
            tile_geometry=ModelTileGeometry.from_dict(values.get("tile_geometry", {})),
            training=values.get("training", {}),
            provenance=values.get("provenance", {}),
            **genes,
        )


def _finite_or_null(value: Any) -> Any:
    """NaN/inf (e.g. the correlation of a constant gene) as null, so the card is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def build_model(config: ModelConfig, backbone_weights: str | Path | None = None) -> nn.Module:
    """The module for any variant (random init unless ``backbone_weights``, see create_backbone)."""
    if config.variant == "min_mae":
        return MinMAEBaseline(config)
    return FusionModel(config, backbone_weights)


def save_checkpoint(model: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write weights + card to one .safetensors file, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"Checkpoints are .safetensors files; got {path.name}.")
    if model.config != card.model:
        raise InputError("The model card describes a different architecture than the model being saved.")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    provenance = {
        "napari_morphomol_version": __version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **card.provenance,
    }
    card = ModelCard(card.model, card.core_genes, card.addon_genes, card.tile_geometry, card.training, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(temporary, 0o644)  # mkstemp makes 0600: readable outputs, like files open() creates
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={CARD_METADATA_KEY: card.to_json()})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_model_card(path: str | Path) -> ModelCard:
    """The card alone, without reading any weights (cheap: the safetensors header only)."""
    card, _ = _open_checkpoint(path, with_tensors=False)
    return card


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Model (in eval mode) and card from a napari-morphomol .safetensors checkpoint."""
    card, tensors = _open_checkpoint(path, with_tensors=True, device=str(device))
    model = build_model(card.model)
    model.to(device)
    missing, unexpected = _compare_keys(model, tensors)
    if missing or unexpected:
        raise InputError(
            f"Checkpoint {Path(path).name} does not match the architecture its card describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); the file is damaged or hand-edited."
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise InputError(f"Checkpoint {Path(path).name} has tensors of the wrong shape: {error}") from error
    return model.eval(), card


def _compare_keys(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(tensors)), sorted(set(tensors) - expected)


def _open_checkpoint(path: str | Path, *, with_tensors: bool, device: str = "cpu"):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist.")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise InputError(
            f"{path.name} is a PyTorch/Lightning file, not a napari-morphomol checkpoint. If it was trained "
            "with the paper's reference code, convert it with "
            "napari_morphomol.models.convert_reference_checkpoint (see docs/models.md)."
        )
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            if CARD_METADATA_KEY not in metadata:
                raise InputError(
                    f"{path.name} is a safetensors file without a napari-morphomol model card; it holds bare "
                    "weights. Reference-layout weights can be converted with convert_reference_checkpoint."
                )
            card = ModelCard.from_json(metadata[CARD_METADATA_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else None
    except (SafetensorError, OSError) as error:
        raise InputError(
            f"Checkpoint {path.name} is not a readable safetensors file ({error}); it may be truncated or "
            "corrupted. Copy it again or re-export it."
        ) from error
    return card, tensors


@dataclass(frozen=True)
class PanelMatch:
    """Where the model's genes are in a sample's gene list, and what the sample has on top."""

    core_index: np.ndarray
    addon_measured: tuple[str, ...]
    extra_genes: tuple[str, ...]

    def report(self) -> str:
        extra = ", ".join(self.extra_genes[:20]) + (" ..." if len(self.extra_genes) > 20 else "")
        return (
            f"{len(self.core_index)} core genes found; {len(self.addon_measured)} add-on genes are measured "
            f"in this sample (metrics possible); {len(self.extra_genes)} other genes are ignored"
            + (f": {extra}" if self.extra_genes else "")
            + "."
        )


def match_gene_panel(card: ModelCard, sample_genes: Sequence[str]) -> PanelMatch:
    """Check a sample's gene list against the model's; every core gene must be present.

    Raises InputError listing the missing core genes. Genes of neither panel are ignored and
    reported in ``PanelMatch.extra_genes``. A morph-only model reads no transcripts: its
    ``core_index`` is empty and its core genes need not be present.
    """
    position = {gene: i for i, gene in enumerate(sample_genes)}
    missing = [gene for gene in card.core_genes if gene not in position]
    if not card.model.uses_transcripts:
        missing, core_genes = [], ()
    else:
        core_genes = card.core_genes
    if missing:
        raise InputError(
            f"The sample lacks {len(missing)} of the model's {len(card.core_genes)} core genes: "
            f"{', '.join(missing)}. The model needs all of them as input; use a model trained on this "
            "sample's panel or a sample measured with the model's core panel."
        )
    panel = set(card.core_genes) | set(card.addon_genes)
    return PanelMatch(
        core_index=np.array([position[gene] for gene in core_genes], dtype=np.int64),
        addon_measured=tuple(gene for gene in card.addon_genes if gene in position),
        extra_genes=tuple(gene for gene in sample_genes if gene not in panel),
    )


def check_tile_geometry(card: ModelCard, *, tile_px: int, tile_mpp: float, image_px: int, tokens_per_side: int) -> None:
    """Raise InputError when tiles would show the model a different scale than in training.

    Arguments are named as in ``napari_morphomol.tiling.TileGeometry``. The stride only sets
    how much tiles overlap, so it may differ.
    """
    trained = card.tile_geometry
    given = {
        "tile_px": (tile_px, trained.tile_px),
        "tile_mpp": (tile_mpp, trained.mpp),
        "image_px": (image_px, trained.img_size),
        "tokens_per_side": (tokens_per_side, trained.img_size // trained.patch_px),
    }
    differences = [f"{name} {value} (model trained with {want})" for name, (value, want) in given.items() if value != want]
    if differences:
        raise InputError(
            "The tile geometry differs from the model's training: "
            + "; ".join(differences)
            + f". Cut tiles of {trained.tile_px} px at {trained.mpp} um/px resized to {trained.img_size} px "
            f"({trained.img_size // trained.patch_px} x {trained.img_size // trained.patch_px} tokens), so each "
            "token covers the tissue area the model learned from."
        )
