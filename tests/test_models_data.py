"""Tile datasets over tiles stores, and `morphomol train` / `morphomol evaluate` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from napari_morphomol.cli import main
from napari_morphomol.errors import InputError
from napari_morphomol.models import load_checkpoint
from napari_morphomol.models.data import (
    CohortDataset,
    TileDataset,
    he_levels_yxc_of_file,
    image_cache_path,
    tile_sample_folder,
    tiles_stores_for,
)
from napari_morphomol.tiling import LevelSampler, TilingOptions, read_tiles_zarr

TINY_VIT = '{"depth": 1, "embed_dim": 48, "num_heads": 3}'


@pytest.fixture(scope="module")
def stores(synthetic_sample, synthetic_sample_deformed, tmp_path_factory) -> dict[str, Path]:
    """The two fixture samples tiled (min 0 transcripts: every tissue tile), named a and b."""
    root = tmp_path_factory.mktemp("tile_stores")
    return {
        name: tile_sample_folder(sample.root, root / f"{name}.tiles.zarr",
                                 options=TilingOptions(min_transcripts=0))
        for name, sample in (("a", synthetic_sample), ("b", synthetic_sample_deformed))
    }


def test_items_match_store_and_he_reader(stores, synthetic_sample):
    store = read_tiles_zarr(stores["a"])
    dataset = TileDataset.from_store(stores["a"])
    assert dataset.sample_id == "a" and len(dataset) == len(store.tiles) > 3
    sampler = LevelSampler(store.geometry, he_levels_yxc_of_file(synthetic_sample.he_path))
    n_core, n_addon = len(store.core_genes), len(store.addon_genes)
    for position in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[position]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 224, 224)
        assert item["tokens"].dtype == torch.float32 and item["tokens"].shape == (196, n_core)
        assert item["target"].dtype == torch.float32 and item["target"].shape == (n_addon,)
        assert item["sample_id"] == "a"
        row, col = int(store.tiles["row"].iloc[position]), int(store.tiles["col"].iloc[position])
        # the cache (chunk-decoding iter_tiles) equals the per-window reader
        np.testing.assert_array_equal(item["image"].numpy().transpose(1, 2, 0), sampler.read_window(row, col))
        # tokens: row-major 14 x 14 of this tile's raster window; their sum is the tile's core count
        tokens = store.tile_tokens(position)
        np.testing.assert_array_equal(item["tokens"].numpy(), tokens.reshape(196, n_core))
        np.testing.assert_array_equal(item["tokens"].numpy().reshape(14, 14, n_core)[3, 5], tokens[3, 5])
        assert item["tokens"].sum() == store.tiles.loc[position, "n_core"]
        counts = store.addon_counts[position]
        np.testing.assert_allclose(item["target"].numpy(), np.log1p(counts), rtol=1e-6)
        assert counts.sum() == store.tiles.loc[position, "n_addon"]
        # per-token targets: the tile's add-on raster window, summing exactly to its tile counts
        assert item["token_target"].dtype == torch.float32 and item["token_target"].shape == (196, n_addon)
        np.testing.assert_array_equal(item["token_target"].numpy(), store.tile_addon_tokens(position).reshape(196, -1))
        np.testing.assert_array_equal(item["token_target"].numpy().sum(axis=0), counts)


def test_gene_order_follows_the_panel_asked_for(stores):
    store = read_tiles_zarr(stores["a"])
    core, addon = store.core_genes[::-1][:7], store.addon_genes[2:5]
    dataset = TileDataset.from_store(stores["a"], core_genes=core, addon_genes=addon)
    item = dataset[1]
    np.testing.assert_array_equal(item["tokens"].numpy(), store.tile_tokens(1).reshape(196, -1)[:, ::-1][:, :7])
    np.testing.assert_allclose(item["target"].numpy(), store.targets_log1p[1][2:5])
    np.testing.assert_array_equal(item["token_target"].numpy(), store.tile_addon_tokens(1).reshape(196, -1)[:, 2:5])
    with pytest.raises(InputError, match="lacks 1 core genes.*NOT_A_GENE"):
        TileDataset.from_store(stores["a"], core_genes=["NOT_A_GENE"])


def test_stale_image_cache_is_refused(stores, tmp_path):
    store = read_tiles_zarr(stores["a"])
    other = read_tiles_zarr(stores["b"])
    from napari_morphomol.models.data import open_tile_images

    with pytest.raises(InputError, match="other tiles"):
        open_tile_images(store, image_cache_path(other.path))


def test_cohort_sample_ids_and_duplicates(stores):
    a, b = TileDataset.from_store(stores["a"]), TileDataset.from_store(stores["b"])
    cohort = CohortDataset([a, b])
    assert list(cohort.sample_ids) == ["a"] * len(a) + ["b"] * len(b)
    assert cohort[len(a)]["sample_id"] == "b"
    with pytest.raises(InputError, match="unique"):
        CohortDataset([a, a])


def test_sample_folders_with_one_name_are_refused(synthetic_sample, synthetic_sample_deformed, tmp_path):
    with pytest.raises(InputError, match="share the name sample"):
        tiles_stores_for([synthetic_sample.root, synthetic_sample_deformed.root], work_dir=tmp_path)


def test_cli_train_and_evaluate_end_to_end(stores, synthetic_sample, tmp_path, capsys):
    out = tmp_path / "models"
    code = main([
        "train", str(stores["a"]), str(stores["b"]), "--out", str(out), "--val", "b",
        "--variants", "early_fusion_add", "min_mae", "--backbone-kwargs", TINY_VIT,
        "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--accumulate", "1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "samples: train a" in printed and "validation b" in printed
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == ["a"] and split["val"] == ["b"] and split["test"] == []
    model, card = load_checkpoint(out / "early_fusion_add.safetensors")
    assert card.model.backbone_kwargs == json.loads(TINY_VIT)
    assert card.training["data"]["samples"]["val"] == ["b"]
    assert card.training["data"]["cli_arguments"]["epochs"] == 2
    assert card.core_genes == tuple(read_tiles_zarr(stores["a"]).core_genes)

    # evaluate on a sample folder: tiled with the model's panel into --work
    stem = tmp_path / "table_a1"
    code = main(["evaluate", str(out / "early_fusion_add.safetensors"), str(out / "min_mae.safetensors"),
                 "--data", str(synthetic_sample.root), "--out", str(stem), "--work", str(tmp_path / "work")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "early_fusion_add" in printed and "| min_mae |" in printed
    table = pd.read_csv(stem.with_suffix(".csv"), index_col=0)
    assert list(table.index) == ["early_fusion_add", "min_mae"]
    assert (table["n_genes"] == len(card.addon_genes)).all()
    genes = pd.read_csv(tmp_path / "table_a1_genes.csv")
    assert len(genes) == 2 * len(card.addon_genes)
    assert set(genes.columns) >= {"checkpoint", "variant", "gene", "pearson", "spearman", "mse"}
    assert stem.with_suffix(".md").read_text().startswith("| Variant |")
    # --route image: a model trained without modality dropout says what to do instead
    code = main(["evaluate", str(out / "early_fusion_add.safetensors"), "--data", str(stores["b"]), "--out",
                 str(tmp_path / "image_route"), "--route", "image"])
    assert code == 2 and "trained without modality dropout" in capsys.readouterr().err


def test_cli_trains_the_token_head_where_a_variant_has_tokens(stores, tmp_path, capsys):
    out = tmp_path / "token-models"
    code = main([
        "train", str(stores["a"]), str(stores["b"]), "--out", str(out), "--val", "b",
        "--variants", "early_fusion_add", "late_fusion_add_tile", "--backbone-kwargs", TINY_VIT, "--token-head",
        "poisson", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--accumulate", "1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "late_fusion_add_tile: no token sequence, trained without the token head" in printed
    assert "early_fusion_add: per token pearson" in printed and "better tile estimate" in printed
    _, card = load_checkpoint(out / "early_fusion_add.safetensors")
    assert card.model.token_heads == {"addon_tokens": len(card.addon_genes)}
    assert card.training["how"]["settings"]["token_loss"] == "poisson"
    assert card.training["validation_token_metrics"]["n_genes"] == len(card.addon_genes)
    _, tile_only = load_checkpoint(out / "late_fusion_add_tile.safetensors")
    assert tile_only.model.token_heads == {} and "validation_token_metrics" not in tile_only.training


def test_cli_train_calibrates_on_the_named_held_out_samples(stores, tmp_path, capsys):
    """--calibration keeps its samples out of training and validation and writes the card's
    calibration, with --modality-dropout for the H&E alone too; a sample named twice is refused."""
    import shutil

    for suffix in (".tiles.zarr", ".tiles.images.zarr"):  # a third sample: b's tiles under another name
        source = stores["b"].with_name("b" + suffix)
        if source.exists():
            shutil.copytree(source, tmp_path / f"c{suffix}")
    data = [str(stores["a"]), str(stores["b"]), str(tmp_path / "c.tiles.zarr")]
    assert main(["train", *data, "--out", str(tmp_path / "refused"), "--val", "b", "--calibration", "b"]) == 2
    assert "a sample cannot be both --val and --calibration (b)" in capsys.readouterr().err
    out = tmp_path / "calibrated"
    assert main(["train", *data, "--out", str(out), "--val", "b", "--calibration", "c", "--variance-head",
                 "--token-head", "poisson", "--backbone-kwargs", TINY_VIT, "--epochs", "1", "--warmup-epochs", "0",
                 "--batch-size", "4", "--accumulate", "1", "--modality-dropout", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "calibration c" in printed and "calibrated on c at scales tile, token" in printed
    assert "the H&E alone calibrated too" in printed
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == ["a"] and split["calibration"] == ["c"]
    _, card = load_checkpoint(out / "early_fusion_add.safetensors")
    assert card.model.variance_head and card.calibration.samples == ("c",)
    assert card.model.routes == ("both", "image", "transcripts") and set(card.calibration.routes) == {"image"}
    assert card.training["how"]["settings"]["modality_dropout"] == 0.2
    assert card.calibration.outliers.n_training_tiles == len(TileDataset.from_store(stores["a"]))


def test_cli_train_with_ddp_on_two_processes(stores, tmp_path):
    """Lightning's DDP reruns the command in a second process; only the first writes and reports.
    Two CPU processes (gloo) stand in for two GPUs."""
    out = tmp_path / "ddp"
    command = [str(Path(sys.executable).with_name("morphomol")), "train", str(stores["a"]), str(stores["b"]),
               "--out", str(out), "--val", "b", "--variants", "early_fusion_add", "min_mae",
               "--backbone-kwargs", TINY_VIT, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "2",
               "--accumulate", "1", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    assert done.stdout.count("early_fusion_add: validation") == 1 and done.stdout.count("min_mae: validation") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "early_fusion_add.safetensors", "min_mae.safetensors", "split.json"
    ]
    model, card = load_checkpoint(out / "early_fusion_add.safetensors")
    assert card.training["how"]["settings"]["strategy"] == "ddp"
    assert card.training["how"]["settings"]["devices"] == 2
    assert card.training["how"]["epochs_run"] == 1
    assert np.isfinite(card.training["validation_metrics"]["mse"])


def test_cli_train_refuses_a_device_count_that_is_no_number(stores, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(stores["a"]), "--out", str(tmp_path / "m"), "--devices", "two"])
    assert "give a number of devices (e.g. 2) or auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(stores["a"]), "--out", str(tmp_path / "m"), "--num-nodes", "0"])
    assert "give a number of nodes (machines), 1 or more" in capsys.readouterr().err


def test_cli_train_refuses_unknown_split_sample(stores, tmp_path, capsys):
    code = main(["train", str(stores["a"]), str(stores["b"]), "--out", str(tmp_path / "m"), "--val", "c"])
    assert code == 2
    assert "not in DATA" in capsys.readouterr().err
