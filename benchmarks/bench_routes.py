"""Routes: one early-fusion model for slides with and without a Xenium run.

The Table A.1 cohort of ``bench_variants.py`` (train 101-103, early stopping on 104, test 105).
The early-fusion model of the shipped configuration (add-on token head, variance head) is
trained without modality dropout and with it at each --rates (the fraction of training batches
that lose one modality, half the image and half the transcripts), beside dedicated morph-only
and expr-only (token) models of the same configuration; each --runs times with consecutive
training seeds. Every model predicts the held-out sample by each route it can run (both inputs,
the H&E alone, the transcripts alone), scored as Table A.1 (mean Pearson, Spearman and MSE over
the add-on genes; mean and sd over runs).

Printed: the table, the targets of the H&E-only issue (the dropout model's fused route at most
0.01 mean Spearman below the model without dropout; its image route within 0.02 of morph-only;
its transcript route within 0.02 of expr-only; both inputs above both single routes) for each
rate, and the rate it picks: the highest whose fused route keeps the 0.01 (the single routes
gain from more dropout). Usage:

    python benchmarks/bench_routes.py [--workdir DIR] [--rates 0.3 0.6] [--runs 2] [--jobs 2]

Samples, tiles and models are kept in --workdir (shared with bench_variants.py and bench_trust.py)
and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_variants  # noqa: E402  (the cohort, splits and training settings of Table A.1)

SEEDS = [101, 102, 103, 104, 105]
METRICS = ("spearman", "pearson", "mse")


def model_name(variant: str, rate: float) -> str:
    if variant != "early_fusion_add":
        return variant
    return f"early fusion, dropout {rate:g}" if rate else "early fusion, no dropout"


def train_and_score(job) -> tuple[str, int, dict[str, dict[str, float]], str]:
    """One model (variant, dropout rate, training seed) in its own process: trained (or read from
    --workdir), then scored on the test sample by every route it runs."""
    import torch

    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelConfig, evaluate_model, load_checkpoint, train_model

    variant, rate, seed, args, stores = job
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cohort, subsets, ids = bench_variants.cohort_splits(stores, SEEDS)
    checkpoint = args.workdir / "routes" / f"{variant}-dropout{rate:g}-seed{seed}.safetensors"
    if checkpoint.exists():
        model, _ = load_checkpoint(checkpoint)
        how = "read"
    else:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        config = ModelConfig(n_core_genes=len(cohort.core_genes), n_addon_genes=len(cohort.addon_genes),
                             variant=variant, backbone_kwargs=args.vit, variance_head=True,
                             token_heads={ADDON_TOKEN_HEAD: len(cohort.addon_genes)}, unimodal_inputs=rate > 0)
        settings = dataclasses.replace(bench_variants.settings_for(variant, args, seed), modality_dropout=rate)
        result = train_model(config, subsets["train"], subsets["val"], core_genes=cohort.core_genes,
                             addon_genes=cohort.addon_genes, settings=settings, checkpoint_path=checkpoint,
                             data_summary={"train_samples": ids["train"], "val_samples": ids["val"]})
        model = result.model
        how = f"trained (best epoch {result.card.training['how'].get('best_epoch', '-')})"
    scores = {route: evaluate_model(model, subsets["test"], addon_genes=cohort.addon_genes, route=route).means
              for route in model.config.routes}
    line = (f"{model_name(variant, rate):28s} seed {seed}: {how}; "
            + "; ".join(f"{route} spearman {m['spearman']:.3f}" for route, m in scores.items())
            + f" ({time.perf_counter() - start:.0f} s)")
    return model_name(variant, rate), seed, scores, line


def summary(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and sd over runs of each route's metrics."""
    return {route: {metric: (float(np.mean([r[route][metric] for r in runs])),
                             float(np.std([r[route][metric] for r in runs])))
                    for metric in METRICS}
            for route in runs[0]}


def markdown(table: dict[str, dict[str, dict[str, tuple[float, float]]]], runs: int) -> str:
    sd = runs > 1
    lines = ["| model | route | Spearman | Pearson | MSE |", "|---|---|---|---|---|"]
    for name, routes in table.items():
        for route, metrics in routes.items():
            cells = [f"{m:.3f} +- {s:.3f}" if sd else f"{m:.3f}" for m, s in (metrics[k] for k in METRICS)]
            lines.append(f"| {name} | {route} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(table, rates: list[float]) -> tuple[list[str], float | None]:
    """The issue's targets for each dropout rate, and the rate picked (highest that keeps the fused route)."""
    def spearman(name, route):
        return table[name][route]["spearman"][0]

    baseline = spearman("early fusion, no dropout", "both")
    morph, expr = spearman("morph_only", "image"), spearman("expr_only_token", "transcripts")
    lines, picked = [], None
    for rate in rates:
        name = model_name("early_fusion_add", rate)
        both, image, transcripts = (spearman(name, route) for route in ("both", "image", "transcripts"))
        checks = {
            f"fused route {both:.3f} vs no dropout {baseline:.3f} (loss at most 0.01)": baseline - both <= 0.01,
            f"image route {image:.3f} vs morph-only {morph:.3f} (within 0.02)": morph - image <= 0.02,
            f"transcript route {transcripts:.3f} vs expr-only {expr:.3f} (within 0.02)": expr - transcripts <= 0.02,
            "both inputs above both single routes": both > max(image, transcripts),
        }
        lines.append(f"dropout {rate:g}: " + "; ".join(f"{text}: {'met' if ok else 'NOT met'}"
                                                       for text, ok in checks.items()))
        if baseline - both <= 0.01:
            picked = rate
    return lines, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/morphomol-bench-variants"))
    parser.add_argument("--size-mm", type=float, default=2.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.6],
                        help="modality dropout rates to try (fractions of batches, 0 < rate < 1)")
    parser.add_argument("--image-epochs", type=int, default=bench_variants.IMAGE_EPOCHS)
    parser.add_argument("--expression-epochs", type=int, default=60)
    parser.add_argument("--vit", type=json.loads, default=bench_variants.BENCH_VIT,
                        help="timm VisionTransformer kwargs (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the first run")
    parser.add_argument("--runs", type=int, default=2, help="runs per model (training seeds --seed, --seed + 1, ...)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="models trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = parser.parse_args()
    if not all(0 < rate < 1 for rate in args.rates):
        parser.error("--rates are fractions of batches between 0 and 1")
    total_start = time.perf_counter()
    stores = bench_variants.make_cohort(args.workdir, SEEDS, args.size_mm)
    models = [("early_fusion_add", 0.0), *[("early_fusion_add", rate) for rate in args.rates],
              ("morph_only", 0.0), ("expr_only_token", 0.0)]
    jobs = [(variant, rate, args.seed + run, args, stores) for run in range(args.runs) for variant, rate in models]
    results: dict[str, list] = {model_name(variant, rate): [] for variant, rate in models}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, _, scores, line in pool.map(train_and_score, jobs):
            results[name].append(scores)
            print(line, flush=True)
    table = {name: summary(runs) for name, runs in results.items()}
    print(f"\nRoutes on synthetic data: test sample seed{SEEDS[-1]}, {args.runs} run(s) per model, mean over "
          "the add-on genes (mean +- sd over runs)")
    print(markdown(table, args.runs))
    lines, picked = verdicts(table, args.rates)
    print("\n" + "\n".join(lines))
    print("picked rate: " + (f"{picked:g}" if picked is not None else "none keeps the fused route within 0.01"))
    print(f"total {time.perf_counter() - total_start:.0f} s")


if __name__ == "__main__":
    main()
