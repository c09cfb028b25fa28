"""Whole-sample prediction: results against a direct forward pass, schedulers, resume, cancel, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_morphomol.elements import HE_IMAGE
from napari_morphomol.errors import InputError
from napari_morphomol.inference import (
    DeviceFallbackWarning,
    InferenceCancelled,
    PredictOptions,
    default_checkpoint_path,
    open_results,
    partial_path,
    predict,
)
from napari_morphomol.inference.store import band_rows, chunk_order, tile_groups
from napari_morphomol.io.sample import load_sample
from napari_morphomol.models import (
    ModelCard,
    ModelConfig,
    build_model,
    load_checkpoint,
    read_model_card,
    save_checkpoint,
)

TINY_VIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}
RUN = dict(batch_size=4, tiles_per_chunk=4, dtype="float32", device="cpu")


def write_checkpoint(path, core, addon):
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(core), n_addon_genes=len(addon), backbone_kwargs=TINY_VIT)
    return save_checkpoint(build_model(config), ModelCard(config, tuple(core), tuple(addon)), path)


@pytest.fixture(scope="module")
def panel(synthetic_sample):
    return json.loads(synthetic_sample.panel_json.read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, panel):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", panel["core"], panel["addon"])


@pytest.fixture(scope="module")
def sample(synthetic_sample):
    s = synthetic_sample
    return load_sample(s.xenium_dir, s.he_path, s.alignment_csv)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sample, checkpoint):
    """An uninterrupted run on threads with device 'auto' (warnings kept for the fallback test)."""
    out = tmp_path_factory.mktemp("runs") / "reference.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(sample, PredictOptions(checkpoint=checkpoint, store=out, **{**RUN, "device": "auto"}))
    return open_results(out), caught


def by_tile(results):
    order = np.argsort(results.tiles["tile_id"].to_numpy())
    return results.tiles["tile_id"].to_numpy()[order], results.predictions[order], results.embeddings[order]


def test_results_equal_a_direct_forward_pass(reference_run, sample, checkpoint, panel):
    from napari_morphomol.elements import element_levels_cyx, levels_yxc
    from napari_morphomol.tiling import GenePanel, LevelSampler, TilingOptions, tile_sample

    results, _ = reference_run
    model, card = load_checkpoint(checkpoint)
    tiling = tile_sample(sample, panel=GenePanel(core=card.core_genes, addon=card.addon_genes),
                         options=TilingOptions(min_transcripts=0))
    assert sorted(results.tiles["tile_id"]) == sorted(tiling.tiles["tile_id"])
    assert len(results.tiles) >= 8 and results.metadata["n_chunks"] >= 2
    sampler = LevelSampler(tiling.geometry, levels_yxc(element_levels_cyx(sample.images[HE_IMAGE])))
    expected = {}
    for positions, images in sampler.iter_tiles(tiling.tiles["row"], tiling.tiles["col"], batch_size=64):
        tokens = tiling.tokens(positions).reshape(len(positions), 196, -1).astype(np.float32)
        with torch.inference_mode():
            out = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(tokens))
        for k, p in enumerate(positions):
            expected[int(tiling.tiles["tile_id"].iloc[p])] = (out.predictions[k].numpy(), out.embeddings[k].numpy())
    for row, tile_id in enumerate(results.tiles["tile_id"]):
        np.testing.assert_allclose(results.predictions[row], expected[int(tile_id)][0], atol=1e-4)
        np.testing.assert_allclose(results.embeddings[row], expected[int(tile_id)][1], atol=1e-4)
    # measured add-on targets: the tiling's per-tile sums, in the card's gene order
    assert results.measured_genes == panel["addon"] == results.addon_genes
    targets = dict(zip(tiling.tiles["tile_id"], tiling.targets_log1p(), strict=True))
    for row, tile_id in enumerate(results.tiles["tile_id"]):
        np.testing.assert_allclose(results.measured_log1p[row], targets[tile_id], rtol=1e-6)


def test_a_per_token_output_is_stored_as_its_own_array(tmp_path, sample, panel, reference_run):
    """A model declaring a token head gets a (tiles, tokens, width) array of that name, equal to
    the head applied to the same forward pass; the tile outputs are those of the same trunk."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]),
                                    backbone_kwargs=TINY_VIT))
    config = dataclasses.replace(plain.config, token_heads={"density": 3})
    model = build_model(config)
    model.load_state_dict(plain.state_dict(), strict=False)
    path = save_checkpoint(model, ModelCard(config, tuple(panel["core"]), tuple(panel["addon"])),
                           tmp_path / "tokens.safetensors")
    out = predict(sample, PredictOptions(checkpoint=path, store=tmp_path / "tokens.zarr", **RUN))
    results = open_results(out)
    assert [(s.name, s.level, s.width) for s in results.output_specs] == [
        ("predictions", "tile", len(panel["addon"])), ("embeddings", "tile", 192), ("density", "token", 3)]
    tokens = results.output("density")
    assert tokens.shape == (len(results.tiles), 196, 3) and np.isfinite(tokens).all()
    ids, predictions, _ = by_tile(results)
    reference_ids, reference_predictions, _ = by_tile(reference_run[0])
    np.testing.assert_array_equal(ids, reference_ids)
    np.testing.assert_allclose(predictions, reference_predictions, atol=1e-4)
    with pytest.raises(InputError, match="holds no output 'variance'.*density"):
        results.output("variance")


def test_a_token_head_run_gives_token_maps_beside_the_measured_ones(tmp_path, sample, panel):
    """A model with the add-on token head: its run holds per-token predictions and the sample's
    measured counts per token; the explorer stitches both into token-resolution maps."""
    from napari_morphomol.analysis import explore_run
    from napari_morphomol.models import ADDON_TOKEN_HEAD

    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]), backbone_kwargs=TINY_VIT,
                         token_heads={ADDON_TOKEN_HEAD: len(panel["addon"])})
    path = save_checkpoint(build_model(config), ModelCard(config, tuple(panel["core"]), tuple(panel["addon"])),
                           tmp_path / "addon-tokens.safetensors")
    explorer = explore_run(predict(sample, PredictOptions(checkpoint=path, store=tmp_path / "t.zarr", **RUN)))
    results, grid = explorer.results, explorer.token_grid
    assert explorer.has_token_maps and results.measured_token_counts is not None
    gene = results.measured_genes[0]
    column, measured_column = results.addon_genes.index(gene), results.measured_genes.index(gene)
    predicted = explorer.token_map(gene)
    log_rate = results.output(ADDON_TOKEN_HEAD)[:, :, column]
    np.testing.assert_allclose(predicted, grid.token_map(np.log1p(np.exp(log_rate))), rtol=1e-5)
    assert predicted.shape == grid.shape and np.isfinite(predicted).sum() == grid.covered.sum()
    # measured tokens: a tile's window of the raster sums to the tile's measured counts
    counts = results.measured_token_counts[...]
    for row in range(0, len(results.tiles), 7):
        i, j = int(results.tiles["row"].iloc[row]), int(results.tiles["col"].iloc[row])
        window = counts[7 * i:7 * i + 14, 7 * j:7 * j + 14, measured_column]
        assert int(window.sum()) == int(results.measured_counts[row, measured_column])
    measured, residual = explorer.token_map(gene, "measured"), explorer.token_map(gene, "residual")
    covered = grid.covered
    np.testing.assert_allclose(measured[covered], np.log1p(counts[..., measured_column][covered]), rtol=1e-6)
    np.testing.assert_allclose(residual[covered], measured[covered] - predicted[covered], atol=1e-5)
    assert np.isnan(measured[~covered]).all()


def test_a_tile_model_run_says_how_to_get_token_maps(reference_run):
    from napari_morphomol.analysis import explore_results

    explorer = explore_results(reference_run[0])
    assert not explorer.has_token_maps
    with pytest.raises(InputError, match="predicts per tile only.*--token-head"):
        explorer.token_map(explorer.results.addon_genes[0])


def test_store_metadata_records_the_run(reference_run, checkpoint):
    results, _ = reference_run
    meta = results.metadata
    assert meta["status"] == "complete"
    assert meta["model_card"]["addon_genes"] == results.addon_genes
    assert meta["checkpoint"]["path"] == str(checkpoint.resolve())
    assert meta["registration"]["matrix"] is not None
    precision = meta["precision"]
    assert precision["dtype"] == "float32" and precision["device"] == "cpu"
    assert precision["max_abs_diff_predictions"] > 0  # bf16 really was compared with fp32
    segment = meta["segments"][-1]
    assert segment["chunks_run"] == meta["n_chunks"] and segment["tiles_run"] == len(results.tiles)
    assert {"tiling_s", "calibration_s", "inference_s", "total_s"} <= set(segment["timings"])
    # chunks are contiguous row ranges of the table
    chunks = results.tiles["chunk"].to_numpy()
    assert np.all(np.diff(chunks) >= 0) and chunks.max() == meta["n_chunks"] - 1


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a machine without GPU"
)
def test_auto_device_falls_back_to_cpu_with_a_warning(reference_run):
    _, caught = reference_run
    assert any(issubclass(w.category, DeviceFallbackWarning) and "CPU" in str(w.message) for w in caught)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_is_a_clear_error_before_any_work(tmp_path, sample, checkpoint):
    out = tmp_path / "cuda.zarr"
    with pytest.raises(InputError, match="no CUDA GPU"):
        predict(sample, PredictOptions(checkpoint=checkpoint, store=out, **{**RUN, "device": "cuda"}))
    assert not out.exists() and not partial_path(out).exists()


def test_checkpoint_panel_missing_from_sample_fails_before_any_work(tmp_path, sample, panel):
    checkpoint = write_checkpoint(
        tmp_path / "other.safetensors", [*panel["core"][:5], "NOT_A_GENE"], panel["addon"][:3]
    )
    out = tmp_path / "r.zarr"
    with pytest.raises(InputError, match="NOT_A_GENE"):
        predict(sample, PredictOptions(checkpoint=checkpoint, store=out, **RUN))
    assert not out.exists() and not partial_path(out).exists()


def test_default_checkpoint_is_the_shipped_model(synthetic_sample):
    from napari_morphomol.models import shipped_model_path

    assert default_checkpoint_path() == shipped_model_path()
    panel = json.loads(synthetic_sample.panel_json.read_text())
    assert list(read_model_card(default_checkpoint_path()).addon_genes) == panel["addon"]


def test_processes_and_local_cluster_give_the_threads_predictions(tmp_path, sample, checkpoint, reference_run):
    from distributed import Client, LocalCluster

    reference = by_tile(reference_run[0])
    runs = {"processes": predict(sample, PredictOptions(checkpoint=checkpoint, store=tmp_path / "p.zarr",
                                                        scheduler="processes", num_workers=2, **RUN))}
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        runs["cluster"] = predict(sample, PredictOptions(checkpoint=checkpoint, store=tmp_path / "c.zarr",
                                                         scheduler=client, **RUN))
        assert len(client.run(lambda: os.getpid())) == 2
    expected_scheduler = {"processes": "processes (2)", "cluster": "distributed"}
    for name, path in runs.items():
        results = open_results(path)
        assert results.metadata["segments"][-1]["scheduler"].startswith(expected_scheduler[name])
        tile_ids, predictions, embeddings = by_tile(results)
        np.testing.assert_array_equal(tile_ids, reference[0])
        np.testing.assert_allclose(predictions, reference[1], atol=1e-4)
        np.testing.assert_allclose(embeddings, reference[2], atol=1e-4)


KILL_SCRIPT = """
import os, signal, sys
from napari_morphomol.inference import PredictOptions, predict
from napari_morphomol.io.sample import load_sample
xenium, he, alignment, checkpoint, out = sys.argv[1:6]
def progress(done, total):
    if 0 < done < total:
        os.kill(os.getpid(), signal.SIGKILL)
predict(load_sample(xenium, he, alignment), PredictOptions(checkpoint=checkpoint, store=out, batch_size=1,
        tiles_per_chunk=1, dtype="float32", device="cpu"), progress=progress)
"""


def test_killed_run_resumes_to_exactly_the_uninterrupted_tiles(tmp_path, synthetic_sample, sample, checkpoint,
                                                                reference_run):
    out = tmp_path / "killed.zarr"
    s = synthetic_sample
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(s.xenium_dir), str(s.he_path), str(s.alignment_csv),
                           str(checkpoint), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(InputError, match="did not finish"):
        open_results(out)
    predict(sample, PredictOptions(checkpoint=checkpoint, store=out, batch_size=1, tiles_per_chunk=1, dtype="float32",
                                   device="cpu"))
    results = open_results(out)
    n_chunks = results.metadata["n_chunks"]
    resumed = results.metadata["segments"][-1]
    assert 0 < resumed["chunks_run"] < n_chunks  # finished chunks were skipped
    tile_ids, predictions, embeddings = by_tile(results)
    assert len(np.unique(tile_ids)) == len(tile_ids)
    reference = by_tile(reference_run[0])
    np.testing.assert_array_equal(tile_ids, reference[0])
    np.testing.assert_allclose(predictions, reference[1], atol=1e-4)
    np.testing.assert_allclose(embeddings, reference[2], atol=1e-4)
    assert not partial_path(out).exists()


def test_cancel_stops_and_leaves_a_resumable_store(tmp_path, sample, checkpoint, reference_run):
    out = tmp_path / "cancelled.zarr"
    first_chunk_done = threading.Event()
    reports = []

    def progress(done, total):
        reports.append(done)
        if done >= 1:
            first_chunk_done.set()

    run = dict(batch_size=1, tiles_per_chunk=1, dtype="float32", device="cpu")
    with pytest.raises(InferenceCancelled, match="resume"):
        predict(sample, PredictOptions(checkpoint=checkpoint, store=out, **run), progress=progress,
                cancel=first_chunk_done.is_set)
    assert partial_path(out).exists() and not out.exists()
    predict(sample, PredictOptions(checkpoint=checkpoint, store=out, **run), progress=progress)
    results = open_results(out)
    cancelled, resumed = results.metadata["segments"]
    assert cancelled["status"] == "cancelled" and 0 < cancelled["chunks_done_in_store"] < results.metadata["n_chunks"]
    # a task already past its last cancel check may still finish its chunk after the count
    assert resumed["chunks_run"] <= results.metadata["n_chunks"] - cancelled["chunks_done_in_store"]
    np.testing.assert_allclose(by_tile(results)[1], by_tile(reference_run[0])[1], atol=1e-4)
    assert reports[-1] == results.metadata["n_chunks"]


def test_existing_store_is_reused_or_refused(tmp_path, sample, checkpoint, panel, reference_run):
    out = reference_run[0].path
    # same inputs: already complete
    assert predict(sample, PredictOptions(checkpoint=checkpoint, store=out, **RUN)) == out
    other = write_checkpoint(tmp_path / "other.safetensors", panel["core"], panel["addon"][:2])
    with pytest.raises(InputError, match="--overwrite"):
        predict(sample, PredictOptions(checkpoint=other, store=out, **RUN))


def test_a_store_of_the_previous_format_is_refused_with_what_to_do(tmp_path, sample, checkpoint, reference_run):
    import shutil

    import zarr

    from napari_morphomol.inference.store import ATTRS_KEY

    old = tmp_path / "old.zarr"
    shutil.copytree(reference_run[0].path, old)
    root = zarr.open_group(old, mode="r+")
    root.attrs[ATTRS_KEY] = {**dict(root.attrs[ATTRS_KEY]), "format_version": 1}
    with pytest.raises(InputError, match="of format 1, and this version reads format 2.*morphomol predict` again"):
        open_results(old)
    old.rename(partial_path(old))  # an interrupted run of the previous version, same inputs
    with pytest.raises(InputError, match="--overwrite"):
        predict(sample, PredictOptions(checkpoint=checkpoint, store=old, **RUN))


def test_out_of_memory_halves_the_batch_and_goes_on(checkpoint):
    from napari_morphomol.inference.worker import LoadedModel, forward

    model, card = load_checkpoint(checkpoint)

    class RunsOutOfMemoryAboveTwo(torch.nn.Module):
        """The real model on a device that holds at most two tiles."""

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, images, tokens):
            if len(images) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.inner(images, tokens)

    loaded = LoadedModel(RunsOutOfMemoryAboveTwo(), card, torch.device("cpu"), None, threading.Lock())
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (8, 3, 224, 224), dtype=np.uint8))
    tokens = torch.from_numpy(rng.poisson(0.3, (8, 196, len(card.core_genes))).astype(np.float32))
    predictions, embeddings = forward(loaded, images, tokens, "float32")
    assert loaded.batch_limit == 2  # 8 -> 4 -> 2
    with torch.inference_mode():
        expected = model(images, tokens)
    np.testing.assert_allclose(predictions, expected.predictions.numpy(), atol=1e-4)
    np.testing.assert_allclose(embeddings, expected.embeddings.numpy(), atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 70), st.integers(1, 20), st.integers(0, 30), st.integers(0, 2**31 - 1))
def test_chunks_are_compact_blocks_of_a_full_grid(tiles_per_chunk, n_rows, extra_cols, seed):
    """Every group of every chunk lies in one band of rows, and its bounding box holds at most two
    partial columns beyond its own tiles (so a task decodes little H&E it does not use)."""
    band = band_rows(tiles_per_chunk)
    n_cols = max(4, -(-tiles_per_chunk // band)) + extra_cols
    rows, cols = np.divmod(np.random.default_rng(seed).permutation(n_rows * n_cols), n_cols)
    order = chunk_order(rows, cols, tiles_per_chunk)
    assert sorted(order) == list(range(len(rows)))
    for start in range(0, len(order), tiles_per_chunk):
        chunk = order[start:start + tiles_per_chunk]
        groups = tile_groups(rows[chunk], cols[chunk], tiles_per_chunk)
        assert sorted(np.concatenate(groups)) == list(range(len(chunk)))
        for group in groups:
            r, c = rows[chunk][group], cols[chunk][group]
            assert len(np.unique(r // band)) == 1
            assert (r.max() - r.min() + 1) * (c.max() - c.min() + 1) <= len(group) + 2 * band


def test_cli_predict_finds_the_he_and_alignment_by_the_readers_rule(tmp_path, synthetic_sample, checkpoint, capsys):
    """Issue 18, one rule for inputs: `predict SAMPLE_DIR` runs on what `morphomol synth` writes, and
    on its xenium/ folder with the H&E and alignment beside it; the same files as given explicitly."""
    from napari_morphomol.cli import main

    s = synthetic_sample
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--batch-size", "8"]
    for name, sample in (("root", s.root), ("bundle", s.xenium_dir)):
        assert main(["predict", str(sample), "--out", str(tmp_path / f"{name}.zarr"), *common]) == 0
        recorded = open_results(tmp_path / f"{name}.zarr").metadata["sample"]
        assert recorded["he_path"] == str(s.he_path) and recorded["alignment_csv"] == str(s.alignment_csv)
        assert recorded["xenium_dir"] == str(s.xenium_dir)
    assert main(["predict", str(tmp_path), "--out", str(tmp_path / "none.zarr"), *common]) == 2
    assert "neither a Xenium output folder" in capsys.readouterr().err


def test_cli_predict(tmp_path, synthetic_sample, checkpoint, capsys):
    from napari_morphomol.cli import main

    s = synthetic_sample
    out = tmp_path / "cli.zarr"
    args = ["predict", str(s.xenium_dir), "--he", str(s.he_path), "--alignment", str(s.alignment_csv),
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--tiles-per-chunk", "4"]
    assert main([*args, "--checkpoint", str(checkpoint)]) == 0
    captured = capsys.readouterr()
    assert "predicting [" in captured.err and f"wrote {out}" in captured.out
    assert len(open_results(out).tiles) > 0
    without_checkpoint = main([*args[:6], "--out", str(tmp_path / "x.zarr")])  # default flags: the shipped model
    assert without_checkpoint == 0 and len(open_results(tmp_path / "x.zarr").tiles) > 0
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):  # --device auto says where it runs
        err = capsys.readouterr().err
        assert "warning: no CUDA or MPS device is available; running on the CPU" in err
        assert "DeviceFallbackWarning" not in err
