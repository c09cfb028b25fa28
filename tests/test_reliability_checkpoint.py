"""Loading a checkpoint never fetches anything and never builds what its tensors do not describe.

Each checkpoint here is a tiny model saved by napari-morphomol whose card (the JSON in the
safetensors metadata) or weights were then tampered with, as an edited or foreign file would be.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

from napari_morphomol.errors import InputError
from napari_morphomol.models import (
    ModelCard,
    ModelConfig,
    build_model,
    load_checkpoint,
    read_model_card,
    save_checkpoint,
)
from napari_morphomol.models.checkpoint import CARD_METADATA_KEY, described_tensor_shapes

TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 3}
CORE_GENES = tuple(f"CORE{i}" for i in range(7))
ADDON_GENES = tuple(f"ADD{i}" for i in range(5))


def saved_checkpoint(tmp_path, variant="early_fusion_add", backbone="vit_small_patch16_224", **weights):
    """A saved tiny model; ``weights`` overwrite named tensors before saving."""
    torch.manual_seed(0)
    config = ModelConfig(
        len(CORE_GENES), len(ADDON_GENES), variant=variant, backbone=backbone, backbone_kwargs=TINY_VIT
    )
    model = build_model(config)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            state[name.replace("__", ".")].copy_(value)
    return save_checkpoint(model, ModelCard(config, CORE_GENES, ADDON_GENES), tmp_path / "m.safetensors")


def rewrite_card(path, edit=None, *, text=None) -> None:
    """Rewrite the card in the file's safetensors header in place, leaving the tensor bytes as they are."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    if text is None:
        card = json.loads(header["__metadata__"][CARD_METADATA_KEY])
        edit(card)
        text = json.dumps(card)
    header["__metadata__"][CARD_METADATA_KEY] = text
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len :])


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or connect is recorded and fails."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize(
    "backbone",
    [
        "hf-hub:someone/model",
        "hf_hub:someone/model",
        "timm/vit_small_patch16_224.augreg_in21k",
        "https://example.org/vit_small.safetensors",
        "local-dir:/tmp/vit",
        "../models/vit_small_patch16_224",
    ],
)
def test_a_card_naming_a_backbone_from_the_network_is_refused_without_network_access(tmp_path, no_network, backbone):
    path = saved_checkpoint(tmp_path)
    rewrite_card(path, lambda card: card["model"].update(backbone=backbone))
    for read in (read_model_card, load_checkpoint):
        with pytest.raises(InputError, match="(?s)m.safetensors.*from the network.*only local timm architectures"):
            read(path)
    assert no_network == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pretrained": True}, {"checkpoint_path": "weights.pth"}, {"pretrained_cfg_overlay": "hf-hub:x/y"},
        {"img_size": 448},
    ],
)
def test_a_card_builds_only_a_local_architecture_without_pretrained_weights(tmp_path, no_network, monkeypatch, kwargs):
    import timm

    created = []

    def recording_create_model(*args, **options):
        created.append(options)
        return timm_create_model(*args, **options)

    timm_create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", recording_create_model)
    tagged = saved_checkpoint(tmp_path, backbone="vit_small_patch16_224.augreg_in21k")
    created.clear()
    load_checkpoint(tagged)  # a timm tag names weights, but a card only ever builds the architecture
    assert created and all(
        options["pretrained"] is False and "pretrained_cfg_overlay" not in options for options in created
    )
    rewrite_card(tagged, lambda card: card["model"]["backbone_kwargs"].update(kwargs))
    with pytest.raises(InputError, match=f"(?s)backbone_kwargs {next(iter(kwargs))!r} is not .*depth, embed_dim"):
        load_checkpoint(tagged)
    assert no_network == []


def record_real_allocations(monkeypatch) -> list[str]:
    """The device of every nn.Linear created from now on: 'meta' costs no memory, 'cpu' does."""
    devices = []
    reset_parameters = nn.Linear.reset_parameters

    def recording(self):
        devices.append(self.weight.device.type)
        reset_parameters(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", recording)
    return devices


def with_gene(card, key, name):
    card[key].append(name)
    card["model"]["n_core_genes" if key == "core_genes" else "n_addon_genes"] += 1


def patch_size(card, patch_px):
    card["model"].update(patch_px=patch_px)
    card["model"]["backbone_kwargs"].update(patch_size=patch_px)
    card["tile_geometry"].update(tokens_per_side=card["tile_geometry"]["image_px"] // patch_px)


def image_size(card, img_size):
    card["model"].update(img_size=img_size)
    card["tile_geometry"].update(image_px=img_size, tokens_per_side=img_size // card["model"]["patch_px"])


@pytest.mark.parametrize(
    ("edit", "entry", "card_says", "tensors_say"),
    [
        (lambda c: c["model"]["backbone_kwargs"].update(embed_dim=64, num_heads=4), "embed_dim", "64", "48"),
        (
            lambda c: c["model"]["backbone_kwargs"].update(depth=24, embed_dim=1024, num_heads=16),
            "embed_dim", "1024", "48",
        ),
        (lambda c: c["model"]["backbone_kwargs"].update(depth=3), "depth", "3", "2"),
        (lambda c: c["model"]["backbone_kwargs"].update(mlp_ratio=2.0), "MLP width", "96", "192"),
        (lambda c: patch_size(c, 14), "patch size", r"\(14, 14\)", r"\(16, 16\)"),
        (lambda c: image_size(c, 448), "position embeddings", "785", "197"),
        (lambda c: with_gene(c, "core_genes", "CORE7"), "core genes", "8", "7"),
        (lambda c: with_gene(c, "addon_genes", "ADD5"), "add-on genes", "6", "5"),
        (lambda c: c["model"].update(variant="late_fusion_add_token"), "late-fusion norms", "present", "absent"),
        (lambda c: c["model"].update(variant="expr_only_token"), "image encoder", "absent", "present"),
        (lambda c: c["model"].update(learnable_gate=True), "learnable gate", "present", "absent"),
        (lambda c: c["model"].update(expression_hidden_layers=2), "expression layers", "4", "3"),
        (
            lambda c: c["model"]["backbone_kwargs"].update(qkv_bias=False),
            "tensor image_encoder.blocks.0.attn.qkv.bias", "absent", r"shape \(144,\)",
        ),
    ],
)
def test_a_card_that_disagrees_with_the_tensors_is_refused_before_building(
    tmp_path, monkeypatch, edit, entry, card_says, tensors_say
):
    path = saved_checkpoint(tmp_path)
    rewrite_card(path, edit)
    devices = record_real_allocations(monkeypatch)
    message = (
        rf"(?s)m.safetensors does not match the architecture its card describes.*{entry}.*the card says {card_says}.*"
        rf"the tensors say {tensors_say}.*edited or written by another tool.*retrain.*re-export"
    )
    for read in (read_model_card, load_checkpoint):
        with pytest.raises(InputError, match=message):
            read(path)
    assert "cpu" not in devices


@pytest.mark.parametrize(
    ("edit", "limit"),
    [
        (
            lambda c: c["model"]["backbone_kwargs"].update(embed_dim=10**7),
            "embed_dim 10000000 is above the limit of 8192",
        ),
        (lambda c: c["model"]["backbone_kwargs"].update(depth=10**5), "depth 100000 is above the limit of 64"),
        (lambda c: c["model"]["backbone_kwargs"].update(num_heads=10**5), "num_heads 100000 is above the limit of 256"),
        (lambda c: c["model"]["backbone_kwargs"].update(mlp_ratio=1e6), "mlp_ratio 1000000.0 is above the limit of 16"),
        (lambda c: c["model"]["backbone_kwargs"].update(mlp_ratio=0), "mlp_ratio 0 is below the minimum of"),
        (lambda c: c["model"]["backbone_kwargs"].update(num_heads=5), "embed_dim 48 is not a multiple of num_heads 5"),
        (lambda c: c["model"]["backbone_kwargs"].update(patch_size=32), "patch_size 32 differs from patch_px 16"),
        (
            lambda c: c["model"]["backbone_kwargs"].update(drop_path_rate=math.inf),
            "drop_path_rate inf is above the limit",
        ),
        (lambda c: image_size(c, 10**5), "img_size 100000 is above the limit of 1024"),
        (
            lambda c: patch_size(c, 1),
            r"50176 tokens per tile \(img_size 224 / patch_px 1, squared\) is above the limit of 4096",
        ),
        (lambda c: c["model"].update(n_core_genes=10**9), "n_core_genes 1000000000 is above the limit of 100000"),
        (lambda c: c["model"].update(n_addon_genes=10**9), "n_addon_genes 1000000000 is above the limit of 100000"),
        (
            lambda c: c["model"].update(expression_hidden_dim=10**8),
            "expression_hidden_dim 100000000 is above the limit of 16384",
        ),
        (
            lambda c: c["model"].update(expression_hidden_layers=10**6),
            "expression_hidden_layers 1000000 is above the limit of 64",
        ),
        (
            lambda c: c["model"]["backbone_kwargs"].update(depth=64, embed_dim=8192, num_heads=64),
            r"would have 51,[0-9,]+ parameters, above the limit of 2,000,000,000",
        ),
    ],
)
def test_an_absurd_architecture_is_refused_before_any_allocation(tmp_path, monkeypatch, edit, limit):
    path = saved_checkpoint(tmp_path)
    rewrite_card(path, edit)
    devices = record_real_allocations(monkeypatch)
    with pytest.raises(InputError, match=f"(?s)m.safetensors.*{limit}"):
        load_checkpoint(path)
    assert "cpu" not in devices
    vit_large = ModelConfig(380, 100, backbone="vit_large_patch16_224")  # real ViTs stay within the limits
    assert len(described_tensor_shapes(vit_large)) > 0
    assert "cpu" not in devices


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"].update(backbone="resnet50"), "backbone 'resnet50'.*Pick a timm VisionTransformer"),
        (
            lambda c: c["model"].update(backbone_kwargs={"num_heads": 5}),
            "divisible by num_heads.*multiple of num_heads",
        ),
    ],
)
def test_a_card_naming_a_backbone_timm_cannot_build_is_explained(tmp_path, edit, message):
    path = saved_checkpoint(tmp_path)
    rewrite_card(path, edit)
    with pytest.raises(InputError, match=f"(?s)m.safetensors: Could not create .*{message}"):
        read_model_card(path)


def test_non_finite_weights_are_refused_at_load(tmp_path):
    path = saved_checkpoint(tmp_path, head__weight=torch.full((5, 48), math.nan))
    with pytest.raises(
        InputError,
        match=r"m.safetensors holds non-finite weights \(1 tensors, e.g. head.weight\); the training diverged or the "
        "file is damaged; retrain or use another checkpoint",
    ):
        load_checkpoint(path)
    inf = torch.zeros(48)
    inf[3] = math.inf
    path = saved_checkpoint(tmp_path, image_encoder__norm__bias=inf, head__bias=torch.tensor([0, 0, -math.inf, 0, 0]))
    with pytest.raises(InputError, match=r"non-finite weights \(2 tensors, e.g. head.bias\)"):
        load_checkpoint(path)


def test_a_baseline_copying_a_gene_outside_the_core_panel_is_refused(tmp_path):
    config = ModelConfig(len(CORE_GENES), len(ADDON_GENES), variant="min_mae")
    model = build_model(config)
    model.source_gene_index.copy_(torch.tensor([0, 1, 2, 7, 3]))
    path = save_checkpoint(model, ModelCard(config, CORE_GENES, ADDON_GENES), tmp_path / "m.safetensors")
    with pytest.raises(
        InputError, match=r"m.safetensors: the Min-MAE baseline copies core gene index 7 .* 7 core genes"
    ):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "napari-morphomol-model", ', "not valid JSON.*re-export"),
        ("[1, 2]", "not a napari-morphomol model card.*re-export"),
        ('{"format": "napari-morphomol-model"}', "format version None is not valid.*re-export"),
        ('{"format": "napari-morphomol-model", "format_version": 0}', "format version 0 is not valid.*re-export"),
        (
            '{"format": "napari-morphomol-model", "format_version": 4}',
            "version 4 is not supported.*update napari-morphomol",
        ),
    ],
)
def test_an_unreadable_card_names_the_file_and_what_to_do(tmp_path, text, message):
    path = saved_checkpoint(tmp_path)
    rewrite_card(path, text=text)
    with pytest.raises(InputError, match=f"(?s)^Checkpoint m.safetensors: .*{message}"):
        read_model_card(path)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("hub_backbone", "names a backbone from the network"),
        ("non_finite", r"holds non-finite weights \(1 tensors, e.g. head.weight\)"),
    ],
)
def test_morphomol_predict_refuses_a_tampered_checkpoint_in_one_line(
    tmp_path, synthetic_sample, tiny_checkpoint, tamper, message
):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "tampered.safetensors"
    shutil.copy(tiny_checkpoint, path)
    if tamper == "hub_backbone":
        rewrite_card(path, lambda card: card["model"].update(backbone="hf-hub:someone/model"))
    else:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        tensors["head.weight"] = torch.full_like(tensors["head.weight"], math.nan)
        save_file(tensors, str(path), metadata=metadata)
    s = synthetic_sample
    done = subprocess.run(
        [sys.executable, "-m", "napari_morphomol.cli", "predict", str(s.xenium_dir), "--he", str(s.he_path),
         "--alignment", str(s.alignment_csv), "--checkpoint", str(path), "--out", str(tmp_path / "r.zarr"),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("morphomol predict: error:")]
    assert len(errors) == 1 and "tampered.safetensors" in errors[0]
    assert re.search(message, errors[0]), done.stderr
