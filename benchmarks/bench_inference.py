"""Whole-sample prediction: pipeline vs bare model throughput, schedulers, peak memory vs area.

Prints figures and ratios measured in this run on this machine (default model: ViT-S/16 early
fusion, random weights, the synthetic sample's 380 core / 100 add-on panel):

- ``throughput``: tiles/s of ``predict`` on threads (its chunk phase, and the whole call with
  tiling, calibration and start-up) divided by the bare model's forward tiles/s on ready tensors
  at the same batch size and dtype (measured before and after the run; the machine is shared).
- ``cluster``: the same run on a two-worker ``LocalCluster`` (one thread each) vs threads.
- ``memory``: peak RSS of a child process predicting a sample, and one with 4x the area.

Run: ``python benchmarks/bench_inference.py [--section NAME] [--workdir DIR] [--size-mm 2] [--batch 32]``.
Samples and the checkpoint are written once into ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_morphomol.inference import PredictOptions, open_results, predict
from napari_morphomol.io.sample import load_sample
from napari_morphomol.models import ModelCard, ModelConfig, build_model, load_checkpoint, save_checkpoint
from napari_morphomol.synthetic import write_synthetic_sample


def sample_dir(workdir: Path, size_mm: float) -> Path:
    out = workdir / f"sample_{size_mm:g}mm"
    if not (out / "panel.json").exists():
        print(f"writing a {size_mm:g} x {size_mm:g} mm synthetic sample ...", flush=True)
        write_synthetic_sample(out, size_mm=(size_mm, size_mm), seed=0, deformation=False)
    return out


TINY_VIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}


def checkpoint_for(workdir: Path, sample: Path, tiny: bool = False) -> Path:
    """ViT-S/16 early fusion (or a 2-block, 192-wide ViT), random weights, the sample's panel."""
    out = workdir / ("tiny_vit_early_fusion_random.safetensors" if tiny else "vit_s16_early_fusion_random.safetensors")
    if not out.exists():
        panel = json.loads((sample / "panel.json").read_text())
        torch.manual_seed(0)
        config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]),
                             backbone_kwargs=TINY_VIT if tiny else {})
        save_checkpoint(build_model(config), ModelCard(config, tuple(panel["core"]), tuple(panel["addon"])), out)
    return out


def load(sample: Path):
    return load_sample(sample / "xenium", sample / "he_image.ome.tif", sample / "he_imagealignment.csv")


def bare_forward_tiles_per_s(checkpoint: Path, batch: int, dtype: str, seconds: float = 20.0) -> float:
    """The model alone on ready tensors, as many batches as fit in ``seconds`` (at least 3)."""
    model, card = load_checkpoint(checkpoint)
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    counts = torch.poisson(torch.full((batch, 196, len(card.core_genes)), 0.3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        model(images, counts)  # warm-up
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < seconds:
            model(images, counts)
            n += 1
        return n * batch / (time.perf_counter() - start)


def run_predict(sample: Path, checkpoint: Path, out: Path, batch: int, scheduler=None) -> dict:
    predict(load(sample), PredictOptions(checkpoint=checkpoint, store=out, batch_size=batch, scheduler=scheduler,
                                         overwrite=True))
    results = open_results(out)
    segment = results.metadata["segments"][-1]
    return {"tiles": len(results.tiles), "timings": segment["timings"], "precision": results.metadata["precision"],
            "chunks": results.metadata["n_chunks"]}


def section_throughput(args, sample: Path, checkpoint: Path) -> dict:
    first = run_predict(sample, checkpoint, args.workdir / "warmup.zarr", args.batch)  # file cache, imports
    dtype = first["precision"]["dtype"]
    bare_before = bare_forward_tiles_per_s(checkpoint, args.batch, dtype)
    run = run_predict(sample, checkpoint, args.workdir / "threads.zarr", args.batch)
    bare_after = bare_forward_tiles_per_s(checkpoint, args.batch, dtype)
    bare = (bare_before + bare_after) / 2
    t = run["timings"]
    chunk_rate = run["tiles"] / t["inference_s"]
    call_rate = run["tiles"] / t["total_s"]
    p = run["precision"]
    print(f"\n== throughput: {run['tiles']} tiles in {run['chunks']} chunks, batch {args.batch}, "
          f"{dtype} on {p['device']}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"dtype choice: {p['reason']} ({p['reference_tiles']} reference tiles; max |bf16 - fp32| predictions "
          f"{p['max_abs_diff_predictions']:.3g}, embeddings {p['max_abs_diff_embeddings']:.3g})")
    print(f"bare model forward : {bare:7.2f} tiles/s (before {bare_before:.2f}, after {bare_after:.2f})")
    print(f"predict, chunk phase: {chunk_rate:7.2f} tiles/s -> ratio {chunk_rate / bare:.3f} (target >= 0.85)")
    print(f"predict, whole call : {call_rate:7.2f} tiles/s -> ratio {call_rate / bare:.3f} "
          f"(tiling {t.get('tiling_s', 0):.1f} s, calibration {t.get('calibration_s', 0):.1f} s, "
          f"chunks {t['inference_s']:.1f} s)")
    return {"threads_rate": chunk_rate}


def section_cluster(args, sample: Path, checkpoint: Path, threads_rate: float | None) -> None:
    from distributed import Client, LocalCluster

    if threads_rate is None:
        run = run_predict(sample, checkpoint, args.workdir / "threads.zarr", args.batch)
        threads_rate = run["tiles"] / run["timings"]["inference_s"]
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        run = run_predict(sample, checkpoint, args.workdir / "cluster.zarr", args.batch, scheduler=client)
        torch_threads = client.run(torch.get_num_threads)
        dtype = run["precision"]["dtype"]
        one_worker = client.submit(bare_forward_tiles_per_s, checkpoint, args.batch, dtype, 10.0).result()
    rate = run["tiles"] / run["timings"]["inference_s"]
    whole = run["tiles"] / run["timings"]["total_s"]
    print(f"\n== scheduler: {run['tiles']} tiles, batch {args.batch}, {dtype}")
    print(f"threads (2)                       : {threads_rate:7.2f} tiles/s (chunk phase)")
    print(f"LocalCluster 2 workers x 1 thread : {rate:7.2f} tiles/s -> ratio to threads {rate / threads_rate:.3f} "
          f"(worker torch threads {sorted(torch_threads.values())}; whole call {whole:.2f} tiles/s)")
    print(f"bare model on one worker (1 thread, other idle): {one_worker:.2f} tiles/s; two such: "
          f"{2 * one_worker:.2f} -> cluster chunk phase / that {rate / (2 * one_worker):.3f}")


def status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process (ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(sample: str, checkpoint: str, out: str, batch: int) -> None:
    """In a fresh process: RSS after imports and model load, then the peak over a full predict."""
    load_checkpoint(checkpoint)
    baseline = status_mib("VmRSS")
    before_chunks = []

    def progress(done: int, total: int) -> None:
        if not before_chunks:  # first report: tiling and calibration are over, no chunk done yet
            before_chunks.append(status_mib("VmHWM"))

    predict(load(Path(sample)), PredictOptions(checkpoint=checkpoint, store=out, batch_size=batch, dtype="float32",
                                               overwrite=True), progress=progress)
    print(json.dumps({"baseline_mib": baseline, "peak_mib": status_mib("VmHWM"), "before_chunks_mib": before_chunks[0],
                      "tiles": len(open_results(out).tiles), "chunks": open_results(out).metadata["n_chunks"]}))


def section_memory(args, checkpoint: Path) -> None:
    if args.memory_model == "tiny":
        checkpoint = checkpoint_for(args.workdir, sample_dir(args.workdir, args.memory_mm), tiny=True)
    sizes = (args.memory_mm, 2 * args.memory_mm)
    figures = {}
    for mm in sizes:
        sample = sample_dir(args.workdir, mm)
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(sample), str(checkpoint),
                               str(args.workdir / f"memory_{mm:g}.zarr"), "--batch", str(args.batch)],
                              capture_output=True, text=True, check=True)
        figures[mm] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = (figures[mm] for mm in sizes)
    print(f"\n== peak memory (VmHWM of a fresh process; {args.memory_model} model, threads, fp32, batch {args.batch})")
    for mm in sizes:
        f = figures[mm]
        print(f"{mm:g} x {mm:g} mm: {f['tiles']:5d} tiles in {f['chunks']} chunks, peak {f['peak_mib']:6.0f} MiB "
              f"(baseline {f['baseline_mib']:.0f} MiB; peak before the first chunk, i.e. tiling + calibration: "
              f"{f['before_chunks_mib']:.0f} MiB)")
    print(f"4x the area: peak ratio {large['peak_mib'] / small['peak_mib']:.3f} (target <= 1.25); above baseline: "
          f"{small['peak_mib'] - small['baseline_mib']:.0f} -> {large['peak_mib'] - large['baseline_mib']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["throughput", "cluster", "memory", "all"], default="all")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/inference"))
    parser.add_argument("--size-mm", type=float, default=2.0, help="side of the throughput sample (default 2 mm)")
    parser.add_argument("--memory-mm", type=float, default=2.0, help="side of the smaller memory sample (default 2 mm)")
    parser.add_argument("--memory-model", choices=["vit_s", "tiny"], default="vit_s",
                        help="model of the memory section: ViT-S/16 or a 2-block ViT (fast; less fixed memory)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--child-memory", nargs=3, metavar=("SAMPLE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(*args.child_memory, batch=args.batch)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    sample = sample_dir(args.workdir, args.size_mm)
    checkpoint = checkpoint_for(args.workdir, sample)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; numpy {np.__version__}")
    threads_rate = None
    if args.section in ("throughput", "all"):
        threads_rate = section_throughput(args, sample, checkpoint)["threads_rate"]
    if args.section in ("cluster", "all"):
        section_cluster(args, sample, checkpoint, threads_rate)
    if args.section in ("memory", "all"):
        section_memory(args, checkpoint)


if __name__ == "__main__":
    main()
