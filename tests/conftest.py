"""Shared fixtures: small synthetic H&E + Xenium samples written once per test session."""

from __future__ import annotations

import pytest

from napari_morphomol.synthetic import SyntheticSample, write_synthetic_sample


@pytest.fixture(scope="session")
def synthetic_sample(tmp_path_factory) -> SyntheticSample:
    """0.6 x 0.6 mm, seed 0, default panels (380 core + 100 add-on), H&E placed by an affine
    only, so he_imagealignment.csv is the exact H&E px -> global px map."""
    return write_synthetic_sample(
        tmp_path_factory.mktemp("synthetic") / "sample", size_mm=(0.6, 0.6), seed=0, deformation=False
    )


@pytest.fixture(scope="session")
def synthetic_sample_deformed(tmp_path_factory) -> SyntheticSample:
    """Like synthetic_sample (seed 1) with a smooth local warp on top of the affine, so one
    affine leaves residuals of a few um; the exact map is true_he_to_global_px."""
    return write_synthetic_sample(
        tmp_path_factory.mktemp("synthetic_deformed") / "sample", size_mm=(0.6, 0.6), seed=1, deformation=True
    )


TINY_VIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}
"""A ViT small enough for tests on two cores; the product's default stays ViT-S/16."""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, synthetic_sample):
    """A randomly initialised early-fusion checkpoint with the synthetic sample's panel."""
    import json

    import torch

    from napari_morphomol.models import ModelCard, ModelConfig, build_model, save_checkpoint

    panel = json.loads(synthetic_sample.panel_json.read_text())
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]), backbone_kwargs=TINY_VIT)
    card = ModelCard(config, tuple(panel["core"]), tuple(panel["addon"]))
    return save_checkpoint(build_model(config), card, tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors")


@pytest.fixture(scope="session")
def dropout_checkpoint(tmp_path_factory, synthetic_sample):
    """A randomly initialised early-fusion model with the add-on token head, marked as trained with
    modality dropout (``unimodal_inputs``), so it runs on an H&E alone."""
    import json

    import torch

    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelCard, ModelConfig, build_model, save_checkpoint

    panel = json.loads(synthetic_sample.panel_json.read_text())
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]), backbone_kwargs=TINY_VIT,
                         token_heads={ADDON_TOKEN_HEAD: len(panel["addon"])}, unimodal_inputs=True)
    card = ModelCard(config, tuple(panel["core"]), tuple(panel["addon"]))
    return save_checkpoint(build_model(config), card, tmp_path_factory.mktemp("dropout") / "dropout.safetensors")


def predicted_store(tmp_path_factory, sample, checkpoint, name: str):
    """``name``.zarr: a finished run of ``checkpoint`` over ``sample`` on the CPU, in float32."""
    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io.sample import load_sample

    out = tmp_path_factory.mktemp("results") / f"{name}.zarr"
    predict(load_sample(sample.xenium_dir, sample.he_path, sample.alignment_csv),
            PredictOptions(checkpoint=checkpoint, store=out, batch_size=8, device="cpu", dtype="float32"))
    return out


@pytest.fixture(scope="session")
def results_store(tmp_path_factory, synthetic_sample, tiny_checkpoint):
    """A finished prediction run (RESULTS.zarr) of the tiny model over the synthetic sample."""
    return predicted_store(tmp_path_factory, synthetic_sample, tiny_checkpoint, "results")


@pytest.fixture(scope="session")
def token_results_store(tmp_path_factory, synthetic_sample):
    """A finished run of a randomly initialised early-fusion model with the add-on token head."""
    import json

    import torch

    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelCard, ModelConfig, build_model, save_checkpoint

    s = synthetic_sample
    panel = json.loads(s.panel_json.read_text())
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]), backbone_kwargs=TINY_VIT,
                         token_heads={ADDON_TOKEN_HEAD: len(panel["addon"])})
    card = ModelCard(config, tuple(panel["core"]), tuple(panel["addon"]))
    folder = tmp_path_factory.mktemp("checkpoint")
    checkpoint = save_checkpoint(build_model(config), card, folder / "tokens.safetensors")
    return predicted_store(tmp_path_factory, s, checkpoint, "tokens")


@pytest.fixture(scope="session")
def trusted_checkpoint(tmp_path_factory, synthetic_sample):
    """A randomly initialised early-fusion model with the add-on token head and a variance head,
    calibrated (``fit_calibration``) on the synthetic sample's own tiles: a card with tile and token
    quantiles, an outlier reference and its threshold, as ``morphomol train --calibration`` writes."""
    import dataclasses
    import json

    import torch

    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelCard, ModelConfig, build_model, save_checkpoint
    from napari_morphomol.models.data import TileDataset, tile_sample_folder
    from napari_morphomol.models.trust import fit_calibration

    panel = json.loads(synthetic_sample.panel_json.read_text())
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]), backbone_kwargs=TINY_VIT,
                         token_heads={ADDON_TOKEN_HEAD: len(panel["addon"])}, variance_head=True)
    model = build_model(config)
    folder = tmp_path_factory.mktemp("trusted")
    tiles = TileDataset.from_store(tile_sample_folder(synthetic_sample.root, folder / "sample.tiles.zarr"))
    model, calibration = fit_calibration(model, tiles, tiles, samples=("sample",))
    card = dataclasses.replace(ModelCard(model.config, tuple(panel["core"]), tuple(panel["addon"])),
                               calibration=calibration)
    return save_checkpoint(model, card, folder / "trusted.safetensors")


@pytest.fixture(scope="session")
def dropout_trusted_checkpoint(tmp_path_factory, synthetic_sample):
    """The trusted checkpoint's model marked as trained with modality dropout, calibrated on both
    routes (the image alone too) by ``fit_calibration``."""
    import dataclasses
    import json

    import torch

    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelCard, ModelConfig, build_model, save_checkpoint
    from napari_morphomol.models.data import TileDataset, tile_sample_folder
    from napari_morphomol.models.trust import fit_calibration

    panel = json.loads(synthetic_sample.panel_json.read_text())
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]), backbone_kwargs=TINY_VIT,
                         token_heads={ADDON_TOKEN_HEAD: len(panel["addon"])}, variance_head=True,
                         unimodal_inputs=True)
    folder = tmp_path_factory.mktemp("dropout_trusted")
    tiles = TileDataset.from_store(tile_sample_folder(synthetic_sample.root, folder / "sample.tiles.zarr"))
    model, calibration = fit_calibration(build_model(config), tiles, tiles, samples=("sample",))
    card = dataclasses.replace(ModelCard(model.config, tuple(panel["core"]), tuple(panel["addon"])),
                               calibration=calibration)
    return save_checkpoint(model, card, folder / "dropout_trusted.safetensors")


@pytest.fixture(scope="session")
def trusted_results_store(tmp_path_factory, synthetic_sample, trusted_checkpoint):
    """A finished run of the calibrated model over the synthetic sample (intervals and flags written)."""
    return predicted_store(tmp_path_factory, synthetic_sample, trusted_checkpoint, "trusted")
