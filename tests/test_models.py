"""Model family: shapes, gradients, routes, checkpoints (incl. hostile files), reference layout."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from napari_morphomol.errors import InputError
from napari_morphomol.models import (
    VARIANT_TABLE,
    VARIANTS,
    ModelCard,
    ModelConfig,
    build_model,
    check_tile_geometry,
    convert_reference_checkpoint,
    load_checkpoint,
    load_reference_checkpoint,
    match_gene_panel,
    read_model_card,
    save_checkpoint,
)
from napari_morphomol.models.checkpoint import CARD_METADATA_KEY
from napari_morphomol.models.fusion import match_token_norms
from napari_morphomol.tiling import TileSpec

TINY_VIT = dict(depth=2, embed_dim=48, num_heads=3)
N_CORE, N_ADDON = 7, 5
NEURAL_VARIANTS = [v for v in VARIANTS if v != "min_mae"]
CORE_GENES = tuple(f"CORE{i}" for i in range(N_CORE))
ADDON_GENES = tuple(f"ADD{i}" for i in range(N_ADDON))


def tiny_config(variant: str, **overrides) -> ModelConfig:
    return ModelConfig(
        n_core_genes=N_CORE, n_addon_genes=N_ADDON, variant=variant, backbone_kwargs=TINY_VIT, **overrides
    )


def tile_batch(batch_size: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, generator=generator)
    counts = torch.poisson(torch.full((batch_size, 196, N_CORE), 0.7), generator=generator)
    return images, counts


def test_default_model_is_the_papers_vit_s16_early_fusion():
    config = ModelConfig(n_core_genes=380, n_addon_genes=100)
    model = build_model(config)
    assert config.variant == "early_fusion_add" and config.backbone == "vit_small_patch16_224"
    assert model.image_encoder.embed_dim == 384 and len(model.image_encoder.blocks) == 12
    assert [tuple(layer.weight.shape) for layer in model.expression_encoder if isinstance(layer, nn.Linear)] == [
        (32, 380),
        (32, 32),
        (32, 32),
    ]
    assert tuple(model.expression_projection.weight.shape) == (384, 32)
    assert tuple(model.head.weight.shape) == (100, 384)


EMBEDDING_DIMS = {
    "late_fusion_concat_token": 96, "late_fusion_concat_tile": 96, "expr_only_token": 32, "expr_only_tile": 32
}


@pytest.mark.parametrize("variant", NEURAL_VARIANTS)
def test_every_variant_predicts_addon_genes_and_embeds_and_backpropagates(variant):
    torch.manual_seed(0)
    model = build_model(tiny_config(variant))
    images, counts = tile_batch()
    output = model(images, counts)
    assert output.predictions.shape == (3, N_ADDON)
    assert output.embeddings.shape == (3, EMBEDDING_DIMS.get(variant, 48))
    output.predictions.pow(2).mean().backward()
    without_gradient = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_gradient == []
    if model.config.uses_transcripts:
        assert model.expression_encoder[0].weight.grad.abs().sum() > 0
    if model.config.uses_image:
        assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


TOKEN_VARIANTS = [v for v in NEURAL_VARIANTS if VARIANT_TABLE[v].has_token_sequence]


def test_variant_table_names_each_route():
    assert VARIANTS == tuple(VARIANT_TABLE)
    assert set(TOKEN_VARIANTS) == {"early_fusion_add", "early_fusion_concat", "late_fusion_add_token",
                                   "late_fusion_concat_token", "morph_only", "expr_only_token"}
    late_tile = tiny_config("late_fusion_concat_tile")
    assert (late_tile.stage, late_tile.fusion, late_tile.transcript_level) == ("late", "concat", "tile")
    morph = tiny_config("morph_only")
    assert morph.uses_image and not morph.uses_transcripts and morph.transcript_level is None
    assert not VARIANT_TABLE["min_mae"].neural and VARIANT_TABLE["min_mae"].uses_transcripts


@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
def test_token_heads_read_one_feature_per_token_beside_the_tile_outputs(variant):
    torch.manual_seed(0)
    plain = build_model(tiny_config(variant)).eval()
    model = build_model(tiny_config(variant, token_heads={"addon_tokens": N_ADDON, "density": 1})).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # same trunk and tile head
    images, counts = tile_batch()
    with torch.no_grad():
        output, reference = model(images, counts), plain(images, counts)
        tokens = model.forward_tokens(model.forward_features(images, counts))
    assert torch.equal(output.predictions, reference.predictions) and dict(reference.token_outputs) == {}
    assert tokens.shape == (3, 196, model.token_dim) and model.token_dim == model.embedding_dim
    assert output.token_outputs["addon_tokens"].shape == (3, 196, N_ADDON)
    assert torch.allclose(output.token_outputs["density"], model.token_heads["density"](tokens))
    assert [(spec.name, spec.level, spec.width) for spec in model.output_specs()] == [
        ("predictions", "tile", N_ADDON), ("embeddings", "tile", model.embedding_dim),
        ("addon_tokens", "token", N_ADDON), ("density", "token", 1)]
    head_ids = {id(p) for p in model.head_parameters()}
    assert {id(p) for p in model.token_heads.parameters()} <= head_ids
    assert not head_ids & {id(p) for p in model.backbone_parameters()}


def test_token_features_follow_the_token_raster():
    """Token i of the features sees the counts of raster token i (expr-only: nothing else)."""
    torch.manual_seed(0)
    model = build_model(tiny_config("expr_only_token")).eval()
    _, counts = tile_batch(batch_size=1)
    changed = counts.clone()
    changed[0, 37] += 50
    with torch.no_grad():
        before = model.forward_tokens(model.forward_features(None, counts))
        after = model.forward_tokens(model.forward_features(None, changed))
    moved = (before - after).abs().sum(dim=-1)[0]
    assert moved[37] > 0 and torch.count_nonzero(moved) == 1


def test_token_heads_are_refused_where_there_are_no_tokens_or_no_targets(tmp_path):
    with pytest.raises(InputError, match="no per-token features"):
        tiny_config("late_fusion_add_tile", token_heads={"addon_tokens": N_ADDON})
    for name in ("predictions", "tiles", "Bad-Name"):
        with pytest.raises(InputError, match="not allowed"):
            tiny_config("early_fusion_add", token_heads={name: 2})
    with pytest.raises(InputError, match="width must be a positive integer"):
        tiny_config("early_fusion_add", token_heads={"addon_tokens": 0})
    with pytest.raises(InputError, match="its width must be n_addon_genes"):
        tiny_config("early_fusion_add", token_heads={"addon_tokens": N_ADDON + 1})
    from napari_morphomol.models import train_model

    with pytest.raises(InputError, match="token heads without targets \\(density\\)"):
        train_model(tiny_config("early_fusion_add", token_heads={"addon_tokens": N_ADDON, "density": 1}), None, None,
                    core_genes=CORE_GENES, addon_genes=ADDON_GENES, checkpoint_path=tmp_path / "m.safetensors")


def test_a_token_head_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("early_fusion_add", token_heads={"addon_tokens": N_ADDON})
    model = build_model(config).eval()
    path = save_checkpoint(model, ModelCard(config, CORE_GENES, ADDON_GENES), tmp_path / "tokens.safetensors")
    loaded, card = load_checkpoint(path)
    assert card.model.token_heads == {"addon_tokens": N_ADDON}
    images, counts = tile_batch()
    with torch.no_grad():
        assert torch.equal(loaded(images, counts).token_outputs["addon_tokens"],
                           model(images, counts).token_outputs["addon_tokens"])


@pytest.mark.parametrize("variant", ["early_fusion_add", "early_fusion_concat", "late_fusion_add_tile"])
def test_transcripts_change_fusion_predictions(variant):
    torch.manual_seed(0)
    model = build_model(tiny_config(variant)).eval()
    images, counts = tile_batch()
    assert not torch.allclose(model(images, counts).predictions, model(images, counts * 3).predictions)


def test_single_modality_inputs_only_when_trained_for_it():
    images, counts = tile_batch()
    fused_only = build_model(tiny_config("early_fusion_add")).eval()
    with pytest.raises(InputError, match="not trained for image-only"):
        fused_only(images, None)
    with pytest.raises(InputError, match="not trained for transcript-only"):
        fused_only(None, counts)
    for variant in ("early_fusion_add", "early_fusion_concat", "late_fusion_add_token"):
        model = build_model(tiny_config(variant, unimodal_inputs=True)).eval()
        assert model(images, None).predictions.shape == (3, N_ADDON)
        assert model(None, counts).predictions.shape == (3, N_ADDON)
    with pytest.raises(InputError, match="Late concat"):
        tiny_config("late_fusion_concat_tile", unimodal_inputs=True)


def test_image_only_input_of_early_add_equals_the_plain_vit():
    torch.manual_seed(0)
    model = build_model(tiny_config("early_fusion_add", unimodal_inputs=True)).eval()
    images, _ = tile_batch()
    normalised = (images.float() / 255 - 0.5) / 0.5
    expected = model.head(model.image_encoder.forward_features(normalised)[:, 0])
    torch.testing.assert_close(model(images, None).predictions, expected)


def test_wrong_input_layouts_are_explained():
    model = build_model(tiny_config("early_fusion_add"))
    images, counts = tile_batch()
    with pytest.raises(InputError, match="channels-first"):
        model(images.permute(0, 2, 3, 1).contiguous(), counts)
    with pytest.raises(InputError, match="uint8"):
        model(images.float(), counts)
    with pytest.raises(InputError, match="7 core genes"):
        model(images, counts[..., :5])
    with pytest.raises(InputError, match="196 tokens"):
        model(images, counts.reshape(3, 14, 14, N_CORE))


def test_norm_matching_gives_image_token_norms_and_keeps_empty_tokens_zero():
    image_tokens = torch.randn(2, 4, 8)
    expression_tokens = torch.randn(2, 4, 8)
    expression_tokens[0, 1] = 0
    scaled = match_token_norms(expression_tokens, image_tokens)
    norms = scaled.norm(dim=-1)
    assert norms[0, 1] == 0
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False
    torch.testing.assert_close(norms[mask], image_tokens.norm(dim=-1)[mask])


# ---- checkpoints -------------------------------------------------------------------------------


def tiny_card(config: ModelConfig, **fields) -> ModelCard:
    return ModelCard(config, CORE_GENES, ADDON_GENES, **fields)


@pytest.mark.parametrize("variant", ["early_fusion_add", "late_fusion_concat_token", "expr_only_tile", "min_mae"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, variant):
    torch.manual_seed(0)
    config = tiny_config(variant)
    model = build_model(config).eval()
    if variant == "min_mae":
        model.source_gene_index.copy_(torch.tensor([3, 0, 6, 6, 1]))
    card = tiny_card(config, training={"data": {"samples": ["a", "b"]}, "validation_metrics": {"pearson": 0.4}})
    path = save_checkpoint(model, card, tmp_path / "model.safetensors")
    loaded, loaded_card = load_checkpoint(path)
    images, counts = tile_batch()
    torch.testing.assert_close(loaded(images, counts).predictions, model(images, counts).predictions, rtol=0, atol=0)
    assert loaded_card.model == config and loaded_card.core_genes == CORE_GENES
    assert loaded_card.training["validation_metrics"] == {"pearson": 0.4}
    assert "saved_at" in loaded_card.provenance
    assert read_model_card(path).addon_genes == ADDON_GENES
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_card_json_holds_geometry_normalisation_and_ordered_panels(tmp_path):
    config = tiny_config("expr_only_token")
    path = save_checkpoint(build_model(config), tiny_card(config), tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        card = json.loads(handle.metadata()[CARD_METADATA_KEY])
    assert card["format_version"] == 3 and card["model"]["variant"] == "expr_only_token"
    assert card["tile_geometry"] == {"tile_px": 512, "stride_px": 256, "tile_pixel_size_um": 0.5, "image_px": 224,
                                     "tokens_per_side": 14}
    assert card["normalisation"]["image"]["mean"] == [0.5, 0.5, 0.5]
    assert card["core_genes"] == list(CORE_GENES) and card["addon_genes"] == list(ADDON_GENES)


def test_a_format_1_card_reads_its_tile_geometry_as_a_tile_spec():
    card = json.loads(tiny_card(tiny_config("expr_only_token")).to_json())
    card["format_version"] = 1
    card["tile_geometry"] = {"tile_px": 448, "stride_px": 224, "mpp": 0.25, "img_size": 224, "patch_px": 16}
    read = ModelCard.from_json(json.dumps(card))
    assert read.tile_geometry == TileSpec(tile_px=448, stride_px=224, tile_pixel_size_um=0.25, image_px=224,
                                          tokens_per_side=14)
    card["tile_geometry"]["patch_px"] = "16"
    with pytest.raises(InputError, match="patch_px"):
        ModelCard.from_json(json.dumps(card))


def saved_tiny_checkpoint(tmp_path):
    config = tiny_config("expr_only_tile")
    return save_checkpoint(build_model(config), tiny_card(config), tmp_path / "m.safetensors")


@pytest.mark.parametrize("keep_bytes", [4, 60, -200])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, keep_bytes):
    path = saved_tiny_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(InputError, match="truncated|not valid JSON|not a readable"):
        load_checkpoint(path)


def write_card(path, card_values: dict, tensors=None) -> None:
    tensors = tensors or {"head.weight": torch.zeros(1)}
    save_file(tensors, str(path), metadata={CARD_METADATA_KEY: json.dumps(card_values)})


def valid_card_values(tmp_path) -> dict:
    from safetensors import safe_open

    with safe_open(str(saved_tiny_checkpoint(tmp_path)), "pt") as handle:
        return json.loads(handle.metadata()[CARD_METADATA_KEY])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"].update(n_core_genes="7"), "n_core_genes must be int"),
        (lambda c: c["model"].update(n_core_genes=True), "got a boolean"),
        (lambda c: c["model"].update(variant="exec"), "Unknown model variant"),
        (lambda c: c["model"].update(backbone_kwargs={"depth": [2]}), "backbone_kwargs"),
        (lambda c: c["model"].update(__class__="os.system"), "unknown keys"),
        (lambda c: c.update(core_genes="CORE0"), "list of gene names"),
        (lambda c: c.update(core_genes=[1, 2]), "list of gene names"),
        (lambda c: c.update(addon_genes=list(CORE_GENES[:5])), "disjoint"),
        (lambda c: c.update(format_version=99), "not supported"),
        (lambda c: c.update(format="pickle"), "not a napari-morphomol model card"),
        (lambda c: c["tile_geometry"].update(tile_pixel_size_um="0.5"), "tile_pixel_size_um must be float"),
        (lambda c: c.update(training=[1]), "'training' must be a JSON object"),
        (lambda c: c.update(core_genes=list(CORE_GENES[:3])), "7 core genes but the card lists 3"),
    ],
)
def test_card_with_wrong_types_is_refused(tmp_path, edit, message):
    values = valid_card_values(tmp_path)
    edit(values)
    path = tmp_path / "bad.safetensors"
    write_card(path, values)
    with pytest.raises(InputError, match=message):
        load_checkpoint(path)


def test_tensors_that_do_not_fit_the_card_are_refused(tmp_path):
    values = valid_card_values(tmp_path)
    path = tmp_path / "bad.safetensors"
    write_card(path, values, {"head.weight": torch.zeros(5, 32), "surprise": torch.zeros(2)})
    with pytest.raises(InputError, match="does not match the architecture"):
        load_checkpoint(path)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(InputError, match="without a napari-morphomol model card"):
        load_checkpoint(bare)
    lightning_file = tmp_path / "x.ckpt"
    lightning_file.write_bytes(b"x")
    with pytest.raises(InputError, match="not a napari-morphomol checkpoint"):
        load_checkpoint(lightning_file)


class ReducePayload:
    """Pickles as a call to os.mkdir: proof of execution if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch_save", "plain_pickle"])
def test_hostile_pickle_in_a_ckpt_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "payload_ran"
    hostile = {"state_dict": {"head.head.0.weight": torch.zeros(5, 48)}, "callbacks": ReducePayload(marker)}
    path = tmp_path / "model.ckpt"
    if writer == "torch_save":
        torch.save(hostile, path)
    else:
        path.write_bytes(pickle.dumps(hostile))
    assert not marker.exists()
    with pytest.raises(InputError, match="not opened.*\n.*Convert it where the file is trusted"):
        load_reference_checkpoint(path, variant="morph_only", core_genes=CORE_GENES, addon_genes=ADDON_GENES)
    assert not marker.exists()


def test_corrupted_reference_files_are_clear_errors(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"head.head.0.weight": torch.zeros(5, 48)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated"):
        load_reference_checkpoint(path, variant="morph_only", core_genes=CORE_GENES, addon_genes=ADDON_GENES)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InputError):
        load_reference_checkpoint(
            path.rename(tmp_path / "m.safetensors"), variant="morph_only",
            core_genes=CORE_GENES, addon_genes=ADDON_GENES,
        )


# ---- panels and geometry -------------------------------------------------------------------------


def test_missing_core_genes_are_listed_and_extra_genes_reported():
    card = tiny_card(tiny_config("expr_only_tile"))
    sample = ["EXTRA1", *reversed(CORE_GENES), "ADD2", "EXTRA2"]
    match = match_gene_panel(card, sample)
    assert [sample[i] for i in match.core_index] == list(CORE_GENES)
    assert match.addon_measured == ("ADD2",) and match.extra_genes == ("EXTRA1", "EXTRA2")
    assert "EXTRA1, EXTRA2" in match.report()
    with pytest.raises(InputError, match="lacks 2 of the model's 7 core genes: CORE1, CORE4"):
        match_gene_panel(card, [g for g in CORE_GENES if g not in ("CORE1", "CORE4")])


def test_morph_only_model_needs_no_core_genes():
    match = match_gene_panel(tiny_card(tiny_config("morph_only")), ["ADD0", "OTHER"])
    assert match.core_index.size == 0 and match.addon_measured == ("ADD0",) and match.extra_genes == ("OTHER",)


def test_geometry_mismatch_is_explained():
    card = tiny_card(tiny_config("expr_only_tile"))
    check_tile_geometry(card, TileSpec(stride_px=512))  # the stride may differ
    with pytest.raises(InputError, match=r"tile_pixel_size_um 0.25 \(model trained with 0.5\).*512 px at 0.5 um/px"):
        check_tile_geometry(card, TileSpec(tile_pixel_size_um=0.25))
    with pytest.raises(InputError, match=r"tokens_per_side 16 \(model trained with 14\)"):
        check_tile_geometry(card, TileSpec(tokens_per_side=16))


# ---- reference layout ----------------------------------------------------------------------------


class ReferenceHead(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        return self.head(x)


class ReferenceBackbone(nn.Module):
    """The reference's parameter layout, with its forward written out independently here."""

    def __init__(self, vit, n_core, stage, fusion, level):
        super().__init__()
        self.stage, self.fusion, self.level = stage, fusion, level
        d = 48
        if vit is not None:
            self.morph_encoder = vit
        if n_core:
            self.expr_encoder = ReferenceHead(
                [
                    nn.Linear(n_core, 32), nn.ReLU(), nn.Dropout(0.1),
                    nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.1),
                    nn.Linear(32, 32),
                ]
            )
        if vit is not None and n_core:
            self.expr_to_morph_proj = nn.Linear(32, d)
        self.fusion_alpha = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.modality_token = nn.Parameter(torch.zeros(1, d))
        self.ln_morph = nn.LayerNorm(d)
        self.ln_expr = nn.LayerNorm(d)

    def expression(self, counts):
        tokens = counts.mean(dim=1) if self.level == "tile" else counts
        encoded = self.expr_encoder(torch.log1p(tokens))
        return self.expr_to_morph_proj(encoded) if hasattr(self, "expr_to_morph_proj") else encoded

    def forward(self, image, counts):
        vit = getattr(self, "morph_encoder", None)
        if vit is None:
            encoded = self.expression(counts)
            return encoded.mean(dim=1) if self.level == "token" else encoded
        if not hasattr(self, "expr_encoder"):
            return vit(image)[:, 0]
        expr = self.expression(counts)
        if self.stage == "late":
            morph = self.ln_morph(vit(image)[:, 0])
            expr = self.ln_expr(expr.mean(dim=1) if self.level == "token" else expr)
            return morph + expr if self.fusion == "add" else torch.cat([morph, expr], dim=1)
        morph_tokens = vit.patch_embed(image)
        if self.fusion == "add":
            morph_norms = morph_tokens.norm(dim=-1, keepdim=True)
            expr_norms = expr.norm(dim=-1, keepdim=True).clamp(min=1e-5)
            mask = expr_norms.squeeze(-1) > 1e-5
            scaled = torch.zeros_like(expr)
            scaled[mask] = expr[mask] * (morph_norms[mask] / expr_norms[mask])
            x = vit._pos_embed(morph_tokens + scaled)
        else:
            x = torch.cat([vit._pos_embed(morph_tokens), vit._pos_embed(expr)[:, 1:] + self.modality_token], dim=1)
        x = vit.norm_pre(x)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)[:, 0]


class ReferenceModel(nn.Module):
    def __init__(self, variant):
        super().__init__()
        import timm

        config = tiny_config(variant)
        vit = (
            timm.create_model(config.backbone, num_classes=0, global_pool="", **TINY_VIT) if config.uses_image else None
        )
        n_core = N_CORE if config.uses_transcripts else 0
        self.backbone = ReferenceBackbone(vit, n_core, config.stage, config.fusion, config.transcript_level)
        width = {"late_fusion_concat_token": 96, "late_fusion_concat_tile": 96}.get(variant, 32 if vit is None else 48)
        self.head = ReferenceHead([nn.Linear(width, N_ADDON)])

    def forward(self, image, counts):
        return self.head(self.backbone(image, counts))


@pytest.mark.parametrize(
    "variant",
    [
        "early_fusion_add", "early_fusion_concat", "late_fusion_add_token", "late_fusion_concat_tile",
        "morph_only", "expr_only_token", "expr_only_tile",
    ],
)
def test_reference_layout_checkpoint_gives_identical_outputs(tmp_path, variant):
    torch.manual_seed(1)
    reference = ReferenceModel(variant).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name not in ("backbone.fusion_alpha",) and not (
                variant != "early_fusion_concat" and name == "backbone.modality_token"
            ):
                parameter.add_(0.05 * torch.randn_like(parameter))
    lightning_like = {
        "epoch": 7,
        "global_step": 70,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": reference.state_dict(),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 7}}}},
    }
    path = tmp_path / "reference.ckpt"
    torch.save(lightning_like, path)
    model, card, conversion = load_reference_checkpoint(
        path, variant=variant, core_genes=CORE_GENES, addon_genes=ADDON_GENES, backbone_kwargs=TINY_VIT
    )
    images, counts = tile_batch()
    normalised = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = reference(normalised, counts)
        torch.testing.assert_close(model(images, counts).predictions, expected, rtol=1e-5, atol=1e-5)
    assert "backbone.fusion_alpha" in conversion.unused_keys
    assert card.model.modality_embedding == (variant == "early_fusion_concat")
    converted = convert_reference_checkpoint(
        path, tmp_path / "converted.safetensors", variant=variant, core_genes=CORE_GENES, addon_genes=ADDON_GENES,
        backbone_kwargs=TINY_VIT,
    )
    reloaded, _ = load_checkpoint(tmp_path / "converted.safetensors")
    assert converted.provenance["converted_from"] == "reference.ckpt"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images, counts).predictions, expected, rtol=1e-5, atol=1e-5)


def test_reference_checkpoint_of_another_variant_or_backbone_is_explained(tmp_path):
    path = tmp_path / "reference.ckpt"
    torch.save({"state_dict": ReferenceModel("early_fusion_add").state_dict()}, path)
    with pytest.raises(InputError, match="does not fit this checkpoint"):
        load_reference_checkpoint(
            path, variant="morph_only", core_genes=CORE_GENES, addon_genes=ADDON_GENES, backbone_kwargs=TINY_VIT
        )
    with pytest.raises(InputError, match="ViT has 2 blocks of width 48"):
        load_reference_checkpoint(path, variant="early_fusion_add", core_genes=CORE_GENES, addon_genes=ADDON_GENES)
    learned_gate = ReferenceModel("early_fusion_add").state_dict()
    learned_gate["backbone.fusion_alpha"] = torch.tensor([0.3])
    torch.save({"state_dict": learned_gate}, path)
    with pytest.raises(InputError, match="learnable_gate=True"):
        load_reference_checkpoint(
            path, variant="early_fusion_add", core_genes=CORE_GENES, addon_genes=ADDON_GENES, backbone_kwargs=TINY_VIT,
            learnable_gate=False,
        )
    model, card, _ = load_reference_checkpoint(
        path, variant="early_fusion_add", core_genes=CORE_GENES, addon_genes=ADDON_GENES, backbone_kwargs=TINY_VIT
    )
    assert card.model.learnable_gate and float(model.fusion_gate_logit) == pytest.approx(0.3)


# ---- backbone weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_starts_from_a_local_weights_file(tmp_path, suffix):
    import timm

    torch.manual_seed(3)
    pretrained = timm.create_model("vit_small_patch16_224", num_classes=0, global_pool="", **TINY_VIT)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(path))
    else:
        torch.save(pretrained.state_dict(), path)
    model = build_model(tiny_config("early_fusion_add"), backbone_weights=path)
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(model.image_encoder.state_dict()[name], tensor), name


def test_hostile_or_missing_backbone_weights_are_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "vit.pth"
    torch.save({"pos_embed": ReducePayload(marker)}, path)
    with pytest.raises(InputError, match="(?s)blocked loading.*re-save its state dict as .safetensors"):
        build_model(tiny_config("morph_only"), backbone_weights=path)
    assert not marker.exists()
    with pytest.raises(InputError, match="does not exist"):
        build_model(tiny_config("morph_only"), backbone_weights=tmp_path / "nope.safetensors")
