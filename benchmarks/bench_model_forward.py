"""CPU forward throughput of the default model (ViT-S/16 early fusion): bf16 autocast vs fp32.

Prints tiles/s for both, their ratio, and the largest prediction/embedding difference, all
measured in this run on this machine. Usage:
    python benchmarks/bench_model_forward.py [--batch 32] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_morphomol.models import ModelConfig, build_model


def tiles_per_second(model, images, counts, repeats: int, bf16: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        output = model(images, counts)  # warm-up: oneDNN picks kernels on the first call
        start = time.perf_counter()
        for _ in range(repeats):
            output = model(images, counts)
        elapsed = time.perf_counter() - start
    return repeats * len(images) / elapsed, output.predictions.float(), output.embeddings.float()


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
    print(f"model: early_fusion_add, {model.config.backbone}, batch {args.batch}, {args.repeats} timed batches each")
    fp32_rate, fp32_pred, fp32_emb = tiles_per_second(model, images, counts, args.repeats, bf16=False)
    bf16_rate, bf16_pred, bf16_emb = tiles_per_second(model, images, counts, args.repeats, bf16=True)
    fp32_again, _, _ = tiles_per_second(model, images, counts, args.repeats, bf16=False)
    print(f"fp32          : {fp32_rate:8.2f} tiles/s (repeat: {fp32_again:.2f})")
    print(f"bf16 autocast : {bf16_rate:8.2f} tiles/s")
    print(f"ratio bf16/fp32 (vs mean of both fp32 runs): {bf16_rate / ((fp32_rate + fp32_again) / 2):.2f}x")
    print(
        f"max |bf16 - fp32|: predictions {float((bf16_pred - fp32_pred).abs().max()):.4g} "
        f"(fp32 range {float(fp32_pred.abs().max()):.3g}), embeddings {float((bf16_emb - fp32_emb).abs().max()):.4g} "
        f"(fp32 range {float(fp32_emb.abs().max()):.3g})"
    )


if __name__ == "__main__":
    main()
