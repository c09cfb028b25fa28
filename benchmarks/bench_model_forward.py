"""CPU forward throughput of the default model (ViT-S/16 early fusion): bf16 autocast vs fp32.

Prints tiles/s for both, their ratio, and the largest prediction/embedding difference, all
measured in this run on this machine. Usage:
    python benchmarks/bench_model_forward.py [--batch 32] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_morphomol.models import ModelConfig, build_model


def forward_seconds(model, images, counts, bf16: bool):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        output = model(images, counts)
        return time.perf_counter() - start, output


def interleaved_timings(model, images, counts, repeats: int):
    """fp32 and bf16 batches alternate, so load from other processes hits both alike."""
    forward_seconds(model, images, counts, bf16=False)  # warm-up: oneDNN picks kernels on first use
    forward_seconds(model, images, counts, bf16=True)
    seconds = {"fp32": [], "bf16": []}
    outputs = {}
    for _ in range(repeats):
        for name in seconds:
            elapsed, outputs[name] = forward_seconds(model, images, counts, bf16=name == "bf16")
            seconds[name].append(elapsed)
    return seconds, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--core-genes", type=int, default=380)
    parser.add_argument("--addon-genes", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_core_genes=args.core_genes, n_addon_genes=args.addon_genes)).eval()
    images = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8)
    counts = torch.poisson(torch.full((args.batch, 196, args.core_genes), 0.3))
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, oneDNN {torch.backends.mkldnn.is_available()}"
    )
    print(f"model: early_fusion_add, {model.config.backbone}, batch {args.batch}, "
          f"{args.repeats} timed batches per dtype")
    seconds, outputs = interleaved_timings(model, images, counts, args.repeats)
    rates = {name: args.batch / statistics.median(values) for name, values in seconds.items()}
    pair_ratios = [fp32 / bf16 for fp32, bf16 in zip(seconds["fp32"], seconds["bf16"])]
    print(f"fp32          : {rates['fp32']:8.2f} tiles/s (median of {args.repeats} batches)")
    print(f"bf16 autocast : {rates['bf16']:8.2f} tiles/s")
    print(
        f"ratio bf16/fp32: {rates['bf16'] / rates['fp32']:.2f}x "
        f"(per interleaved pair: {', '.join(f'{r:.2f}' for r in pair_ratios)})"
    )
    for field in ("predictions", "embeddings"):
        reference = getattr(outputs["fp32"], field).float()
        difference = (getattr(outputs["bf16"], field).float() - reference).abs().max()
        print(f"max |bf16 - fp32| {field}: {float(difference):.4g} "
              f"(largest fp32 value {float(reference.abs().max()):.3g})")


if __name__ == "__main__":
    main()
