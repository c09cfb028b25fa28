"""What a model is: its variant, sizes and the tile geometry it was trained on.

Everything here is plain data that round-trips through JSON, so the model card of a checkpoint
can rebuild the exact architecture without code from the checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from napari_morphomol.errors import InputError

#: One name per row of the paper's comparison (Table A.1). Early fusion is token-level by
#: construction; late fusion and expr-only aggregate transcripts per token (mean of token
#: embeddings) or per tile (mean of the token counts, then one embedding).
VARIANTS = (
    "early_fusion_add",
    "early_fusion_concat",
    "late_fusion_add_token",
    "late_fusion_add_tile",
    "late_fusion_concat_token",
    "late_fusion_concat_tile",
    "morph_only",
    "expr_only_token",
    "expr_only_tile",
    "min_mae",
)
DEFAULT_VARIANT = "early_fusion_add"
DEFAULT_BACKBONE = "vit_small_patch16_224"

#: Image normalisation of the augreg ViT-S/16 weights the paper starts from: uint8 / 255, then
#: (x - mean) / std per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelTileGeometry:
    """How tiles and tokens were cut: 512 px tiles at 0.5 um/px, stride 256, resized to 224."""

    tile_px: int = 512
    stride_px: int = 256
    mpp: float = 0.5
    img_size: int = 224
    patch_px: int = 16

    @property
    def token_grid(self) -> int:
        return self.img_size // self.patch_px

    @property
    def n_tokens(self) -> int:
        return self.token_grid**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelTileGeometry:
        return _from_dict(cls, values, "tile_geometry")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model of the family; defaults are the paper's early-fusion model.

    ``backbone_kwargs`` are passed to ``timm.create_model`` (e.g. ``depth=2`` for a tiny test
    model); they are recorded in the model card so the same architecture is rebuilt on load.
    ``unimodal_inputs`` marks a fusion model trained with modality dropout, which may then be
    given only the image or only the transcripts at inference.
    """

    n_core_genes: int
    n_addon_genes: int
    variant: str = DEFAULT_VARIANT
    backbone: str = DEFAULT_BACKBONE
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    patch_px: int = 16
    expression_hidden_dim: int = 32
    expression_hidden_layers: int = 1
    expression_dim: int = 32
    dropout: float = 0.1
    learnable_gate: bool = False
    modality_embedding: bool = False
    unimodal_inputs: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"Unknown model variant {self.variant!r}; choose one of {', '.join(VARIANTS)}.")
        for name in ("n_core_genes", "n_addon_genes", "img_size", "patch_px", "expression_hidden_dim", "expression_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"Model config {name} must be a positive integer, got {value!r}.")
        if self.img_size % self.patch_px:
            raise InputError(f"img_size {self.img_size} is not a multiple of the patch size {self.patch_px}.")
        if self.expression_hidden_layers < 0:
            raise InputError("Model config expression_hidden_layers must be >= 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"Model config dropout must be in [0, 1), got {self.dropout}.")
        if self.learnable_gate and self.fusion != "add":
            raise InputError("A learnable gate only exists for add fusion; set learnable_gate=False.")
        if self.modality_embedding and self.variant != "early_fusion_concat":
            raise InputError("A modality embedding is only used by early_fusion_concat.")
        if self.unimodal_inputs and self.stage == "late" and self.fusion == "concat":
            raise InputError("Late concat fusion cannot run on one modality; set unimodal_inputs=False.")
        if self.unimodal_inputs and self.stage is None:
            raise InputError("unimodal_inputs only applies to fusion variants.")

    @property
    def stage(self) -> str | None:
        """'early', 'late' or None for single-modality models."""
        if self.variant.startswith("early_fusion"):
            return "early"
        if self.variant.startswith("late_fusion"):
            return "late"
        return None

    @property
    def fusion(self) -> str | None:
        if self.stage is None:
            return None
        return "concat" if "_concat" in self.variant else "add"

    @property
    def transcript_level(self) -> str | None:
        """'token' or 'tile' aggregation of transcripts; None when transcripts are not used."""
        if self.variant == "morph_only":
            return None
        return "tile" if self.variant.endswith("_tile") or self.variant == "min_mae" else "token"

    @property
    def uses_image(self) -> bool:
        return self.stage is not None or self.variant == "morph_only"

    @property
    def uses_transcripts(self) -> bool:
        return self.variant != "morph_only"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, values, "model")


def _from_dict(cls, values: dict[str, Any], what: str):
    """Build a config dataclass from JSON, checking every field's type (cards are untrusted)."""
    if not isinstance(values, dict):
        raise InputError(f"Model card field {what!r} must be a JSON object, got {type(values).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"Model card field {what!r} has unknown keys {unknown}; was it written by a newer version?")
    required = [n for n, f in known.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise InputError(f"Model card field {what!r} lacks {missing}.")
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict[str, Any]": dict}
    for name, value in values.items():
        want = expected[str(known[name].type)]
        if isinstance(value, bool) and want is not bool:
            raise InputError(f"Model card {what}.{name} must be {known[name].type}, got a boolean.")
        if not isinstance(value, want):
            raise InputError(f"Model card {what}.{name} must be {known[name].type}, got {type(value).__name__} {value!r}.")
    if "backbone_kwargs" in values:
        for key, value in values["backbone_kwargs"].items():
            if not isinstance(value, (int, float, str, bool)):
                raise InputError(f"Model card {what}.backbone_kwargs[{key!r}] must be a number, string or boolean.")
    return cls(**values)
