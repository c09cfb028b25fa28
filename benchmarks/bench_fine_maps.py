"""Fine maps (issue 14): the add-on panel predicted per token and per cell, against the tile map.

Builds (or reuses) the synthetic cohort of bench_variants.py, trains each variant with the add-on
token head (the paper's tile MSE plus the per-token loss, see docs/models.md), predicts the
held-out test sample with ``morphomol predict``'s core and scores, per variant and token loss:

- at 18, 37, 73, 128 and 256 um (squares of 1, 2, 4, 7 and 14 tokens, wholly covered by tiles):
  mean Spearman and Pearson over the measured add-on genes of log1p(predicted count) against
  log1p(measured count) per square, for the token head (``token``) and for today's baseline
  (``tile``: each tile's predicted count spread evenly over its 196 tokens, averaged where tiles
  overlap), and the tile head itself on its tiles (``tile head @ tiles``);
- per Xenium cell: the same for ``analysis.cells_anndata`` (token at the centroid, scaled by cell
  area) against the cell-feature matrix, and for the baseline spread the same way.

``--compare-stitching RESULTS.zarr`` scores an existing run's token map stitched three ways:
the plain mean of the up to four tiles covering a token (what the product does) and means
weighted toward tile centres (``sin`` and ``sin^2`` windows over the 14 tokens of a tile side),
and its cells two ways: the token at the centroid (what the product does) and the mean over 17
points of the cell's disc (its area as a circle), an approximation of area weighting.

The ceiling, per cell: the generator's noise-free expectation of each cell
(``synthetic.expected_cell_counts``) scored against its measured counts, the best any prediction
can do against counts with Poisson noise; ``cell vs expected`` scores the predictions against that
expectation. (No such ceiling per square: a square's measured counts also hold transcripts that
lie outside their cell's token and extracellular ones, which the per-cell expectation does not
place.) Usage:

    python benchmarks/bench_fine_maps.py [--workdir DIR] [--seeds 101 102 103 104 105] [--size-mm 2]
        [--variants early_fusion_add expr_only_token] [--token-losses poisson mse_log1p] [--jobs 2]
        [--out DIR] [--ship FILE]
    python benchmarks/bench_fine_maps.py --compare-stitching RESULTS.zarr
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
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import bench_variants  # noqa: E402  (the cohort, splits and training settings of Table A.1)

SCALES_UM = {18: 1, 37: 2, 73: 4, 128: 7, 256: 14}
"""Square side in um -> tokens per side (18.3 um tokens of the paper's tiles)."""


def block_log1p(counts: np.ndarray, covered: np.ndarray, k: int) -> np.ndarray:
    """(squares, genes) log1p of the counts summed over each k x k square wholly covered by tiles."""
    rows, cols, genes = counts.shape
    r, c = rows // k * k, cols // k * k
    blocks = counts[:r, :c].reshape(r // k, k, c // k, k, genes).sum(axis=(1, 3))
    whole = covered[:r, :c].reshape(r // k, k, c // k, k).all(axis=(1, 3))
    return np.log1p(blocks[whole])


def scores(predicted_log1p: np.ndarray, measured_log1p: np.ndarray, genes: list[str]) -> dict[str, float]:
    from napari_morphomol.models import mean_metrics, per_gene_metrics

    return mean_metrics(per_gene_metrics(predicted_log1p, measured_log1p, genes))


def token_count_maps(explorer, token_mean=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, genes) expected counts per token from the token head and from the tile head
    spread over its tokens, and the measured counts, for the measured genes; ``token_mean``
    replaces the grid's stitching matrix."""
    from napari_morphomol.analysis.gene_maps import token_head_log1p

    results, grid = explorer.results, explorer.token_grid
    token_mean = grid.token_mean if token_mean is None else token_mean
    columns = [results.addon_genes.index(g) for g in results.measured_genes]
    head = token_head_log1p(results, columns)
    tokens_per_tile = head.shape[1]
    spread = np.repeat((np.expm1(results.predictions[:, columns]) / tokens_per_tile)[:, None, :], tokens_per_tile, 1)
    rows, cols = grid.shape
    token = np.expm1(token_mean @ head.reshape(-1, len(columns))).reshape(rows, cols, -1)
    baseline = (grid.token_mean @ spread.reshape(-1, len(columns))).reshape(rows, cols, -1)
    measured = np.asarray(results.measured_token_counts[...], dtype=np.float64)[:rows, :cols]
    return token, baseline, measured


def cell_scores(explorer, token: np.ndarray, baseline: np.ndarray, expected: pd.DataFrame | None):
    """{"token" | "tile" | "ceiling": metrics} per Xenium cell against the measured counts, and
    (with the generator's ``expected`` counts) the same two against the noise-free expectation."""
    from napari_morphomol.analysis import cells_anndata

    adata = cells_anndata(explorer)
    genes = explorer.results.measured_genes
    measured = adata.layers["measured"][:, adata.var["measured"].to_numpy()]
    scale = adata.obs["cell_area"].to_numpy() / adata.uns["morphomol_cells"]["token_area_um2"]
    index = adata.obs["token"].to_numpy()
    predicted = {name: np.log1p(counts.reshape(-1, counts.shape[-1])[index] * scale[:, None])
                 for name, counts in (("token", token), ("tile", baseline))}
    against_measured = {name: scores(values, measured, genes) for name, values in predicted.items()}
    if expected is None:
        return against_measured, None
    truth = np.log1p(expected.loc[adata.obs_names, genes].to_numpy())
    against_measured["ceiling"] = scores(truth, measured, genes)
    return against_measured, {name: scores(values, truth, genes) for name, values in predicted.items()}


def score_run(results_path: Path, truth_folder: Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{level: {"token" | "tile" | "ceiling": metrics}} for one run against the measured counts,
    with "tile head @ tiles", "cell", and (given the synthetic sample's folder) "... vs expected":
    the predictions against the generator's noise-free expectation; "ceiling" is that expectation
    against the measured counts (per square: the expectation of the cells whose centroid lies in it)."""
    from napari_morphomol.analysis import explore_run
    from napari_morphomol.synthetic import expected_cell_counts

    explorer = explore_run(results_path)
    results = explorer.results
    token, baseline, measured = token_count_maps(explorer)
    covered, genes = explorer.token_grid.covered, results.measured_genes
    expected = None if truth_folder is None else expected_cell_counts(truth_folder, genes)
    table = {}
    for side_um, k in SCALES_UM.items():
        truth = block_log1p(measured, covered, k)
        table[f"{side_um} um"] = {name: scores(block_log1p(counts, covered, k), truth, genes)
                                  for name, counts in (("token", token), ("tile", baseline))}
    table["tile head @ tiles"] = {"tile": scores(results.predictions[:, [results.addon_genes.index(g) for g in genes]],
                                                 results.measured_log1p, genes)}
    table["cell"], vs_expected = cell_scores(explorer, token, baseline, expected)
    if vs_expected is not None:
        table["cell vs expected"] = vs_expected
    return table


def compare_stitching(results_path: Path) -> None:
    """Spearman per scale of one run's token map, stitched with and without tile-centre weights."""
    import scipy.sparse as sp

    from napari_morphomol.analysis import explore_run

    explorer = explore_run(results_path)
    grid, n_tiles = explorer.token_grid, len(explorer.results.tiles)
    cover = grid.token_mean.copy()
    cover.data[:] = 1.0
    side = np.arange(int(round(np.sqrt(cover.shape[1] // n_tiles))))
    window = np.sin(np.pi * (side + 0.5) / len(side))
    print(f"stitching of {results_path}: mean Spearman over measured genes per square side")
    for name, per_side in (("mean", np.ones_like(window)), ("sin", window), ("sin^2", window**2)):
        weighted = cover @ sp.diags(np.tile(np.outer(per_side, per_side).ravel(), n_tiles))
        total = np.asarray(weighted.sum(axis=1)).ravel()
        token_mean = sp.diags(np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)) @ weighted
        token, _, measured = token_count_maps(explorer, token_mean)
        figures = []
        for side_um, k in SCALES_UM.items():
            truth = block_log1p(measured, grid.covered, k)
            spearman = scores(block_log1p(token, grid.covered, k), truth, explorer.results.measured_genes)["spearman"]
            figures.append(f"{side_um} um {spearman:.4f}")
        print(f"  {name:6s} " + "; ".join(figures))
    compare_cell_sampling(explorer)


def compare_cell_sampling(explorer) -> None:
    """Per-cell Spearman with the centroid's token and with the mean over points of the cell's disc."""
    from napari_morphomol.analysis import cells_anndata
    from napari_morphomol.analysis.cells import cell_tokens

    token, _, _ = token_count_maps(explorer)
    per_token = token.reshape(-1, token.shape[-1])
    adata = cells_anndata(explorer)
    measured = adata.layers["measured"][:, adata.var["measured"].to_numpy()]
    scale = adata.obs["cell_area"].to_numpy() / adata.uns["morphomol_cells"]["token_area_um2"]
    radius = np.sqrt(adata.obs["cell_area"].to_numpy() / np.pi)
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    offsets = [(0.0, 0.0)] + [(f * np.cos(a), f * np.sin(a)) for f in (0.5, 0.9) for a in angles]
    total, n = np.zeros((adata.n_obs, per_token.shape[1])), np.zeros(adata.n_obs)
    for dx, dy in offsets:
        index = cell_tokens(explorer, adata.obsm["spatial"] + np.stack([dx * radius, dy * radius], axis=1))
        ok = index >= 0
        total[ok] += per_token[index[ok]]
        n[ok] += 1
    genes = explorer.results.measured_genes
    centroid = scores(np.log1p(per_token[adata.obs["token"].to_numpy()] * scale[:, None]), measured, genes)
    disc = scores(np.log1p(total / np.maximum(n, 1)[:, None] * scale[:, None]), measured, genes)
    print(f"cells ({adata.n_obs}): Spearman centroid {centroid['spearman']:.4f}, disc of 17 points "
          f"{disc['spearman']:.4f}")


def train_predict_score(job) -> tuple[str, dict, str]:
    """One variant and token loss, in its own process: train with the token head, predict the test
    sample, score its maps."""
    import torch

    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io import open_sample
    from napari_morphomol.models import ADDON_TOKEN_HEAD, ModelConfig, evaluate_model, train_model

    variant, loss, args, stores = job
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cohort, subsets, ids = bench_variants.cohort_splits(stores, args.seeds)
    config = ModelConfig(n_core_genes=len(cohort.core_genes), n_addon_genes=len(cohort.addon_genes), variant=variant,
                         backbone_kwargs=args.vit, token_heads={ADDON_TOKEN_HEAD: len(cohort.addon_genes)})
    settings = dataclasses.replace(bench_variants.settings_for(variant, args, args.seed), token_loss=loss)
    name = f"{variant}-{loss}"
    checkpoint = args.workdir / "fine-maps" / f"{name}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    result = train_model(config, subsets["train"], subsets["val"], core_genes=cohort.core_genes,
                         addon_genes=cohort.addon_genes, settings=settings, checkpoint_path=checkpoint)
    trained_s = time.perf_counter() - start
    test_folder = args.workdir / ids["test"][0]
    store = checkpoint.with_suffix(".results.zarr")
    predict(open_sample(test_folder), PredictOptions(checkpoint=checkpoint, store=store, device="cpu", dtype="float32",
                                                     overwrite=True))
    table = score_run(store, test_folder)
    if args.ship and (variant, loss) == ("early_fusion_add", "poisson"):
        evaluation = evaluate_model(result.model, subsets["test"], addon_genes=cohort.addon_genes)
        bench_variants.ship(result, evaluation, args, ids["test"][0], fine_maps=table,
                            token_metrics=evaluation.token_means, token_sum_metrics=evaluation.token_sum_means)
    better = result.card.training["better_tile_estimate"]
    line = (f"{name}: trained in {trained_s:.0f} s (best epoch {result.card.training['how'].get('best_epoch')}), "
            f"validation per token spearman {result.validation.token_means['spearman']:.3f}; better tile estimate on "
            f"validation: {better}; total {time.perf_counter() - start:.0f} s")
    return name, table, line


def markdown(tables: dict[str, dict]) -> str:
    """One row per model and level: Spearman of the token head, the baseline and their gain, Pearson
    of both, and the ceiling (the generator's noise-free expectation against the measured counts)."""
    lines = ["| model | level | token head Spearman | baseline Spearman | gain | token head Pearson "
             "| baseline Pearson | ceiling Spearman |", "|---|---|---|---|---|---|---|---|"]

    def figure(entry, name, metric):
        return f"{entry[name][metric]:.3f}" if name in entry else ""

    for name, table in tables.items():
        for level, entry in table.items():
            gain = f"{entry['token']['spearman'] - entry['tile']['spearman']:+.3f}" if "token" in entry else ""
            lines.append(f"| {name} | {level} | {figure(entry, 'token', 'spearman')} | "
                         f"{figure(entry, 'tile', 'spearman')} | {gain} | {figure(entry, 'token', 'pearson')} | "
                         f"{figure(entry, 'tile', 'pearson')} | {figure(entry, 'ceiling', 'spearman')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/morphomol-bench-variants"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103, 104, 105])
    parser.add_argument("--size-mm", type=float, default=2.0)
    parser.add_argument("--variants", nargs="+", default=["early_fusion_add", "expr_only_token"])
    parser.add_argument("--token-losses", nargs="+", default=["poisson", "mse_log1p"], choices=["poisson", "mse_log1p"])
    parser.add_argument("--image-epochs", type=int, default=bench_variants.IMAGE_EPOCHS)
    parser.add_argument("--expression-epochs", type=int, default=60)
    parser.add_argument("--vit", type=json.loads, default=bench_variants.BENCH_VIT)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", type=Path, help="write fine_maps.json and fine_maps.md here")
    parser.add_argument("--compare-stitching", type=Path, metavar="RESULTS.zarr",
                        help="only score this run's token map stitched with and without tile-centre weights")
    parser.add_argument("--ship", type=Path, metavar="FILE",
                        help="save the early_fusion_add model with the Poisson token head here, its card holding this "
                             "command and its test figures per scale (the shipped model)")
    args = parser.parse_args()
    if args.compare_stitching:
        compare_stitching(args.compare_stitching)
        return
    start = time.perf_counter()
    stores = bench_variants.make_cohort(args.workdir, args.seeds, args.size_mm)
    jobs = [(variant, loss, args, stores) for variant in args.variants for loss in args.token_losses]
    tables = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, table, line in pool.map(train_predict_score, jobs):
            print(line, flush=True)
            tables[name] = table
    text = markdown(tables)
    print(f"\nheld-out sample seed {args.seeds[-1]}, measured add-on genes; squares wholly covered by tiles "
          f"({time.perf_counter() - start:.0f} s in all)\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fine_maps.json").write_text(json.dumps(tables, indent=1))
        (args.out / "fine_maps.md").write_text(text + "\n")
    print(pd.Timestamp.now().isoformat(timespec="seconds"))


if __name__ == "__main__":
    main()
