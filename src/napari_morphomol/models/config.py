"""What a model is: its variant, its sizes, and how the tile geometry it was trained on is read.

Everything here is plain data that round-trips through JSON, so the model card of a checkpoint
can rebuild the exact architecture without code from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_morphomol.errors import InputError
from napari_morphomol.tiling.geometry import TileSpec


@dataclass(frozen=True)
class Variant:
    """One row of the paper's comparison (Table A.1): which inputs a model reads and how it fuses them."""

    name: str
    stage: str | None
    """'early' (transcript tokens added to / beside the image tokens before the blocks), 'late'
    (image and transcript embeddings combined after their encoders) or None (one modality)."""
    fusion: str | None
    """'add' or 'concat' for fusion variants, None otherwise."""
    transcript_level: str | None
    """'token' (one embedding per token, then their mean) or 'tile' (one embedding of the mean token
    counts); None when the model reads no transcripts."""
    uses_image: bool
    neural: bool = True
    """False for the Min-MAE baseline, which is fitted, not trained."""

    @property
    def uses_transcripts(self) -> bool:
        return self.transcript_level is not None

    @property
    def has_token_sequence(self) -> bool:
        """Whether the model holds one feature per token of the tile (what a per-token head reads):
        every neural variant but those that average the transcripts over the tile."""
        return self.neural and self.transcript_level != "tile"


#: The model family, one row per variant. Early fusion is token-level by construction; late
#: fusion and expr-only aggregate transcripts per token or per tile. Adding a variant is adding a
#: row here (and its route in ``FusionModel`` if it fuses in a new way).
VARIANT_TABLE: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("early_fusion_add", "early", "add", "token", uses_image=True),
        Variant("early_fusion_concat", "early", "concat", "token", uses_image=True),
        Variant("late_fusion_add_token", "late", "add", "token", uses_image=True),
        Variant("late_fusion_add_tile", "late", "add", "tile", uses_image=True),
        Variant("late_fusion_concat_token", "late", "concat", "token", uses_image=True),
        Variant("late_fusion_concat_tile", "late", "concat", "tile", uses_image=True),
        Variant("morph_only", None, None, None, uses_image=True),
        Variant("expr_only_token", None, None, "token", uses_image=False),
        Variant("expr_only_tile", None, None, "tile", uses_image=False),
        Variant("min_mae", None, None, "tile", uses_image=False, neural=False),
    )
}
VARIANTS = tuple(VARIANT_TABLE)
DEFAULT_VARIANT = "early_fusion_add"

#: Which inputs a model is given: the H&E and the transcripts, the H&E alone (a slide without a
#: Xenium run), the transcripts alone. A fusion model runs the single routes only if it was trained
#: with modality dropout (``ModelConfig.unimodal_inputs``); a single-modality model has one route.
ROUTES = ("both", "image", "transcripts")
ROUTE_INPUTS = {"both": ("image", "transcripts"), "image": ("image",), "transcripts": ("transcripts",)}
DEFAULT_BACKBONE = "vit_small_patch16_224"

#: Image normalisation of the augreg ViT-S/16 weights the paper starts from: uint8 / 255, then
#: (x - mean) / std per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

#: A timm architecture name with an optional pretrained tag (``vit_small_patch16_224.augreg_in21k``).
#: Anything else (``hf-hub:``, ``timm/...``, a URL, ``local-dir:``, a path) names a model to fetch
#: or read, which a model card must never make us do.
LOCAL_BACKBONE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?")

#: The ``timm.create_model`` keyword arguments a config (and so a model card) may set, with their
#: type: they describe the ViT's shape and dropout, nothing more. Others can load files
#: (``checkpoint_path``), fetch weights (``pretrained``) or pick code (``block_fn``).
BACKBONE_KWARGS: dict[str, type] = {
    "depth": int,
    "embed_dim": int,
    "num_heads": int,
    "mlp_ratio": float,
    "patch_size": int,
    "qkv_bias": bool,
    "qk_norm": bool,
    "proj_bias": bool,
    "init_values": float,
    "no_embed_class": bool,
    "pre_norm": bool,
    "final_norm": bool,
    "dynamic_img_size": bool,
    "drop_rate": float,
    "pos_drop_rate": float,
    "patch_drop_rate": float,
    "proj_drop_rate": float,
    "attn_drop_rate": float,
    "drop_path_rate": float,
}

#: (minimum, maximum) of the sizes a config or model card may give, checked before anything is
#: built. Generous for real ViTs (ViT-L/16 has depth 24, width 1024, 16 heads; ViT-22B width
#: 6144) and panels (Xenium Prime has 5000 genes), so a hand-edited card cannot ask for terabytes.
ARCHITECTURE_LIMITS: dict[str, tuple[float, float]] = {
    "n_core_genes": (1, 100_000),
    "n_addon_genes": (1, 100_000),
    "img_size": (1, 1024),
    "patch_px": (1, 1024),
    "expression_hidden_dim": (1, 16_384),
    "expression_hidden_layers": (0, 64),
    "expression_dim": (1, 16_384),
    "depth": (1, 64),
    "embed_dim": (1, 8192),
    "num_heads": (1, 256),
    "mlp_ratio": (1 / 64, 16),
    "patch_size": (1, 1024),
    "init_values": (0, 1e3),
    "drop_rate": (0, 0.999),
    "pos_drop_rate": (0, 0.999),
    "patch_drop_rate": (0, 0.999),
    "proj_drop_rate": (0, 0.999),
    "attn_drop_rate": (0, 0.999),
    "drop_path_rate": (0, 0.999),
}
#: How a model output may be named (it names an array of the results store), and the names taken:
#: the tile outputs every model has and the results store's own entries.
OUTPUT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
RESERVED_OUTPUT_NAMES = frozenset({"predictions", "embeddings", "prediction_log_variance", "outlier_score", "tiles",
                                   "measured_counts",
                                   "measured_token_counts", "token_maps", "trust", "done", "chunk_seconds", "inputs"})
ADDON_TOKEN_HEAD = "addon_tokens"
"""The token head that predicts the add-on panel per token (width ``n_addon_genes``), trained on
the tiles store's per-token add-on counts. Its output is a log rate per token and gene: the
expected log1p count of a token is ``softplus(output)`` = log1p(exp(output)) whatever the loss."""


def addon_token_log1p(log_rate: np.ndarray) -> np.ndarray:
    """The expected log1p counts of the add-on token head's output: ``softplus(log_rate)``."""
    return np.logaddexp(0.0, log_rate)

#: Tokens per tile, (img_size / patch_px) squared: 196 in the paper, 1369 for a ViT/14 at 518 px.
MAX_TOKENS_PER_TILE = 4096
#: Parameters of the whole model: ViT-L/16 has 0.3e9, ViT-g/14 1.0e9 (8 GB of float32).
MAX_PARAMETERS = 2_000_000_000


#: Keys of a card's ``tile_geometry`` written before it was a :class:`TileSpec` (card format 1 of
#: napari-morphomol before the tiling and the model shared one geometry), and their spec names.
_OLD_TILE_GEOMETRY_KEYS = {"mpp": "tile_pixel_size_um", "img_size": "image_px"}


def tile_spec_from_dict(values: dict[str, Any]) -> TileSpec:
    """The :class:`~napari_morphomol.tiling.TileSpec` of a model card's ``tile_geometry``, checked
    (cards are untrusted); the keys of older cards (``mpp``, ``img_size``, ``patch_px``) are read too."""
    if not isinstance(values, dict):
        raise InputError(f"Model card field 'tile_geometry' must be a JSON object, got {type(values).__name__}.")
    values = dict(values)
    if "patch_px" in values:
        patch_px, image_px = values.pop("patch_px"), values.get("img_size", values.get("image_px", 224))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (patch_px, image_px)):
            raise InputError(f"Model card tile_geometry patch_px {patch_px!r} and img_size {image_px!r} must be "
                             "positive integers.")
        values["tokens_per_side"] = image_px // patch_px
    for old, new in _OLD_TILE_GEOMETRY_KEYS.items():
        if old in values:
            values[new] = values.pop(old)
    return _from_dict(TileSpec, values, "tile_geometry")


@dataclass(frozen=True)
class OutputSpec:
    """One output of a model: its name (an array of the results store), its level and its width.

    A ``"tile"`` output is (B, width) per batch of tiles; a ``"token"`` output is (B, tokens, width).
    Plain data (no torch), so the results store and its readers can use it.
    """

    name: str
    level: str
    width: int


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
    token_heads: dict[str, int] = field(default_factory=dict)
    """Per-token outputs: name -> width. Each is a linear head on the token features
    (``FusionModel.forward_tokens``), giving (B, tokens, width) in ``ModelOutput.token_outputs``
    and one (tiles, tokens, width) array of that name in the results store."""
    variance_head: bool = False
    """A second linear head on the tile embedding giving the log variance of each tile prediction
    (``ModelOutput.prediction_log_variance``), trained with a Gaussian likelihood on the tile
    residuals (the mean is not moved by it), then refit on the validation residuals
    (``training.refit_variance_head``); the spread that calibrated intervals scale."""
    outlier_reference_tokens: int = 0
    """Token features of training tiles the model keeps as its outlier reference (0: none). Set by
    calibration (``models.trust.fit_calibration``); the model then scores every tile by how far its
    token features lie from the reference (``ModelOutput.outlier_score``)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"Unknown model variant {self.variant!r}; choose one of {', '.join(VARIANTS)}.")
        for name in (
            "n_core_genes", "n_addon_genes", "img_size", "patch_px", "expression_hidden_dim", "expression_dim"
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"Model config {name} must be a positive integer, got {value!r}.")
        for name in ("n_core_genes", "n_addon_genes", "img_size", "patch_px", "expression_hidden_dim",
                     "expression_hidden_layers", "expression_dim"):
            _check_limits(name, getattr(self, name))
        if self.img_size % self.patch_px:
            raise InputError(f"img_size {self.img_size} is not a multiple of the patch size {self.patch_px}.")
        tokens = (self.img_size // self.patch_px) ** 2
        if tokens > MAX_TOKENS_PER_TILE:
            raise InputError(
                f"Model config: {tokens} tokens per tile "
                f"(img_size {self.img_size} / patch_px {self.patch_px}, squared) "
                f"is above the limit of {MAX_TOKENS_PER_TILE} that napari-morphomol builds; use larger patches or "
                "smaller tiles."
            )
        self._check_backbone()
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
        self._check_token_heads()
        if self.variance_head and not self.variant_spec.neural:
            raise InputError("Min-MAE is fitted, not trained, and has no variance head; set variance_head=False.")
        references = self.outlier_reference_tokens
        if not isinstance(references, int) or isinstance(references, bool) or not 0 <= references <= 1_000_000:
            raise InputError(f"Model config outlier_reference_tokens must be an integer from 0 to 1,000,000, got "
                             f"{references!r}.")
        if references and not self.variant_spec.has_token_sequence:
            raise InputError(f"Model variant {self.variant} has no token features to keep an outlier reference of; "
                             "set outlier_reference_tokens=0.")

    def _check_token_heads(self) -> None:
        """Token heads only on a variant with a token sequence, each with a free name and a width;
        Min-MAE has its per-token form of the add-on head (the copied core gene's token counts)."""
        min_mae_per_token = self.variant == "min_mae" and set(self.token_heads) <= {ADDON_TOKEN_HEAD}
        if self.token_heads and not self.variant_spec.has_token_sequence and not min_mae_per_token:
            raise InputError(
                f"Model variant {self.variant} averages its transcripts over the tile and has no per-token features, "
                "so it cannot have token heads; remove token_heads or pick a token-level variant."
            )
        for name, width in self.token_heads.items():
            if not isinstance(name, str) or not OUTPUT_NAME.fullmatch(name) or name in RESERVED_OUTPUT_NAMES:
                raise InputError(
                    f"Model config token head name {name!r} is not allowed: use lower-case letters, digits and _ "
                    f"(starting with a letter), and none of {', '.join(sorted(RESERVED_OUTPUT_NAMES))}."
                )
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise InputError(f"Model config token head {name!r} width must be a positive integer, got {width!r}.")
            _check_limits("n_addon_genes", width)
            if name == ADDON_TOKEN_HEAD and width != self.n_addon_genes:
                raise InputError(f"Model config token head {ADDON_TOKEN_HEAD!r} predicts the add-on panel per token: "
                                 f"its width must be n_addon_genes ({self.n_addon_genes}), got {width}.")

    def _check_backbone(self) -> None:
        """A local timm architecture, with only the kwargs that shape it, within the limits."""
        if not LOCAL_BACKBONE_NAME.fullmatch(self.backbone):
            raise InputError(
                f"Model config backbone {self.backbone!r} names a backbone from the network or a file (a hub name, "
                f"URL or path); napari-morphomol builds only local timm architectures, named like {DEFAULT_BACKBONE} "
                "(optionally with a pretrained tag such as .augreg_in21k), and never fetches a model to build it. "
                "Give a timm architecture name; to start training from pretrained weights add --backbone-weights "
                "(a local file, or hub)."
            )
        for key, value in self.backbone_kwargs.items():
            want = BACKBONE_KWARGS.get(key)
            if want is None:
                raise InputError(
                    f"Model config backbone_kwargs {key!r} is not one napari-morphomol passes to timm (it only "
                    f"sets the ViT's shape and dropout: {', '.join(BACKBONE_KWARGS)}); remove it."
                )
            allowed = (int, float) if want is float else want
            if not isinstance(value, allowed) or (isinstance(value, bool) and want is not bool):
                raise InputError(f"Model config backbone_kwargs {key!r} must be {want.__name__}, got {value!r}.")
            if key in ARCHITECTURE_LIMITS:
                _check_limits(key, value)
        embed_dim, num_heads = self.backbone_kwargs.get("embed_dim"), self.backbone_kwargs.get("num_heads")
        if embed_dim is not None and num_heads is not None and embed_dim % num_heads:
            raise InputError(
                f"Model config backbone_kwargs: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}; "
                "every attention head needs the same width."
            )
        patch_size = self.backbone_kwargs.get("patch_size")
        if patch_size is not None and patch_size != self.patch_px:
            raise InputError(
                f"Model config backbone_kwargs patch_size {patch_size} differs from patch_px {self.patch_px}; "
                "tokens would not align with the transcript raster. Give the same size to both."
            )

    @property
    def variant_spec(self) -> Variant:
        """This config's row of :data:`VARIANT_TABLE`."""
        return VARIANT_TABLE[self.variant]

    @property
    def stage(self) -> str | None:
        """'early', 'late' or None for single-modality models."""
        return self.variant_spec.stage

    @property
    def fusion(self) -> str | None:
        return self.variant_spec.fusion

    @property
    def transcript_level(self) -> str | None:
        """'token' or 'tile' aggregation of transcripts; None when transcripts are not used."""
        return self.variant_spec.transcript_level

    @property
    def uses_image(self) -> bool:
        return self.variant_spec.uses_image

    @property
    def uses_transcripts(self) -> bool:
        return self.variant_spec.uses_transcripts

    @property
    def routes(self) -> tuple[str, ...]:
        """The :data:`ROUTES` this model runs: all three for a fusion model trained with modality
        dropout, ``both`` for other fusion models, ``image`` or ``transcripts`` for a single modality."""
        if self.stage is None:
            return ("image",) if self.uses_image else ("transcripts",)
        return ROUTES if self.unimodal_inputs else ("both",)

    @property
    def default_route(self) -> str:
        """The route with every input this model reads."""
        return self.routes[0]

    def check_route(self, route: str) -> None:
        """InputError saying what to do when this model cannot run ``route``."""
        if route not in ROUTES:
            raise InputError(f"Unknown route {route!r}; choose one of {', '.join(ROUTES)}.")
        if route in self.routes:
            return
        given = {"both": "the H&E and the transcripts", "image": "the H&E alone",
                 "transcripts": "the transcripts alone"}[route]
        if self.stage is not None:
            raise InputError(
                f"This {self.variant} model was trained without modality dropout, so it needs both the H&E and the "
                f"Xenium transcripts and cannot predict from {given}. Use a model trained with modality dropout "
                "(`morphomol train --modality-dropout 0.2`; the model shipped with napari-morphomol is one)."
            )
        raise InputError(f"This {self.variant} model reads only {'the H&E' if self.uses_image else 'transcripts'} "
                         f"and cannot predict from {given}; use a model that reads it.")

    def route_reads(self, route: str | None = None) -> tuple[bool, bool]:
        """Whether the model is given (the image, the transcripts) on ``route`` (None: its default),
        after :meth:`check_route`."""
        route = self.default_route if route is None else route
        self.check_route(route)
        inputs = ROUTE_INPUTS[route]
        return "image" in inputs and self.uses_image, "transcripts" in inputs and self.uses_transcripts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, values, "model")


def _check_limits(name: str, value: float) -> None:
    """InputError naming the limit when ``value`` lies outside ARCHITECTURE_LIMITS[name]."""
    minimum, maximum = ARCHITECTURE_LIMITS[name]
    if value < minimum:
        raise InputError(
            f"Model config {name} {value!r} is below the minimum of {minimum:g} that napari-morphomol builds."
        )
    if not value <= maximum:
        raise InputError(
            f"Model config {name} {value!r} is above the limit of {maximum:g} that napari-morphomol builds; real "
            "models stay well within it, so a model card giving it was edited or is not a napari-morphomol card."
        )


def _from_dict(cls, values: dict[str, Any], what: str):
    """Build a config dataclass from JSON, checking every field's type (cards are untrusted)."""
    if not isinstance(values, dict):
        raise InputError(f"Model card field {what!r} must be a JSON object, got {type(values).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"Model card field {what!r} has unknown keys {unknown}; was it written by a newer version?")
    required = [
        n for n, f in known.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in values]
    if missing:
        raise InputError(f"Model card field {what!r} lacks {missing}.")
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict[str, Any]": dict,
                "dict[str, int]": dict}
    for name, value in values.items():
        want = expected[str(known[name].type)]
        if isinstance(value, bool) and want is not bool:
            raise InputError(f"Model card {what}.{name} must be {known[name].type}, got a boolean.")
        if not isinstance(value, want):
            raise InputError(
                f"Model card {what}.{name} must be {known[name].type}, got {type(value).__name__} {value!r}."
            )
    if "backbone_kwargs" in values:
        for key, value in values["backbone_kwargs"].items():
            if not isinstance(value, (int, float, str, bool)):
                raise InputError(f"Model card {what}.backbone_kwargs[{key!r}] must be a number, string or boolean.")
    return cls(**values)
