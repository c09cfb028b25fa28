"""Trust: are the intervals honest, and does the out-of-distribution flag find unfamiliar tissue?

The Table A.1 cohort of ``bench_variants.py`` (train 101-103, early stopping on 104), plus two
calibration samples (seeds 106, 107) and the held-out test sample (seed 105). The early-fusion
model with the add-on token head (Poisson) and a variance head, trained with modality dropout
(--modality-dropout, the rate ``bench_routes.py`` picked, so it also predicts from an H&E alone),
is trained three times (training seeds 0, 1, 2), each calibrated on seeds 106 and 107
(:func:`napari_morphomol.models.trust.fit_calibration`, as ``morphomol train --calibration``).

Intervals, tile scale, three spreads each calibrated split-conformally on seeds 106 and 107 and
scored on seed 105 (nominal 90 %): the variance head of one model (what ships), the spread of the three
models' means (a deep ensemble) and both (ensemble variance + mean variance-head variance).
Printed per spread: empirical coverage (mean over genes, worst gene), mean width beside the mean
width of a constant per-gene interval with the same coverage on the test tiles, and the AUROC of
the spread for finding the 10 % largest absolute errors (over all tile x gene predictions, and
the mean of per-gene AUROCs). Token scale: the model predicts seed 105 end to end (``predict``),
and its stitched 18 um token map is scored with the card's token-scale quantiles (counts per
token, Poisson spread); per cell with the same quantiles (cell rate = token rate x cell area).

"One model" (the variance head row, the fine scales, the flags and --ship) is the training seed
with the best validation Spearman (chosen on the early-stopping sample, never on the test one).
Out-of-distribution flag of that model, on both inputs and on the H&E alone (the image-only
route, with its own quantiles and threshold): the fraction of tiles flagged on seed 105 as
generated, and on seed 105 made with a stain no cohort sample has, with a sarcomatoid tumour
(spindle tumour cells, a form no cohort tumour has) and with its recorded registration shifted
by 50 um (``napari_morphomol.synthetic.plan.DatasetShift``). Usage:

    python benchmarks/bench_trust.py [--workdir DIR] [--jobs 2] [--ship FILE] [--out DIR]

Samples and tiles are kept in --workdir (shared with bench_variants.py) and reused.
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

TRAIN, VAL, CALIBRATION, TEST = [101, 102, 103], 104, [106, 107], 105
SHIFTS = {
    "same generator": {},
    "unseen stain": {"stain": "unseen"},
    "sarcomatoid tumour": {"tissue": "sarcomatoid"},
    "registration +50 um": {"registration_offset_um": (50.0, 0.0)},
}
LEVEL = 0.9
SHIPPED_MODALITY_DROPOUT = 0.2
"""The modality dropout of the shipped model: the highest rate of ``bench_routes.py`` whose fused
route stays within 0.01 mean Spearman of the model trained without it (docs/models.md)."""


def make_samples(workdir: Path, size_mm: float) -> dict[str, Path]:
    """Tiles stores of the cohort, the calibration sample and the shifted test samples (reused when present)."""
    from napari_morphomol.models.data import tile_sample_folder
    from napari_morphomol.synthetic import write_synthetic_sample
    from napari_morphomol.synthetic.plan import DatasetShift

    stores = dict(zip([f"seed{s}" for s in [*TRAIN, VAL, TEST, *CALIBRATION]],
                      bench_variants.make_cohort(workdir, [*TRAIN, VAL, TEST, *CALIBRATION], size_mm)))
    for name, shift in SHIFTS.items():
        if not shift:
            continue
        folder = workdir / f"seed{TEST}-{name.split()[0].lower().strip('+')}"
        store = folder.with_name(folder.name + ".tiles.zarr")
        if not folder.exists():
            write_synthetic_sample(folder, size_mm=(size_mm, size_mm), seed=TEST, shift=DatasetShift(**shift))
        if not store.exists():
            tile_sample_folder(folder, store)
        stores[name] = store
    stores["same generator"] = stores[f"seed{TEST}"]
    return stores


def train_one(job) -> tuple[int, Path, str]:
    """One calibrated model (training seed ``seed``) in its own process; a model already in
    --workdir is calibrated again (what calibration does may have changed since it was trained)."""
    import torch
    from torch.utils.data import Subset

    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelConfig, load_checkpoint, save_checkpoint, train_model
    from napari_morphomol.models.data import open_cohort
    from napari_morphomol.models.training import refit_variance_head
    from napari_morphomol.models.trust import fit_calibration

    seed, args, stores = job
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    calibration_ids = [f"seed{s}" for s in CALIBRATION]
    cohort = open_cohort([stores[f"seed{s}"] for s in [*TRAIN, VAL, *CALIBRATION]])
    subset = {name: Subset(cohort, [i for i, s in enumerate(cohort.sample_ids) if s in members])
              for name, members in (("train", [f"seed{s}" for s in TRAIN]), ("val", [f"seed{VAL}"]),
                                    ("calibration", calibration_ids))}
    dropout = args.modality_dropout
    checkpoint = args.workdir / "trust" / f"early_fusion_add-variance-dropout{dropout:g}-seed{seed}.safetensors"
    if checkpoint.exists() and not args.retrain:
        model, card = load_checkpoint(checkpoint)
        model = refit_variance_head(model, subset["val"])
        model, calibration = fit_calibration(model, subset["calibration"], subset["train"],
                                             samples=tuple(calibration_ids))
        save_checkpoint(model, dataclasses.replace(card, model=model.config, calibration=calibration), checkpoint)
        line = f"seed {seed}: variance head refit and calibrated again"
    else:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        config = ModelConfig(n_core_genes=len(cohort.core_genes), n_addon_genes=len(cohort.addon_genes),
                             backbone_kwargs=args.vit, token_heads={ADDON_TOKEN_HEAD: len(cohort.addon_genes)},
                             variance_head=True, unimodal_inputs=dropout > 0)
        settings = dataclasses.replace(bench_variants.image_settings(args.image_epochs, seed),
                                       modality_dropout=dropout)
        result = train_model(config, subset["train"], subset["val"], core_genes=cohort.core_genes,
                             addon_genes=cohort.addon_genes, settings=settings,
                             checkpoint_path=checkpoint, calibration_dataset=subset["calibration"],
                             calibration_samples=calibration_ids,
                             data_summary={"train_samples": [f"seed{s}" for s in TRAIN],
                                           "val_samples": [f"seed{VAL}"]})
        line = (f"seed {seed}: trained and calibrated (best epoch {result.card.training['how']['best_epoch']}, "
                f"validation spearman {result.validation.means['spearman']:.3f})")
    calibrate_on_calibration_runs(checkpoint, args.workdir)
    line += f", calibrated on runs of {', '.join(calibration_ids)}; {time.perf_counter() - start:.0f} s"
    return seed, checkpoint, line


def calibrate_on_calibration_runs(checkpoint: Path, workdir: Path) -> None:
    """Predict the calibration samples end to end and calibrate the checkpoint on those runs
    (stitched tokens and cells included), as ``morphomol calibrate`` does."""
    from napari_morphomol.analysis import explore_run
    from napari_morphomol.analysis.calibration import calibrate_on_runs
    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io import open_sample
    from napari_morphomol.models import load_checkpoint, save_checkpoint

    explorers = []
    for sample in CALIBRATION:
        store = checkpoint.with_name(f"{checkpoint.stem}-seed{sample}.results.zarr")
        predict(open_sample(workdir / f"seed{sample}"), PredictOptions(checkpoint=checkpoint, store=store, device="cpu",
                                                                       dtype="float32", overwrite=True))
        explorers.append(explore_run(store))
    model, card = load_checkpoint(checkpoint)
    calibration = calibrate_on_runs(explorers, card, [f"seed{s}" for s in CALIBRATION])
    save_checkpoint(model, dataclasses.replace(card, calibration=calibration), checkpoint)


def outputs(checkpoint: Path, store: Path, route: str | None = None) -> dict[str, np.ndarray]:
    """Predictions, log variances, outlier scores and targets of every tile of a tiles store, the
    model given the inputs of ``route`` (None: all it reads)."""
    from napari_morphomol.models import load_checkpoint
    from napari_morphomol.models.data import TileDataset
    from napari_morphomol.models.training import model_outputs

    model, _ = load_checkpoint(checkpoint)
    got: dict[str, list] = {}
    for batch, arrays in model_outputs(model, TileDataset.from_store(store), route=route):
        arrays["targets"] = batch["target"].numpy()
        for name in ("predictions", "prediction_log_variance", "outlier_score", "targets"):
            got.setdefault(name, []).append(arrays[name])
    return {name: np.concatenate(parts) for name, parts in got.items()}


def interval_figures(half_width: np.ndarray, errors: np.ndarray, spread: np.ndarray,
                     calibration_errors: np.ndarray | None = None) -> dict[str, float]:
    """Coverage (mean, worst gene), mean width beside a constant per-gene interval of the same
    coverage on the test tiles (an oracle: each gene's constant is chosen on the test errors), and
    the AUROC of ``spread`` for the 10 % largest absolute ``errors``; with ``calibration_errors``
    also the coverage and width of the constant per-gene split-conformal interval calibrated on them."""
    from sklearn.metrics import roc_auc_score

    from napari_morphomol.models.trust import conformal_quantiles, level_index

    covered = errors <= half_width
    coverage = covered.mean(axis=0)
    constant = np.array([np.quantile(errors[:, g], coverage[g]) for g in range(errors.shape[1])])
    largest = errors >= np.quantile(errors, 0.9)
    per_gene = [roc_auc_score(errors[:, g] >= np.quantile(errors[:, g], 0.9), spread[:, g])
                for g in range(errors.shape[1]) if 0 < (errors[:, g] >= np.quantile(errors[:, g], 0.9)).sum()
                < len(errors) and np.ptp(errors[:, g]) > 0]
    figures = {"coverage_mean": float(coverage.mean()), "coverage_worst": float(coverage.min()),
               "width_mean": float(2 * half_width.mean()), "constant_width_mean": float(2 * constant.mean()),
               "auroc": float(roc_auc_score(largest.ravel(), spread.ravel())),
               "auroc_gene_mean": float(np.mean(per_gene))}
    if calibration_errors is not None:
        q = conformal_quantiles(calibration_errors)[level_index(LEVEL)]
        figures.update(conformal_constant_coverage=float((errors <= q).mean()),
                       conformal_constant_width=float(2 * q.mean()))
    return figures


def tile_intervals(members: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """The three spreads at the tile scale: calibrated on seeds 106 and 107, scored on seed 105."""
    from napari_morphomol.models.trust import conformal_quantiles, level_index, tile_spread

    def spreads(runs: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        means = np.stack([r["predictions"] for r in runs])
        head_variance = np.stack([tile_spread(r["prediction_log_variance"]) ** 2 for r in runs])
        ensemble_variance = means.var(axis=0, ddof=1) + 1e-8
        return {"variance head (one model)": (runs[0]["predictions"], np.sqrt(head_variance[0])),
                "ensemble of 3 (spread of means)": (means.mean(axis=0), np.sqrt(ensemble_variance)),
                "both (ensemble + mean head variance)": (means.mean(axis=0),
                                                          np.sqrt(ensemble_variance + head_variance.mean(axis=0)))}

    calibration = spreads([m["calibration"] for m in members])
    test = spreads([m["test"] for m in members])
    targets = {"calibration": members[0]["calibration"]["targets"], "test": members[0]["test"]["targets"]}
    table = {}
    for name in calibration:
        mean, sigma = calibration[name]
        q = conformal_quantiles(np.abs(targets["calibration"] - mean) / sigma)[level_index(LEVEL)]
        calibration_errors = np.abs(targets["calibration"] - mean)
        mean, sigma = test[name]
        table[name] = interval_figures(q * sigma, np.abs(targets["test"] - mean), sigma, calibration_errors)
    return table


def token_and_cell_intervals(checkpoint: Path, workdir: Path) -> dict[str, dict[str, float]]:
    """The card's token-scale quantiles on seed 105's stitched token map and its cells."""
    import bench_fine_maps
    from napari_morphomol.analysis import cells_anndata, explore_run
    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io import open_sample
    from napari_morphomol.models import read_model_card
    from napari_morphomol.models.trust import token_spread

    store = checkpoint.with_suffix(".results.zarr")
    predict(open_sample(workdir / f"seed{TEST}"), PredictOptions(checkpoint=checkpoint, store=store, device="cpu",
                                                                  dtype="float32", overwrite=True))
    explorer = explore_run(store)
    results = explorer.results
    columns = [results.addon_genes.index(g) for g in results.measured_genes]
    calibration = read_model_card(checkpoint).calibration
    q = calibration.quantile("token", LEVEL)[columns]
    q_cell = calibration.quantile("cell", LEVEL)[columns]
    full_rate, _, measured = bench_fine_maps.token_count_maps(explorer)
    covered = explorer.token_grid.covered
    rate, measured = full_rate[covered], measured[covered]
    table = {"token (18 um)": interval_figures(q * token_spread(rate), np.abs(measured - rate), token_spread(rate))}
    adata = cells_anndata(explorer)
    cell_measured = adata.layers["measured"][:, adata.var["measured"].to_numpy()]
    scale = adata.obs["cell_area"].to_numpy() / adata.uns["morphomol_cells"]["token_area_um2"]
    cell_rate = full_rate.reshape(-1, len(columns))[adata.obs["token"].to_numpy()] * scale[:, None]
    cell_errors = np.abs(np.expm1(cell_measured) - cell_rate)
    spread = token_spread(cell_rate)
    table["cell (token quantiles)"] = interval_figures(q * spread, cell_errors, spread)
    table["cell (cell quantiles)"] = interval_figures(q_cell * spread, cell_errors, spread)
    return table


def he_alone_intervals(checkpoint: Path, stores: dict[str, Path]) -> dict[str, dict[str, float]]:
    """The image-only route (an H&E alone) on seed 105, with the card's quantiles of that route."""
    from napari_morphomol.models import read_model_card
    from napari_morphomol.models.trust import tile_spread

    calibration = read_model_card(checkpoint).calibration.routes["image"]
    test = outputs(checkpoint, stores[f"seed{TEST}"], route="image")
    sigma = tile_spread(test["prediction_log_variance"])
    return {"variance head, H&E alone": interval_figures(calibration.quantile("tile", LEVEL) * sigma,
                                                         np.abs(test["targets"] - test["predictions"]), sigma)}


def outlier_figures(checkpoint: Path, stores: dict[str, Path], route: str | None = None
                    ) -> dict[str, dict[str, float]]:
    """Fraction of tiles flagged, and the median outlier score, for each test sample, on ``route``
    (None: every input) with that route's threshold."""
    from napari_morphomol.models import read_model_card

    card = read_model_card(checkpoint)
    outliers = card.calibration.for_route(route, card.model.default_route).outliers
    table = {}
    for name in SHIFTS:
        scores = outputs(checkpoint, stores[name], route)["outlier_score"][:, 0]
        table[name] = {"flagged": float((scores > outliers.threshold).mean()), "median_score": float(np.median(scores)),
                       "tiles": int(len(scores))}
    table["threshold"] = {"score": outliers.threshold, "level": outliers.threshold_level}
    return table


def markdown(tiles: dict, fine: dict, flags: dict, he_alone: dict | None = None) -> str:
    lines = ["| spread | scale | coverage (mean) | coverage (worst gene) | mean width | constant interval, same "
             "coverage (oracle) | constant conformal interval: coverage, width | AUROC, 10 % largest errors | "
             "AUROC per gene (mean) |", "|---" * 9 + "|"]
    for scale, table in (("tile (256 um)", tiles), ("", fine)):
        for name, f in table.items():
            label, where = (name, scale) if scale else ("variance head model, Poisson token spread", name)
            constant = (f"{f['conformal_constant_coverage']:.3f}, {f['conformal_constant_width']:.3f}"
                        if "conformal_constant_width" in f else "")
            lines.append(f"| {label} | {where} | {f['coverage_mean']:.3f} | {f['coverage_worst']:.3f} | "
                         f"{f['width_mean']:.3f} | {f['constant_width_mean']:.3f} | {constant} | {f['auroc']:.3f} | "
                         f"{f['auroc_gene_mean']:.3f} |")
    for name, f in (he_alone or {}).get("tile", {}).items():
        lines.append(f"| {name} | tile (256 um) | {f['coverage_mean']:.3f} | {f['coverage_worst']:.3f} | "
                     f"{f['width_mean']:.3f} | {f['constant_width_mean']:.3f} |  | {f['auroc']:.3f} | "
                     f"{f['auroc_gene_mean']:.3f} |")
    routes = {"H&E + transcripts": flags, **({"H&E alone": he_alone["outliers"]} if he_alone else {})}
    lines += ["", "| test sample | route | tiles | flagged | median outlier score |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {route} | {f['tiles']} | {f['flagged']:.1%} | {f['median_score']:.2f} |"
              for route, table in routes.items() for name, f in table.items() if name != "threshold"]
    for route, table in routes.items():
        t = table["threshold"]
        lines.append(f"\n{route}: threshold {t['score']:.2f} (the {t['level']:.0%} quantile of the calibration "
                     "samples' tiles)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/morphomol-bench-variants"))
    parser.add_argument("--size-mm", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the ensemble")
    parser.add_argument("--image-epochs", type=int, default=bench_variants.IMAGE_EPOCHS)
    parser.add_argument("--vit", type=json.loads, default=bench_variants.BENCH_VIT)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", type=Path, help="write trust.json and trust.md here")
    parser.add_argument("--modality-dropout", type=float, default=SHIPPED_MODALITY_DROPOUT,
                        help="fraction of training batches that lose one modality (default "
                             f"{SHIPPED_MODALITY_DROPOUT}, the rate bench_routes.py picked; 0: both inputs always)")
    parser.add_argument("--retrain", action="store_true", help="train again even where --workdir has the models")
    parser.add_argument("--ship", type=Path, metavar="FILE",
                        help="save the best validation seed's calibrated model here, its card holding this command "
                             "and the test figures (the shipped model)")
    args = parser.parse_args()
    from napari_morphomol.models import read_model_card

    start = time.perf_counter()
    stores = make_samples(args.workdir, args.size_mm)
    print(f"samples ready in {time.perf_counter() - start:.0f} s", flush=True)
    checkpoints = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for seed, checkpoint, line in pool.map(train_one, [(seed, args, stores) for seed in args.seeds]):
            print(line, flush=True)
            checkpoints[seed] = checkpoint
    # the one model of the single-model rows and of --ship: the best validation run of the three
    # (chosen on the early-stopping sample, never on the test sample)
    validation = {seed: read_model_card(path).training["validation_metrics"]["spearman"]
                  for seed, path in checkpoints.items()}
    best = max(validation, key=validation.get)
    print("validation spearman by training seed: " + ", ".join(f"{s}: {v:.3f}" for s, v in validation.items())
          + f"; seed {best} is the one model", flush=True)
    first = checkpoints[best]
    members = []
    for seed in sorted(args.seeds, key=lambda s: s != best):  # the one model first
        calibration = [outputs(checkpoints[seed], stores[f"seed{sample}"]) for sample in CALIBRATION]
        joined = {name: np.concatenate([c[name] for c in calibration]) for name in calibration[0]}
        members.append({"calibration": joined, "test": outputs(checkpoints[seed], stores[f"seed{TEST}"])})
    tiles = tile_intervals(members)
    fine = token_and_cell_intervals(first, args.workdir)
    flags = outlier_figures(first, stores)
    he_alone = None
    if "image" in read_model_card(first).calibration.routes:
        he_alone = {"tile": he_alone_intervals(first, stores), "outliers": outlier_figures(first, stores, "image")}
    text = markdown(tiles, fine, flags, he_alone)
    print(f"\nheld-out sample seed {TEST}, nominal {LEVEL:.0%} intervals calibrated on seeds {CALIBRATION} "
          f"({time.perf_counter() - start:.0f} s in all)\n")
    print(text)
    figures = {"tile": tiles, "fine": fine, "outliers": flags, "he_alone": he_alone}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trust.json").write_text(json.dumps(figures, indent=1))
        (args.out / "trust.md").write_text(text + "\n")
    if args.ship:
        ship(first, args, figures, stores)


def ship(checkpoint: Path, args, figures: dict, stores: dict[str, Path]) -> None:
    """The one model (best validation seed), calibrated, with this command and its test figures in its card: the
    tile metrics, the fine maps' per scale (``bench_fine_maps.score_run``) and the trust figures."""
    import shlex

    import bench_fine_maps
    from napari_morphomol.models import evaluate_model, load_checkpoint, save_checkpoint
    from napari_morphomol.models.data import TileDataset
    from napari_morphomol.synthetic import GENERATOR_VERSION

    model, card = load_checkpoint(checkpoint)
    test_tiles = TileDataset.from_store(stores[f"seed{TEST}"])
    evaluation = evaluate_model(model, test_tiles, addon_genes=card.addon_genes)
    routes = {route: evaluate_model(model, test_tiles, addon_genes=card.addon_genes, route=route).means
              for route in model.config.routes}
    fine_maps = bench_fine_maps.score_run(checkpoint.with_suffix(".results.zarr"), args.workdir / f"seed{TEST}")
    training = {**card.training, "test": {"sample": f"seed{TEST}", "metrics": evaluation.means,
                                          "gene_metrics": evaluation.gene_metrics.reset_index().to_dict(orient="list"),
                                          "token_metrics": evaluation.token_means, "fine_maps": fine_maps,
                                          "route_metrics": routes,
                                          "trust": figures}}
    provenance = {**card.provenance,
                  "trained_on": "synthetic samples (napari_morphomol.synthetic, generator version "
                                f"{GENERATOR_VERSION}), seeds {TRAIN} (train), {VAL} (early stopping), "
                                f"{CALIBRATION} (calibration), "
                                f"{args.size_mm} x {args.size_mm} mm; not real tissue",
                  "retrain_command": f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:])}
    path = save_checkpoint(model, dataclasses.replace(card, training=training, provenance=provenance), args.ship)
    print(f"shipped model written: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
