"""The fusion model family of the paper: early/late fusion, morph-only and expr-only.

One module covers every neural variant so that training, checkpoints and inference handle a
single type. Inputs are what the tiling step produces, untransformed: images uint8
(B, 3, 224, 224) channels-first, transcript counts (B, 196, G_core) per token in row-major
order. Normalisation (uint8/255, mean/std 0.5) and log1p happen inside, so callers never
have to know them and a checkpoint fully describes its preprocessing.

A forward pass goes the timm way, in three steps:

1. *features* (:meth:`FusionModel.forward_features`): the sequences after the encoders, as
   :class:`Features`: the ViT's (class token first; the fused sequence for early fusion) and the
   transcript token embeddings (late fusion and expr-only).
2. *pool*: :meth:`~FusionModel.forward_pool` gives the tile embedding (B, E) and
   :meth:`~FusionModel.forward_tokens` one feature per token (B, tokens, E_token), aligned with
   the token raster in row-major order (None for variants that average transcripts per tile).
3. *heads*: ``head`` maps the tile embedding to the add-on genes (and ``variance_head``, with
   ``config.variance_head``, to the log variance of each; a model trained with modality dropout
   has a second, ``variance_head_image``, for its image-only route, whose errors are larger and lie
   elsewhere); each of ``token_heads``
   (``config.token_heads``) maps the token features to a per-token output.

:meth:`~FusionModel.output_specs` declares what a forward pass gives, as :class:`OutputSpec`
rows; the results store keeps one array per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from napari_morphomol._native_libraries import keep_triton_out_beside_system_llvm

keep_triton_out_beside_system_llvm()  # must run before lightning and timm are imported

import timm
import torch
from torch import nn

from napari_morphomol.errors import InputError
from napari_morphomol.models.config import IMAGE_MEAN, IMAGE_STD, ModelConfig, OutputSpec

#: Expression tokens with a norm below this carry no signal and stay zero after norm matching.
EXPRESSION_NORM_EPSILON = 1e-5


class ModelOutput(NamedTuple):
    """log1p add-on expression per tile (B, G_add), the tile embedding (B, E), the per-token
    outputs by name, (B, tokens, width) each (empty for a model without token heads), and the log
    variance of each tile prediction (B, G_add) for a model with a variance head (else None)."""

    predictions: torch.Tensor
    embeddings: torch.Tensor
    token_outputs: Mapping[str, torch.Tensor] = MappingProxyType({})
    prediction_log_variance: torch.Tensor | None = None
    outlier_score: torch.Tensor | None = None
    """(B, 1) how far the tile's token features lie from the model's outlier reference (a calibrated
    model only; ``models.trust`` defines it)."""


class Features(NamedTuple):
    """The sequences a forward pass has before pooling."""

    image: torch.Tensor | None
    """(B, 1 + T, D) the ViT's sequence after its blocks and final norm, class token first: the
    image tokens (T = tokens), or for early fusion the fused sequence (T = 2 x tokens for concat
    fusion with both inputs). None for expr-only."""
    expression: torch.Tensor | None
    """(B, tokens, E) the transcript token embeddings of late fusion and expr-only ((B, 1, E) for
    tile-level variants, one embedding of the mean counts); None for early fusion and morph-only."""


def expression_mlp(n_inputs: int, config: ModelConfig) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks then a Linear, the paper's expression encoder (32 units)."""
    layers: list[nn.Module] = [
        nn.Linear(n_inputs, config.expression_hidden_dim),
        nn.ReLU(),
        nn.Dropout(config.dropout),
    ]
    for _ in range(config.expression_hidden_layers):
        layers += [
            nn.Linear(config.expression_hidden_dim, config.expression_hidden_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
        ]
    layers.append(nn.Linear(config.expression_hidden_dim, config.expression_dim))
    return nn.Sequential(*layers)


def create_backbone(config: ModelConfig, backbone_weights: str | Path | None = None) -> nn.Module:
    """timm ViT without classifier or pooling; weights from nowhere, a local file, or the hub.

    ``backbone_weights``: None = random init; "hub" = timm's pretrained weights for
    ``config.backbone`` (downloads; name a tag like ``vit_small_patch16_224.augreg_in21k`` to
    pick one); otherwise a local weights file (.safetensors, .pth/.bin read weights-only, or
    the augreg .npz) given to timm as ``pretrained_cfg_overlay=dict(file=...)``.
    """
    kwargs = dict(num_classes=0, global_pool="", img_size=config.img_size, **config.backbone_kwargs)
    if backbone_weights is None:
        pretrained = False
    elif str(backbone_weights) == "hub":
        pretrained = True
    else:
        path = Path(backbone_weights)
        if not path.is_file():
            raise InputError(
                f"Backbone weights file {path} does not exist. Give a local .safetensors/.pth/.npz "
                "file of the timm model, 'hub' to download, or nothing for random init."
            )
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path), custom_load=path.suffix == ".npz")
    try:
        backbone = timm.create_model(config.backbone, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError) as error:  # timm's refusals of a shape: not a ViT, heads not dividing the width
        raise InputError(
            f"Could not create backbone {config.backbone!r} with {config.backbone_kwargs or 'its default sizes'}: "
            f"{error}. Pick a timm VisionTransformer and sizes it accepts (embed_dim a multiple of num_heads)."
        ) from error
    except (RuntimeError, OSError, ValueError) as error:
        raise InputError(
            f"Could not create backbone {config.backbone!r} with weights {backbone_weights!r}: {error}\n"
            "Weight files are only read weights-only here (tensors, no Python objects); if the file is "
            "trusted, re-save its state dict as .safetensors."
        ) from error
    if not all(hasattr(backbone, part) for part in ("patch_embed", "_pos_embed", "blocks", "norm", "norm_pre")):
        raise InputError(f"Backbone {config.backbone!r} is not a timm VisionTransformer; pick a timm ViT.")
    if getattr(backbone, "dynamic_img_size", False):
        raise InputError("dynamic_img_size changes the token layout fusion relies on; leave it off.")
    if not isinstance(backbone.patch_drop, nn.Identity):
        raise InputError("Patch dropout would break the token alignment of fusion; set patch_drop_rate=0.")
    return backbone


class FusionModel(nn.Module):
    """Every neural variant of the paper; ``config.variant`` picks the route."""

    def __init__(self, config: ModelConfig, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        if not config.variant_spec.neural:
            raise InputError(f"{config.variant} is not a neural model; use MinMAEBaseline.")
        self.config = config
        embed_dim = None
        if config.uses_image:
            self.image_encoder = create_backbone(config, backbone_weights)
            embed_dim = self.image_encoder.embed_dim
            if tuple(self.image_encoder.patch_embed.patch_size) != (config.patch_px, config.patch_px):
                raise InputError(
                    f"Backbone {config.backbone!r} has patches of {self.image_encoder.patch_embed.patch_size} px "
                    f"but the model config says {config.patch_px} px; tokens would not align."
                )
            if self.image_encoder.num_prefix_tokens != 1 or self.image_encoder.cls_token is None:
                raise InputError("The backbone must have exactly one class token (the tile embedding).")
        self.n_tokens = (config.img_size // config.patch_px) ** 2
        if config.uses_transcripts:
            self.expression_encoder = expression_mlp(config.n_core_genes, config)
        if config.stage is not None:
            self.expression_projection = nn.Linear(config.expression_dim, embed_dim)
        if config.learnable_gate:
            self.fusion_gate_logit = nn.Parameter(torch.zeros(1))
        if config.modality_embedding:
            self.modality_embedding = nn.Parameter(torch.zeros(1, embed_dim))
        if config.stage == "late":
            self.image_norm = nn.LayerNorm(embed_dim)
            self.expression_norm = nn.LayerNorm(embed_dim)
            self.embedding_dim = embed_dim * (2 if config.fusion == "concat" else 1)
        elif config.uses_image:
            self.embedding_dim = embed_dim
        else:
            self.embedding_dim = config.expression_dim
        self.token_dim = self.embedding_dim if config.variant_spec.has_token_sequence else None
        self.head = nn.Linear(self.embedding_dim, config.n_addon_genes)
        self.token_heads = nn.ModuleDict({name: nn.Linear(self.embedding_dim, width)
                                          for name, width in config.token_heads.items()})
        if config.variance_head:
            self.variance_head = nn.Linear(self.embedding_dim, config.n_addon_genes)
            if config.unimodal_inputs and config.uses_image:
                self.variance_head_image = nn.Linear(self.embedding_dim, config.n_addon_genes)
        self.outlier_dim = None if self.token_dim is None else self.token_dim + (embed_dim if config.uses_image else 0)
        for route in self.outlier_routes:  # filled by calibration, kept in the checkpoint
            suffix = self._outlier_suffix(route)
            self.register_buffer(f"outlier_reference{suffix}",
                                 torch.zeros(config.outlier_reference_tokens, self.outlier_dim))
            self.register_buffer(f"outlier_centre{suffix}", torch.zeros(self.outlier_dim))
            self.register_buffer(f"outlier_scale{suffix}", torch.ones(self.outlier_dim))
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def output_specs(self) -> tuple[OutputSpec, ...]:
        """What :meth:`forward` gives, in order: the tile predictions and embedding (and their log
        variance with a variance head), then the token heads."""
        tile = (OutputSpec("predictions", "tile", self.config.n_addon_genes),
                OutputSpec("embeddings", "tile", self.embedding_dim))
        if self.config.variance_head:
            tile += (OutputSpec("prediction_log_variance", "tile", self.config.n_addon_genes),)
        if self.config.outlier_reference_tokens:
            tile += (OutputSpec("outlier_score", "tile", 1),)
        return tile + tuple(OutputSpec(name, "token", head.out_features) for name, head in self.token_heads.items())

    def variance_heads(self) -> dict[str, nn.Linear]:
        """The variance heads by the route they serve: the default route's (every input; the only one
        of a model trained without modality dropout), and ``image``; none without
        ``config.variance_head``."""
        if not self.config.variance_head:
            return {}
        heads = {self.config.default_route: self.variance_head}
        if hasattr(self, "variance_head_image"):
            heads["image"] = self.variance_head_image
        return heads

    def head_parameters(self) -> list[nn.Parameter]:
        """The heads (tile, variance and token), trained at the head rate."""
        variance = [p for head in self.variance_heads().values() for p in head.parameters()]
        return list(self.head.parameters()) + variance + list(self.token_heads.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything but the heads, trained at the backbone rate as in the reference code."""
        head_ids = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]

    def forward(self, images: torch.Tensor | None, token_counts: torch.Tensor | None) -> ModelOutput:
        features = self.forward_features(images, token_counts)
        embeddings = self.forward_pool(features)
        token_outputs, outlier_score = {}, None
        if self.token_heads or self.config.outlier_reference_tokens:
            tokens = self.forward_tokens(features)
            token_outputs = {name: head(tokens) for name, head in self.token_heads.items()}
            if self.config.outlier_reference_tokens:
                outlier_score = self._outlier_score(images, tokens, token_counts)
        log_variance = None
        if self.config.variance_head:
            heads = self.variance_heads()
            log_variance = heads.get(self._input_route(token_counts), self.variance_head)(embeddings)
        return ModelOutput(self.head(embeddings), embeddings, MappingProxyType(token_outputs), log_variance,
                           outlier_score)

    def forward_features(self, images: torch.Tensor | None, token_counts: torch.Tensor | None) -> Features:
        """The sequences after the encoders (see :class:`Features`), inputs checked first."""
        self._check_inputs(images, token_counts)
        if self.config.stage == "early":
            return Features(self._early_fusion(images, token_counts), None)
        image = expression = None
        if images is not None and self.config.uses_image:
            image = self.image_encoder.forward_features(self._normalise(images))
        if token_counts is not None and self.config.uses_transcripts:
            expression = self._expression_tokens(token_counts)
        return Features(image, expression)

    def forward_pool(self, features: Features) -> torch.Tensor:
        """The tile embedding (B, ``embedding_dim``): the class token of the ViT sequence, the mean
        of the transcript embeddings, or both combined (late fusion)."""
        if self.config.stage == "late":
            image = None if features.image is None else self.image_norm(features.image[:, 0])
            expression = None if features.expression is None else self.expression_norm(features.expression.mean(dim=1))
            return self._combine(image, expression)
        if features.image is not None:
            return features.image[:, 0]
        return features.expression.mean(dim=1)

    def forward_tokens(self, features: Features) -> torch.Tensor:
        """One feature per token (B, tokens, ``token_dim``), row-major like the token raster: the
        ViT's token outputs (for early concat fusion with both inputs, the mean of each token's
        image and transcript positions), the transcript token embeddings, or both combined per
        token as the tile embedding combines them (late fusion)."""
        if self.token_dim is None:
            raise InputError(f"Model variant {self.config.variant} has no per-token features.")
        n = self.n_tokens
        if self.config.stage == "late":
            image = None if features.image is None else self.image_norm(features.image[:, 1:])
            expression = None if features.expression is None else self.expression_norm(features.expression)
            return self._combine(image, expression)
        if features.image is None:
            return features.expression
        tokens = features.image[:, 1:]
        if tokens.shape[1] == 2 * n:  # early concat fusion with both inputs: image positions, then transcript ones
            return 0.5 * (tokens[:, :n] + tokens[:, n:])
        return tokens

    def outlier_features(self, images: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, tokens, ``outlier_dim``) what the outlier reference holds of each token: its feature
        (:meth:`forward_tokens`) and, for a model that reads the image, its patch embedding (the
        pixels before any fusion: the morphology a fused feature may not keep). None for a model
        that reads the image but was given none (transcript-only input)."""
        if not self.config.uses_image:
            return tokens
        if images is None:
            return None
        return torch.cat([tokens, self.image_encoder.patch_embed(self._normalise(images)).to(tokens.dtype)], dim=-1)

    @property
    def outlier_routes(self) -> tuple[str, ...]:
        """The routes with an outlier reference of their own (``outlier_reference``, and for a model
        trained with modality dropout ``outlier_reference_image``: an image-only token is not a fused
        one): none without ``config.outlier_reference_tokens``."""
        config = self.config
        if not config.outlier_reference_tokens:
            return ()
        return ("both", "image") if config.unimodal_inputs and config.uses_image else (config.default_route,)

    def _outlier_suffix(self, route: str) -> str:
        """The default route's outlier buffers are ``outlier_reference`` (and centre, scale); another
        route's carry its name (``outlier_reference_image``)."""
        return "" if route == self.config.default_route else f"_{route}"

    def outlier_reference_of(self, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reference, centre, scale) buffers of ``route`` (one of :attr:`outlier_routes`)."""
        if route not in self.outlier_routes:
            raise InputError(f"the model has no outlier reference for the {route} route "
                             f"(it has {', '.join(self.outlier_routes) or 'none'})")
        suffix = self._outlier_suffix(route)
        return (getattr(self, f"outlier_reference{suffix}"), getattr(self, f"outlier_centre{suffix}"),
                getattr(self, f"outlier_scale{suffix}"))

    def _outlier_score(self, images: torch.Tensor | None, tokens: torch.Tensor,
                       token_counts: torch.Tensor | None) -> torch.Tensor:
        """(B, 1) :func:`token_outlier_score` of each tile against the reference of the route it took;
        NaN without the image the reference needs."""
        features = self.outlier_features(images, tokens)
        if features is None:
            return torch.full((tokens.shape[0], 1), float("nan"), device=tokens.device)
        return token_outlier_score(features, *self.outlier_reference_of(self._input_route(token_counts)))[:, None]

    def _input_route(self, token_counts: torch.Tensor | None) -> str:
        """The route an input takes for the heads and references kept per route: the image alone
        when a model that reads transcripts is given none, else the model's default."""
        return "image" if token_counts is None and self.config.uses_transcripts else self.config.default_route

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.image_mean.dtype) / 255.0
        return (pixels - self.image_mean) / self.image_std

    def _expression_tokens(self, token_counts: torch.Tensor) -> torch.Tensor:
        """(B, tokens, E) one embedding per token; (B, 1, E) for tile-level variants (one embedding of
        the mean counts)."""
        if self.config.transcript_level == "tile":
            return self._encode_expression(token_counts.float().mean(dim=1))[:, None]
        return self._encode_expression(token_counts.float())

    def _encode_expression(self, counts: torch.Tensor) -> torch.Tensor:
        encoded = self.expression_encoder(torch.log1p(counts))
        if self.config.stage is not None:
            encoded = self.expression_projection(encoded)
        return encoded

    def _gate(self) -> torch.Tensor | float:
        return torch.tanh(self.fusion_gate_logit) if self.config.learnable_gate else 1.0

    def _early_fusion(self, images: torch.Tensor | None, token_counts: torch.Tensor | None) -> torch.Tensor:
        vit = self.image_encoder
        image_tokens = vit.patch_embed(self._normalise(images)) if images is not None else None
        expression_tokens = self._encode_expression(token_counts.float()) if token_counts is not None else None
        if self.config.fusion == "add":
            if expression_tokens is None:
                tokens = image_tokens
            elif image_tokens is None:
                tokens = self._gate() * expression_tokens
            else:
                tokens = image_tokens + self._gate() * match_token_norms(expression_tokens, image_tokens)
            tokens = vit._pos_embed(tokens)
        else:
            parts = []
            if image_tokens is not None:
                parts.append(vit._pos_embed(image_tokens))
            if expression_tokens is not None:
                with_position = vit._pos_embed(expression_tokens)
                if image_tokens is None:
                    parts.append(with_position[:, :1])  # class token
                expression_part = with_position[:, 1:]
                if self.config.modality_embedding:
                    expression_part = expression_part + self.modality_embedding
                parts.append(expression_part)
            tokens = torch.cat(parts, dim=1)
        tokens = vit.norm_pre(vit.patch_drop(tokens))
        for block in vit.blocks:
            tokens = block(tokens)
        return vit.norm(tokens)

    def _combine(self, image: torch.Tensor | None, expression: torch.Tensor | None) -> torch.Tensor:
        """Late fusion of normalised image and transcript features (either may be missing for a
        model trained with modality dropout): concatenated, or added through the gate."""
        if self.config.fusion == "concat":
            return torch.cat([image, expression], dim=-1)
        if expression is None:
            return image
        if image is None:
            return self._gate() * expression
        return image + self._gate() * expression

    def _check_inputs(self, images: torch.Tensor | None, token_counts: torch.Tensor | None) -> None:
        config = self.config
        needs_image = config.uses_image and not (config.unimodal_inputs and token_counts is not None)
        needs_tokens = config.uses_transcripts and not (config.unimodal_inputs and images is not None)
        if needs_image and images is None:
            raise InputError(
                f"Model variant {config.variant} needs the H&E image"
                + ("" if config.stage is None else " (it was not trained for transcript-only input)")
                + "."
            )
        if needs_tokens and token_counts is None:
            raise InputError(
                f"Model variant {config.variant} needs core-panel transcript counts"
                + ("" if config.stage is None else " (it was not trained for image-only input)")
                + "."
            )
        if images is not None and config.uses_image:
            size = config.img_size
            if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise InputError(
                    f"Images must be uint8 (batch, 3, {size}, {size}) channels-first; got "
                    f"{images.dtype} {tuple(images.shape)}."
                )
        if token_counts is not None and config.uses_transcripts:
            want = (self.n_tokens, config.n_core_genes)
            if token_counts.ndim != 3 or tuple(token_counts.shape[1:]) != want:
                raise InputError(
                    f"Transcript counts must be (batch, {want[0]} tokens row-major, {want[1]} core genes); "
                    f"got {tuple(token_counts.shape)}."
                )
        if images is not None and token_counts is not None and images.shape[0] != token_counts.shape[0]:
            raise InputError(f"Batch sizes differ: {images.shape[0]} images, {token_counts.shape[0]} token sets.")


OUTLIER_NEIGHBOURS = 10
"""A token's outlier distance is its mean distance to this many nearest reference tokens."""
OUTLIER_TOKEN_QUANTILE = 0.9
"""A tile's outlier score is this quantile of its tokens' distances: a tile is unusual when a tenth
of it is, whatever the rest holds."""


def token_outlier_score(tokens: torch.Tensor, reference: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor
                        ) -> torch.Tensor:
    """(B,) outlier score of each tile from its tokens' outlier features (B, tokens, E,
    ``FusionModel.outlier_features``): each token
    standardised (``(x - centre) / scale``), its mean distance to the OUTLIER_NEIGHBOURS nearest
    reference tokens, and the OUTLIER_TOKEN_QUANTILE quantile of those over the tile's tokens."""
    batch, n_tokens, width = tokens.shape
    flat = ((tokens.float().reshape(-1, width) - centre) / scale)
    k = min(OUTLIER_NEIGHBOURS, reference.shape[0])
    rows = max(1, (1 << 24) // reference.shape[0])  # distance blocks of at most 64 MB
    nearest = torch.cat([torch.cdist(part, reference.float()).topk(k, dim=1, largest=False).values.mean(dim=1)
                         for part in flat.split(rows)])
    return torch.quantile(nearest.reshape(batch, n_tokens), OUTLIER_TOKEN_QUANTILE, dim=1)


def match_token_norms(expression_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """Rescale each expression token to the L2 norm of the image token at its position.

    Keeps the transcript signal at the scale of the image signal it is added to; tokens with
    (almost) no expression stay zero instead of being blown up.
    """
    expression_norms = expression_tokens.float().norm(dim=-1, keepdim=True)
    image_norms = image_tokens.float().norm(dim=-1, keepdim=True)
    has_signal = expression_norms > EXPRESSION_NORM_EPSILON
    scale = torch.where(has_signal, image_norms / expression_norms.clamp(min=EXPRESSION_NORM_EPSILON), 0.0)
    return (expression_tokens.float() * scale).to(expression_tokens.dtype)
