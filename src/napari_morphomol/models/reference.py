"""Bring models trained with the paper's reference code (AI4SCR/xenium-hne-fusion).

Its Lightning checkpoints hold a ``state_dict`` with ``backbone.*`` / ``head.head.0.*`` keys
(see docs/models.md for the full mapping). A .ckpt is a pickle, so it is read only with
``torch.load(weights_only=True)``, which admits tensors and plain containers; when that
refuses, we explain how to convert the file where it is trusted. We never unpickle fully.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from napari_morphomol.errors import InputError
from napari_morphomol.models.checkpoint import ModelCard, build_model, save_checkpoint
from napari_morphomol.models.config import DEFAULT_BACKBONE, ModelConfig
from napari_morphomol.tiling.geometry import TileSpec

#: Reference key prefix -> our key prefix, for parts every variant that has them maps 1:1.
REFERENCE_PREFIXES = (
    ("backbone.morph_encoder.", "image_encoder."),
    ("backbone.expr_encoder.head.", "expression_encoder."),
    ("backbone.expr_to_morph_proj.", "expression_projection."),
    ("backbone.ln_morph.", "image_norm."),
    ("backbone.ln_expr.", "expression_norm."),
    ("head.head.0.", "head."),
)
#: Single reference parameters that every reference model carries, used only by some variants.
REFERENCE_GATE = "backbone.fusion_alpha"
REFERENCE_MODALITY_TOKEN = "backbone.modality_token"

CONVERSION_HELP = (
    "Convert it where the file is trusted (e.g. on the machine that trained it) with:\n"
    "  python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('model.ckpt', map_location='cpu', weights_only=False)['state_dict']; "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'model-reference.safetensors')\"\n"
    "then give model-reference.safetensors to convert_reference_checkpoint."
)


@dataclass(frozen=True)
class ReferenceConversion:
    """What a reference state dict became: our state dict and the keys our variant does not use."""

    state_dict: dict[str, torch.Tensor]
    unused_keys: tuple[str, ...]


def read_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a reference checkpoint (.ckpt/.pt/.pth read weights-only, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Reference checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            loaded: Any = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise InputError(
                f"{path.name} is not a readable safetensors file ({error}); it may be truncated."
            ) from error
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise InputError(
                f"{path.name} contains Python objects beyond tensors and plain containers, so it was not "
                f"opened (a pickle can run code). Refused: {str(error).splitlines()[0]}\n{CONVERSION_HELP}"
            ) from error
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
            raise InputError(
                f"{path.name} is not a readable PyTorch/Lightning checkpoint ({error}); it may be truncated "
                "or corrupted."
            ) from error
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise InputError(f"{path.name} holds no state dict (expected a Lightning checkpoint or a dict of tensors).")
    bad = [key for key, value in loaded.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise InputError(f"{path.name}: state dict entries {bad[:5]} are not named tensors.")
    return loaded


def reference_to_our_state_dict(reference: dict[str, torch.Tensor], config: ModelConfig) -> ReferenceConversion:
    """Rename reference keys to ours for ``config``; unknown keys and contradictions raise."""
    converted: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    unknown: list[str] = []
    for key, tensor in reference.items():
        if key == REFERENCE_GATE:
            if config.learnable_gate:
                converted["fusion_gate_logit"] = tensor
            elif torch.any(tensor != 0):
                raise InputError(
                    f"The checkpoint's fusion gate alpha is {tensor.flatten().tolist()}, not 0, so the model was "
                    "trained with a learnable gate; load it with learnable_gate=True."
                )
            else:
                unused.append(key)
            continue
        if key == REFERENCE_MODALITY_TOKEN:
            if config.modality_embedding:
                converted["modality_embedding"] = tensor
            else:
                unused.append(key)
            continue
        for reference_prefix, our_prefix in REFERENCE_PREFIXES:
            if key.startswith(reference_prefix):
                if our_prefix in ("image_norm.", "expression_norm.") and config.stage != "late":
                    unused.append(key)
                else:
                    converted[our_prefix + key[len(reference_prefix):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise InputError(
            f"The checkpoint has {len(unknown)} keys outside the reference layout, e.g. {unknown[:5]}; only the "
            "MLP expression encoder with a timm ViT is supported (see docs/models.md)."
        )
    return ReferenceConversion(converted, tuple(sorted(unused)))


def infer_reference_config(
    reference: dict[str, torch.Tensor],
    *,
    variant: str,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    learnable_gate: bool | None = None,
    modality_embedding: bool | None = None,
) -> ModelConfig:
    """Sizes read from the tensors; what tensors cannot tell (variant, backbone) is given.

    A non-zero gate alpha or modality token can only come from training, so they switch the
    learnable gate and modality embedding on unless the caller decides.
    """
    head = reference.get("head.head.0.weight")
    if head is None:
        raise InputError("The checkpoint has no 'head.head.0.weight'; it is not a reference regression model.")
    expression_weights = sorted(
        (int(key.split(".")[3]), tensor)
        for key, tensor in reference.items()
        if key.startswith("backbone.expr_encoder.head.") and key.endswith(".weight")
    )
    has_image = any(key.startswith("backbone.morph_encoder.") for key in reference)
    has_expression = bool(expression_weights)
    config_kwargs: dict[str, Any] = {}
    if has_expression:
        first, last = expression_weights[0][1], expression_weights[-1][1]
        config_kwargs.update(
            n_core_genes=int(first.shape[1]),
            expression_hidden_dim=int(first.shape[0]),
            expression_hidden_layers=len(expression_weights) - 2,
            expression_dim=int(last.shape[0]),
        )
        if len(expression_weights) < 2:
            raise InputError("The reference expression encoder has a single linear layer; that layout is unsupported.")
    else:
        config_kwargs["n_core_genes"] = 1
    alpha = reference.get(REFERENCE_GATE)
    if learnable_gate is None:
        learnable_gate = alpha is not None and bool(torch.any(alpha != 0))
    token = reference.get(REFERENCE_MODALITY_TOKEN)
    if modality_embedding is None:
        modality_embedding = variant == "early_fusion_concat" and token is not None and bool(torch.any(token != 0))
    config = ModelConfig(
        n_addon_genes=int(head.shape[0]),
        variant=variant,
        backbone=backbone,
        backbone_kwargs=dict(backbone_kwargs or {}),
        learnable_gate=learnable_gate,
        modality_embedding=modality_embedding,
        **config_kwargs,
    )
    if config.uses_image != has_image or config.uses_transcripts != has_expression:
        raise InputError(
            f"Variant {variant} does not fit this checkpoint: it has "
            f"{'an' if has_image else 'no'} image encoder and {'an' if has_expression else 'no'} expression encoder."
        )
    return config


def load_reference_checkpoint(
    path: str | Path,
    *,
    variant: str,
    core_genes: Sequence[str],
    addon_genes: Sequence[str],
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    learnable_gate: bool | None = None,
    modality_embedding: bool | None = None,
    tile_geometry: TileSpec = TileSpec(),
) -> tuple[nn.Module, ModelCard, ReferenceConversion]:
    """Our model, its card and the conversion report for a reference-code checkpoint.

    The reference saves no gene names: ``core_genes`` / ``addon_genes`` are its source and
    target panels in training order. ``variant`` must name how it was trained (e.g.
    ``early_fusion_add`` for the config ``early-fusion``; see docs/models.md).
    """
    reference = read_reference_state_dict(path)
    config = infer_reference_config(
        reference,
        variant=variant,
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        learnable_gate=learnable_gate,
        modality_embedding=modality_embedding,
    )
    if not config.uses_transcripts:
        config = ModelConfig(**{**config.to_dict(), "n_core_genes": len(core_genes)})
    card = ModelCard(
        model=config,
        core_genes=tuple(core_genes),
        addon_genes=tuple(addon_genes),
        tile_geometry=tile_geometry,
        provenance={"converted_from": Path(path).name, "layout": "AI4SCR/xenium-hne-fusion"},
    )
    conversion = reference_to_our_state_dict(reference, config)
    model = build_model(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(conversion.state_dict))
    surplus = sorted(set(conversion.state_dict) - expected)
    if missing or surplus:
        raise InputError(
            f"The checkpoint does not fit variant {variant} with backbone {backbone} {backbone_kwargs or ''}: "
            f"missing {missing[:5]}, surplus {surplus[:5]}.{_describe_vit(reference)} Check the variant and "
            "backbone (docs/models.md lists the mapping)."
        )
    try:
        model.load_state_dict(conversion.state_dict, strict=True)
    except RuntimeError as error:
        raise InputError(
            f"Tensor shapes do not fit backbone {backbone} {backbone_kwargs or ''}: {error}. "
            "Name the backbone the model was trained with."
        ) from error
    return model.eval(), card, conversion


def _describe_vit(reference: dict[str, torch.Tensor]) -> str:
    """The ViT size a reference state dict holds, to help name the right backbone."""
    blocks = {key.split(".")[3] for key in reference if key.startswith("backbone.morph_encoder.blocks.")}
    token = reference.get("backbone.morph_encoder.cls_token")
    if token is None:
        return ""
    return f" The checkpoint's ViT has {len(blocks)} blocks of width {token.shape[-1]}."


def convert_reference_checkpoint(source: str | Path, destination: str | Path, **options: Any) -> ModelCard:
    """Write a reference checkpoint as a napari-morphomol .safetensors checkpoint with card.

    ``options`` are those of load_reference_checkpoint (variant, core_genes, addon_genes, ...).
    """
    model, card, _ = load_reference_checkpoint(source, **options)
    save_checkpoint(model, card, destination)
    return card
