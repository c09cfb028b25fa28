"""On a CUDA GPU (marker ``cuda``; skipped without one, run by benchmarks/gpu_check.sh): predict
on the GPU gives the CPU's predictions, and running out of the device's memory halves the batch
and goes on with the same results."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_morphomol.inference import PredictOptions, open_results, predict
from napari_morphomol.io.sample import load_sample

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def sample(synthetic_sample):
    s = synthetic_sample
    return load_sample(s.xenium_dir, s.he_path, s.alignment_csv)


def run(sample, checkpoint, out, **options):
    predict(sample, PredictOptions(checkpoint=checkpoint, store=out, batch_size=8, tiles_per_chunk=8, **options))
    results = open_results(out)
    order = np.argsort(results.tiles["tile_id"].to_numpy())
    return results, results.predictions[order], results.embeddings[order]


def test_predict_on_cuda_equals_the_cpu(tmp_path, sample, tiny_checkpoint):
    _, cpu_predictions, cpu_embeddings = run(sample, tiny_checkpoint, tmp_path / "cpu.zarr", device="cpu",
                                             dtype="float32")
    results, predictions, embeddings = run(sample, tiny_checkpoint, tmp_path / "cuda.zarr", device="cuda",
                                           dtype="float32")
    assert results.metadata["precision"]["device"].startswith("cuda")
    # TF32 convolutions on the GPU: close, not bit-equal
    np.testing.assert_allclose(predictions, cpu_predictions, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(embeddings, cpu_embeddings, atol=2e-2, rtol=2e-2)
    results, predictions, _ = run(sample, tiny_checkpoint, tmp_path / "auto.zarr", device="cuda")
    assert results.metadata["precision"]["dtype"] == "bfloat16"  # dtype auto on CUDA
    assert np.corrcoef(predictions.ravel(), cpu_predictions.ravel())[0, 1] > 0.99


def test_out_of_memory_on_the_device_halves_the_batch_and_goes_on(tiny_checkpoint):
    from napari_morphomol.inference.worker import LoadedModel, forward
    from napari_morphomol.models import load_checkpoint

    device = torch.device("cuda")
    model, card = load_checkpoint(tiny_checkpoint, device)
    rng = np.random.default_rng(0)
    n = 512
    images = torch.from_numpy(rng.integers(0, 255, (n, 3, 224, 224), dtype=np.uint8))
    tokens = torch.from_numpy(rng.poisson(0.3, (n, 196, len(card.core_genes))).astype(np.float32))
    small = LoadedModel(model, card, device, None, threading.Lock())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    expected = forward(small, images[:8], tokens[:8], "float32")  # the working set of 8 tiles
    per_8 = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    # room for about 32 tiles beside what is allocated now: 512 at once must run out
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 4 * per_8) / total))
    try:
        loaded = LoadedModel(model, card, device, None, threading.Lock())
        predictions, embeddings = forward(loaded, images, tokens, "float32")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert loaded.batch_limit is not None and 1 <= loaded.batch_limit < n, loaded.batch_limit
    assert predictions.shape == (n, len(card.addon_genes)) and np.isfinite(predictions).all()
    np.testing.assert_allclose(predictions[:8], expected[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(embeddings[:8], expected[1], atol=1e-4, rtol=1e-4)
    print(f"out-of-memory halving on {torch.cuda.get_device_name()}: batch {n} -> {loaded.batch_limit}")
