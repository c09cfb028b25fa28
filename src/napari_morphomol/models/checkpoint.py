"""Checkpoints: safetensors weights with the JSON model card in the same file's metadata.

safetensors holds only tensors and strings, so opening a checkpoint can never run code. The
card is checked field by field, then against the names and shapes of the tensors in the file's
header, before it is used to build anything; a card only ever builds a local timm architecture
(no hub names, no pretrained weights), so loading a checkpoint never reaches the network.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from napari_morphomol import __version__
from napari_morphomol._atomic import replaced_atomically
from napari_morphomol.errors import InputError
from napari_morphomol.models.baseline import MinMAEBaseline
from napari_morphomol.models.config import IMAGE_MEAN, IMAGE_STD, MAX_PARAMETERS, ModelConfig, tile_spec_from_dict
from napari_morphomol.models.fusion import FusionModel
from napari_morphomol.models.trust import Calibration
from napari_morphomol.tiling.geometry import TileSpec

CARD_METADATA_KEY = "morphomol_model_card"
CARD_FORMAT = "napari-morphomol-model"
CARD_FORMAT_VERSION = 3
"""2: ``tile_geometry`` is a :class:`~napari_morphomol.tiling.TileSpec` (tile_px, stride_px,
tile_pixel_size_um, image_px, tokens_per_side). Cards of format 1 (mpp, img_size, patch_px) are
read as well. 3: an optional ``calibration`` (:class:`~napari_morphomol.models.trust.Calibration`);
the outlier reference it thresholds is part of the weights (``outlier_*`` buffers)."""
#: What to do about a card that does not fit its file or is not a card.
REEXPORT_ADVICE = (
    "the file was edited or written by another tool; retrain, or re-export it with napari-morphomol "
    "(convert_reference_checkpoint for the paper's reference code)"
)


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, feed and judge a model; stored as JSON with its weights.

    ``training`` holds the data summary, metrics and the settings of the run (free-form JSON);
    ``provenance`` where the weights came from.
    """

    model: ModelConfig
    core_genes: tuple[str, ...]
    addon_genes: tuple[str, ...]
    tile_geometry: TileSpec = TileSpec()
    """How the model's tiles and tokens were cut."""
    training: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    """Conformal quantiles and the outlier reference (None: the model gives no intervals or flags)."""

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
        spec, model = self.tile_geometry, self.model
        if spec.image_px != model.img_size or spec.tokens_per_side != model.img_size // model.patch_px:
            raise InputError(
                f"Tile geometry ({spec.image_px} px, {spec.tokens_per_side} x {spec.tokens_per_side} tokens) "
                f"differs from the model's ({model.img_size} px, {model.img_size // model.patch_px} x "
                f"{model.img_size // model.patch_px} patches of {model.patch_px} px)."
            )

    def to_json(self) -> str:
        calibration = {} if self.calibration is None else {"calibration": self.calibration.to_card()}
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
                **calibration,
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"The model card is not valid JSON ({error}); {REEXPORT_ADVICE}.") from error
        if not isinstance(values, dict) or values.get("format") != CARD_FORMAT:
            raise InputError(
                f"This is not a napari-morphomol model card (format is not {CARD_FORMAT!r}); {REEXPORT_ADVICE}."
            )
        version = values.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InputError(
                f"Model card format version {version!r} is not valid (a positive integer); {REEXPORT_ADVICE}."
            )
        if version > CARD_FORMAT_VERSION:
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
        card = cls(
            model=ModelConfig.from_dict(values.get("model")),
            tile_geometry=tile_spec_from_dict(values.get("tile_geometry", {})),
            training=values.get("training", {}),
            provenance=values.get("provenance", {}),
            **genes,
        )
        if "calibration" not in values:
            return card
        return dataclasses.replace(card, calibration=Calibration.from_card(values["calibration"],
                                                                           card.model.n_addon_genes))


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
    if not config.variant_spec.neural:
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
    card = dataclasses.replace(card, provenance=provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as temporary:
        save_file(tensors, str(temporary), metadata={CARD_METADATA_KEY: card.to_json()})
    return path


def read_model_card(path: str | Path) -> ModelCard:
    """The card, checked against the tensor names and shapes in the file; reads no weights.

    Parameters
    ----------
    path
        A napari-morphomol ``.safetensors`` checkpoint.

    Returns
    -------
    ModelCard
        The card, once it is known to describe exactly the tensors the file holds.
    """
    return _checked_card(Path(path))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Model (in eval mode) and card from a napari-morphomol .safetensors checkpoint.

    Nothing is built before the card is known to describe the file's tensors and a model
    within the limits of ``napari_morphomol.models.config``; weights that are not finite, or a
    baseline copying a gene outside the core panel, are refused.
    """
    path = Path(path)
    card = _checked_card(path)
    with _opened(path, str(device)) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    _check_weights(path.name, card, tensors)
    model = build_model(card.model)
    model.to(device)
    model.load_state_dict(tensors, strict=True)
    return model.eval(), card


def described_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of the model ``config`` describes, allocating nothing.

    The module is built on PyTorch's meta device (shapes, no memory, no initial values), so
    even a card describing a huge model costs only the time to list its layers.

    Parameters
    ----------
    config
        The architecture.

    Returns
    -------
    dict
        State-dict key -> shape, in the module's order.

    Raises
    ------
    InputError
        When the model would have more than ``MAX_PARAMETERS`` parameters.
    """
    with torch.device("meta"):
        model = build_model(config)
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    if n_parameters > MAX_PARAMETERS:
        raise InputError(
            f"The model described (variant {config.variant}, backbone {config.backbone} {config.backbone_kwargs}) "
            f"would have {n_parameters:,} parameters, above the limit of {MAX_PARAMETERS:,} that napari-morphomol "
            "builds (ViT-L/16 has 0.3 billion); describe a smaller model."
        )
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _checked_card(path: Path) -> ModelCard:
    """The card of a checkpoint file, once it describes exactly the tensors in the file's header."""
    if not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist.")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise InputError(
            f"{path.name} is a PyTorch/Lightning file, not a napari-morphomol checkpoint. If it was trained "
            "with the paper's reference code, convert it with "
            "napari_morphomol.models.convert_reference_checkpoint (see docs/models.md)."
        )
    with _opened(path) as handle:
        metadata = handle.metadata() or {}
        if CARD_METADATA_KEY not in metadata:
            raise InputError(
                f"{path.name} is a safetensors file without a napari-morphomol model card; it holds bare "
                "weights. Reference-layout weights can be converted with convert_reference_checkpoint."
            )
        found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    try:
        card = ModelCard.from_json(metadata[CARD_METADATA_KEY])
        expected = described_tensor_shapes(card.model)
    except InputError as error:
        raise InputError(f"Checkpoint {path.name}: {error}") from error
    disagreement = _first_disagreement(expected, found)
    if disagreement is not None:
        entry, card_says, tensors_say = disagreement
        model = card.model
        raise InputError(
            f"Checkpoint {path.name} does not match the architecture its card describes (variant {model.variant}, "
            f"backbone {model.backbone} {model.backbone_kwargs}, {model.n_core_genes} core and {model.n_addon_genes} "
            f"add-on genes): {entry}: the card says {card_says}, the tensors say {tensors_say}. So {REEXPORT_ADVICE}."
        )
    return card


@contextmanager
def _opened(path: Path, device: str = "cpu") -> Iterator[Any]:
    """safe_open, with unreadable files as one InputError."""
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise InputError(
            f"Checkpoint {path.name} is not a readable safetensors file ({error}); it may be truncated or "
            "corrupted. Copy it again or re-export it."
        ) from error


def _first_disagreement(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> tuple[str, str, str] | None:
    """(entry, what the card says, what the tensors say) of the first difference, or None."""
    card_view, file_view = _architecture_entries(expected), _architecture_entries(found)
    for entry, card_says in card_view.items():
        if card_says != file_view[entry]:
            return entry, _in_words(card_says), _in_words(file_view[entry])
    for name in [*expected, *sorted(set(found) - set(expected))]:
        if expected.get(name) != found.get(name):
            card_says, tensors_say = (
                f"shape {shapes[name]}" if name in shapes else "absent" for shapes in (expected, found)
            )
            return f"tensor {name}", card_says, tensors_say
    return None


def _architecture_entries(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """What a state dict's names and shapes tell of the architecture, in the card's terms.

    Attention heads do not show in the shapes of a timm ViT (qkv is 3 x embed_dim wide for
    any number of heads), so a card's num_heads can only be checked for being a divisor.
    """

    def shape(name: str, dimensions: slice | int):
        return shapes[name][dimensions] if name in shapes else None

    blocks = {key.split(".")[2] for key in shapes if key.startswith("image_encoder.blocks.")}
    expression = sorted(
        (int(key.split(".")[1]), value)
        for key, value in shapes.items()
        if key.startswith("expression_encoder.") and key.endswith(".weight")
    )
    return {
        "image encoder (variant)": any(key.startswith("image_encoder.") for key in shapes),
        "expression encoder (variant)": bool(expression),
        "late-fusion norms (variant)": "image_norm.weight" in shapes,
        "learnable gate": "fusion_gate_logit" in shapes,
        "modality embedding": "modality_embedding" in shapes,
        "embed_dim": shape("image_encoder.cls_token", -1),
        "depth": len(blocks),
        "patch size": shape("image_encoder.patch_embed.proj.weight", slice(2, None)),
        "position embeddings ((img_size / patch_px) squared + class token)": shape("image_encoder.pos_embed", 1),
        "MLP width (mlp_ratio x embed_dim)": shape("image_encoder.blocks.0.mlp.fc1.weight", 0),
        "core genes": expression[0][1][1] if expression else None,
        "expression layers": len(expression),
        "expression_hidden_dim": expression[0][1][0] if expression else None,
        "expression_dim": expression[-1][1][0] if expression else None,
        "add-on genes": shape("head.weight", 0) or shape("source_gene_index", 0),
    }


def _in_words(value: Any) -> str:
    """A part as present/absent, a size as itself."""
    if value is None or value is False:
        return "absent"
    return "present" if value is True else str(value)


def _check_weights(name: str, card: ModelCard, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights a model cannot predict with: NaN/inf, or a baseline gene index out of the panel."""
    non_finite = [
        key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if non_finite:
        raise InputError(
            f"Checkpoint {name} holds non-finite weights ({len(non_finite)} tensors, e.g. {non_finite[0]}); the "
            "training diverged or the file is damaged; retrain or use another checkpoint."
        )
    if card.model.variant == "min_mae":
        index = tensors["source_gene_index"]
        outside = index[(index < 0) | (index >= card.model.n_core_genes)]
        if outside.numel():
            raise InputError(
                f"Checkpoint {name}: the Min-MAE baseline copies core gene index {int(outside[0])} but the card has "
                f"{card.model.n_core_genes} core genes; {REEXPORT_ADVICE}."
            )


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


def check_tile_geometry(card: ModelCard, spec: TileSpec) -> None:
    """Raise InputError when tiles cut by ``spec`` would show the model another scale than in training.

    The stride only sets how much tiles overlap, so it may differ.

    Parameters
    ----------
    card
        The model's card (its ``tile_geometry``).
    spec
        How the tiles are cut (a :class:`~napari_morphomol.tiling.TileSpec` or a ``TileGeometry``).

    Raises
    ------
    InputError
        Naming each differing field, the model's value, and how to cut tiles for it.
    """
    trained = card.tile_geometry
    differences = [
        f"{name} {getattr(spec, name)} (model trained with {getattr(trained, name)})"
        for name in ("tile_px", "tile_pixel_size_um", "image_px", "tokens_per_side")
        if getattr(spec, name) != getattr(trained, name)
    ]
    if differences:
        raise InputError(
            "The tile geometry differs from the model's training: "
            + "; ".join(differences)
            + f". Cut tiles of {trained.tile_px} px at {trained.tile_pixel_size_um} um/px resized to "
            f"{trained.image_px} px ({trained.tokens_per_side} x {trained.tokens_per_side} tokens), so each "
            "token covers the tissue area the model learned from."
        )
