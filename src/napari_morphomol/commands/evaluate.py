"""Score trained models on held-out samples: per-gene metrics and the Table A.1 comparison.

Each CHECKPOINT predicts every tile of --data (tiles stores or sample folders, tiled into --work
with the model's own gene panel), in the model's gene order. Per gene: Pearson and Spearman over
tiles, and MSE of log1p tile totals. Writes OUT.csv and OUT.md with one row per variant (mean
over the add-on genes; several checkpoints of one variant, e.g. seeds or folds, give mean ± sd)
and OUT_genes.csv with every gene of every checkpoint; prints the per-gene metrics and the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_morphomol.commands._arguments import whole_number

NAME = "evaluate"
HELP = "per-gene metrics and the Table A.1 comparison of checkpoints on held-out samples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="model .safetensors files")
    parser.add_argument("--data", nargs="+", required=True, metavar="DATA",
                        help="tiles stores (.zarr) or sample folders to score on (held out from training)")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="path stem of the tables: writes OUT.csv, OUT.md and OUT_genes.csv")
    parser.add_argument("--work", metavar="DIR", help="where sample folders are tiled (default: beside OUT)")
    parser.add_argument("--batch-size", type=whole_number(1), default=64, help="tiles per forward pass (default 64)")
    parser.add_argument("--route", choices=("both", "image", "transcripts"),
                        help="what each model is given: both inputs, the H&E alone or the transcripts alone (a fusion "
                             "model trained with --modality-dropout runs all three); default: every input it reads")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace tables that an earlier evaluate wrote at OUT (never other files)")
    parser.add_argument("--genes", type=whole_number(0), default=20, metavar="N",
                        help="per-gene lines printed per checkpoint, best and worst by Pearson (default 20; 0 = all)")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from napari_morphomol._atomic import guard_output, guard_output_folder, refuse_among_inputs, write_text_atomic
    from napari_morphomol.models import (
        check_tile_geometry,
        evaluate_model,
        load_checkpoint,
        table_markdown,
        variant_table,
    )
    from napari_morphomol.models.data import open_cohort, tiles_stores_for
    from napari_morphomol.models.metrics import (
        GENE_TABLE_CSV,
        VARIANT_TABLE_CSV,
        VARIANT_TABLE_MARKDOWN,
        write_variant_table,
    )
    from napari_morphomol.tiling import GenePanel

    stem = Path(args.out)
    inputs = [*args.checkpoints, *args.data]
    refuse_among_inputs(stem, inputs)  # the stem itself too, though only OUT.csv, OUT.md, OUT_genes.csv are written
    genes_path = stem.with_name(stem.name + "_genes.csv")
    for path, kind in ((stem.with_name(stem.name + ".csv"), VARIANT_TABLE_CSV),
                       (stem.with_name(stem.name + ".md"), VARIANT_TABLE_MARKDOWN), (genes_path, GENE_TABLE_CSV)):
        guard_output(path, kind, inputs=inputs, overwrite=args.overwrite)  # also: the folder of OUT exists
    work = guard_output_folder(args.work if args.work else stem.parent / "tiles", inputs=inputs)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    per_variant: dict[str, list] = {}
    gene_tables = []
    for path in args.checkpoints:
        model, card = load_checkpoint(path)
        panel = GenePanel(core=card.core_genes, addon=card.addon_genes)
        stores = tiles_stores_for(args.data, work_dir=work, panel=panel, progress=say)
        cohort = open_cohort(stores, core_genes=card.core_genes, addon_genes=card.addon_genes)
        for sample in cohort.samples:
            check_tile_geometry(card, sample.store.geometry)
        evaluation = evaluate_model(model, cohort, addon_genes=card.addon_genes, batch_size=args.batch_size,
                                    route=args.route)
        variant = card.model.variant if args.route is None else f"{card.model.variant} ({args.route})"
        per_variant.setdefault(variant, []).append(evaluation.gene_metrics)
        genes = evaluation.gene_metrics.reset_index()
        genes.insert(0, "checkpoint", str(path))
        genes.insert(1, "variant", variant)
        gene_tables.append(genes)
        means = evaluation.means
        print(f"\n{path} ({variant}) on {', '.join(s.sample_id for s in cohort.samples)}, {len(cohort)} tiles: "
              f"pearson {means['pearson']:.3f} spearman {means['spearman']:.3f} mse {means['mse']:.4f} "
              f"({means['n_genes_correlated']} of {means['n_genes']} genes vary)")
        ranked = evaluation.gene_metrics.sort_values("pearson", ascending=False)
        if args.genes and len(ranked) > 2 * args.genes:
            ranked = pd.concat([ranked.head(args.genes), ranked.tail(args.genes)])
        print(ranked.to_string(float_format=lambda v: f"{v:.3f}"))

    table = variant_table(per_variant)
    csv_path, markdown_path = write_variant_table(table, stem, overwrite=args.overwrite, inputs=inputs)
    write_text_atomic(genes_path, pd.concat(gene_tables).to_csv(index=False), GENE_TABLE_CSV, inputs=inputs,
                      overwrite=args.overwrite)
    print()
    print(table_markdown(table))
    print(f"wrote {csv_path}, {markdown_path}, {genes_path}")
    return 0
