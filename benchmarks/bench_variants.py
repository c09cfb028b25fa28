"""The paper's comparison (Table A.1) on a synthetic cohort: every variant, held-out sample.

Generates a cohort of synthetic samples (one seed each), tiles them, trains each variant on the
training samples (early stopping on a validation sample) and scores it on a held-out test
sample: per-gene Pearson, Spearman and MSE, averaged over the add-on genes, as in Table A.1,
then the test Spearman per add-on gene program of the generator (cell-type markers, hidden
states that core genes show, morphology states that only the H&E shows).

The CPU here cannot train ViT-S/16 (about 4 tiles/s forward alone), so image models use a
small timm VisionTransformer (same 224 px input, 16 px patches, 14 x 14 tokens; depth, width
and heads reduced, see --vit) trained from random initialisation with larger learning rates
than the paper's fine-tuning of pretrained weights; early stopping keeps each model's best
validation epoch. Variants train in parallel processes (--jobs, 1 torch thread each), each
--runs times with consecutive training seeds. Usage:

    python benchmarks/bench_variants.py [--workdir DIR] [--seeds 101 102 103 104 105]
        [--size-mm 2] [--variants ...] [--runs 2] [--jobs 2] [--out DIR] [--ship FILE]

The last seed is the test sample, the one before it the validation sample. Samples and tiles
are kept in --workdir and reused by later runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Subset

from napari_morphomol.models import (
    ModelConfig,
    TrainingSettings,
    evaluate_model,
    save_checkpoint,
    table_markdown,
    train_model,
    variant_table,
    write_variant_table,
)
from napari_morphomol.models.data import open_cohort, tile_sample_folder

BENCH_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
IMAGE_EPOCHS = 60
DEFAULT_VARIANTS = (
    "early_fusion_add",
    "late_fusion_add_token",
    "late_fusion_add_tile",
    "morph_only",
    "expr_only_token",
    "expr_only_tile",
    "min_mae",
)


def image_settings(epochs: int, seed: int) -> TrainingSettings:
    """From-scratch training of the small ViT: higher rates than fine-tuning, short warm-up."""
    return TrainingSettings(lr_head=2e-3, lr_backbone=1e-3, weight_decay=1e-3, max_epochs=epochs, warmup_epochs=1,
                            batch_size=16, accumulate_grad_batches=1, patience=10, seed=seed, precision="32-true")


def expression_settings(epochs: int, seed: int) -> TrainingSettings:
    return TrainingSettings(lr_head=3e-3, lr_backbone=3e-3, weight_decay=1e-3, max_epochs=epochs, warmup_epochs=1,
                            batch_size=32, accumulate_grad_batches=1, patience=8, seed=seed, precision="32-true")


def settings_for(variant: str, args, seed: int) -> TrainingSettings:
    if variant.startswith("expr_only") or variant == "min_mae":
        return expression_settings(args.expression_epochs, seed)
    return image_settings(args.image_epochs, seed)


def make_cohort(workdir: Path, seeds: list[int], size_mm: float) -> list[Path]:
    """One synthetic sample and its tiles store per seed (reused when already in ``workdir``)."""
    from napari_morphomol.synthetic import write_synthetic_sample

    workdir.mkdir(parents=True, exist_ok=True)
    stores = []
    for seed in seeds:
        folder, store = workdir / f"seed{seed}", workdir / f"seed{seed}.tiles.zarr"
        start = time.perf_counter()
        if not folder.exists():
            write_synthetic_sample(folder, size_mm=(size_mm, size_mm), seed=seed)
        if not store.exists():
            tile_sample_folder(folder, store)
        print(f"sample seed {seed}: ready in {time.perf_counter() - start:.0f} s", flush=True)
        stores.append(store)
    return stores


def ship(result, evaluation, args, test_id: str, **test_extras) -> None:
    """Save the model with a card saying how to rebuild it (this script's command line) and how it
    scored on the test sample (``test_extras``: more figures of that sample, e.g. per scale)."""
    from napari_morphomol.synthetic import GENERATOR_VERSION

    card = result.card
    training = {**card.training, "test": {"sample": test_id, "metrics": evaluation.means,
                                          "gene_metrics": evaluation.gene_metrics.reset_index().to_dict(orient="list"),
                                          **test_extras}}
    provenance = {
        **card.provenance,
        "trained_on": f"synthetic samples (napari_morphomol.synthetic, generator version {GENERATOR_VERSION}), "
                      f"seeds {args.seeds}, {args.size_mm} x {args.size_mm} mm; not real tissue",
        "retrain_command": f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:]),
    }
    path = save_checkpoint(result.model, dataclasses.replace(card, training=training, provenance=provenance), args.ship)
    print(f"shipped model written: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def program_table(results: dict[str, list], ground_truth_json: Path) -> str:
    """Mean test Spearman per add-on gene program (from the generator's truth), mean over runs:
    shows which genes each modality predicts."""
    programs = json.loads(ground_truth_json.read_text())["panel"]["addon_programs"]
    group_of = {gene: ("cell type" if p.startswith("type:") else p.partition(":")[2]) for gene, p in programs.items()}
    rows = {}
    for variant, runs in results.items():
        spearman = pd.concat([run["spearman"] for run in runs], axis=1).mean(axis=1)
        rows[variant] = spearman.groupby(spearman.index.map(group_of)).mean()
    table = pd.DataFrame(rows).T
    counts = pd.Series(group_of).value_counts()
    header = "| Variant | " + " | ".join(f"{g} ({counts[g]})" for g in table.columns) + " |"
    lines = [header, "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for v, row in table.iterrows()]
    return "\n".join(lines)


def cohort_splits(stores: list[Path], seeds: list[int]):
    """The cohort and its train / validation / test subsets: the last seed tests, the one before validates."""
    cohort = open_cohort(stores)
    samples = cohort.sample_ids
    ids = {"train": [f"seed{s}" for s in seeds[:-2]], "val": [f"seed{seeds[-2]}"], "test": [f"seed{seeds[-1]}"]}
    subsets = {name: Subset(cohort, [i for i, s in enumerate(samples) if s in members])
               for name, members in ids.items()}
    return cohort, subsets, ids


def train_and_test(job) -> tuple[str, object, str]:
    """One run of one variant, in its own process: train, score on the test sample, ship if asked."""
    variant, seed, args, stores = job
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cohort, subsets, ids = cohort_splits(stores, args.seeds)
    config = ModelConfig(n_core_genes=len(cohort.core_genes), n_addon_genes=len(cohort.addon_genes),
                         variant=variant, backbone_kwargs=args.vit)
    checkpoint = args.out / f"{variant}-seed{seed}.safetensors" if args.out else None
    result = train_model(config, subsets["train"], subsets["val"], core_genes=cohort.core_genes,
                         addon_genes=cohort.addon_genes, settings=settings_for(variant, args, seed),
                         checkpoint_path=checkpoint,
                         data_summary={"train_samples": ids["train"], "val_samples": ids["val"]})
    evaluation = evaluate_model(result.model, subsets["test"], addon_genes=cohort.addon_genes)
    if args.ship and variant == "early_fusion_add" and seed == args.seed:
        ship(result, evaluation, args, ids["test"][0])
    means = evaluation.means
    line = (f"{variant:24s} seed {seed}  test pearson {means['pearson']:.3f} spearman {means['spearman']:.3f} "
            f"mse {means['mse']:.3f}  (best epoch {result.card.training['how'].get('best_epoch', '-')}, "
            f"{time.perf_counter() - start:.0f} s)")
    return variant, evaluation.gene_metrics, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/morphomol-bench-variants"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103, 104, 105])
    parser.add_argument("--size-mm", type=float, default=2.0)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--image-epochs", type=int, default=IMAGE_EPOCHS)
    parser.add_argument("--expression-epochs", type=int, default=60)
    parser.add_argument("--vit", type=json.loads, default=BENCH_VIT, help="timm VisionTransformer kwargs (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the first run")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs per variant (training seeds --seed, --seed + 1, ...); the table gives mean and sd")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="variants trained at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", type=Path, help="folder for table_a1.csv / .md and the checkpoints")
    parser.add_argument("--ship", type=Path, metavar="FILE",
                        help="also write the early_fusion_add model here, its card recording this command and its "
                             "test metrics (how src/napari_morphomol/data/ gets its model)")
    args = parser.parse_args()
    if args.jobs < 1 or args.runs < 1 or args.threads < 1:
        parser.error("--jobs, --runs and --threads take 1 or more")
    if len(args.seeds) < 3:
        parser.error("give at least 3 seeds: training, validation and test samples")
    if args.ship and "early_fusion_add" not in args.variants:
        parser.error("--ship writes the early_fusion_add model: include it in --variants")
    total_start = time.perf_counter()

    stores = make_cohort(args.workdir, args.seeds, args.size_mm)
    cohort, subsets, ids = cohort_splits(stores, args.seeds)
    print("tiles: " + ", ".join(f"{name} {len(subsets[name])} ({', '.join(ids[name])})" for name in subsets)
          + f"; {len(cohort.core_genes)} core, {len(cohort.addon_genes)} add-on genes")
    print(f"image backbone: timm vit_small_patch16_224 architecture with {args.vit} (random init); "
          f"{args.jobs} jobs x {args.threads} threads; cohort ready after {time.perf_counter() - total_start:.0f} s",
          flush=True)

    results = {variant: [] for variant in args.variants}
    jobs = [(variant, args.seed + run, args, stores) for run in range(args.runs) for variant in args.variants]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for variant, gene_metrics, line in pool.map(train_and_test, jobs):
            results[variant].append(gene_metrics)
            print(line, flush=True)

    table = variant_table(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_variant_table(table, args.out / "table_a1", overwrite=True)
    print()
    print(f"Table A.1 on synthetic data: test sample {ids['test'][0]}, {args.runs} run(s) per variant")
    print(table_markdown(table))
    print("Spearman by add-on gene program (number of genes), mean over runs:")
    print(program_table(results, args.workdir / ids["test"][0] / "ground_truth.json"))
    print(f"\ntotal {time.perf_counter() - total_start:.0f} s")


if __name__ == "__main__":
    main()
