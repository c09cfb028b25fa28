"""Train models of the paper's family on one's own cohort, split by sample.

DATA are tiles stores (`morphomol tiles`) or sample folders (Xenium bundle with its aligned
H&E, e.g. from `morphomol synth`; tiled into --work with their panel.json or --panel). Whole
samples go to training, validation (early stopping) and test: name them with --val/--test or
draw them with --val-fraction/--test-fraction. Each --variants entry is trained and written to
OUT/VARIANT.safetensors (weights + model card); OUT/split.json records the samples of each
split, for `morphomol evaluate OUT/*.safetensors --data <test samples>`. H&E tiles are decoded
once into a NAME.images.zarr beside each store.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

from napari_morphomol._atomic import guard_output, guard_output_folder, json_file_kind, write_text_atomic
from napari_morphomol.commands._arguments import fraction, real_number, whole_number
from napari_morphomol.errors import InputError

NAME = "train"
HELP = "train fusion / baseline models on tiles stores or sample folders -> OUT/VARIANT.safetensors"
SPLIT_FORMAT = "napari-morphomol.split/1"
SPLIT_JSON = json_file_kind("train split record", "format", SPLIT_FORMAT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from napari_morphomol.models.config import BACKBONE_KWARGS, DEFAULT_BACKBONE, DEFAULT_VARIANT, VARIANTS

    parser.add_argument("data", nargs="+", metavar="DATA", help="tiles stores (.zarr) or sample folders")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder for checkpoints and split.json")
    parser.add_argument("--variants", nargs="+", default=[DEFAULT_VARIANT], choices=VARIANTS, metavar="VARIANT",
                        help=f"variants to train (default {DEFAULT_VARIANT}); any of: {', '.join(VARIANTS)}")
    parser.add_argument("--work", metavar="DIR", help="where sample folders are tiled (default OUT/tiles)")
    parser.add_argument("--panel", metavar="FILE", help='JSON {"core": [...], "addon": [...]} for sample folders')
    split = parser.add_argument_group(
        "split (whole samples; sample id = folder name or store name without .tiles.zarr)"
    )
    split.add_argument("--val", nargs="+", default=[], metavar="SAMPLE", help="validation samples")
    split.add_argument("--test", nargs="+", default=[], metavar="SAMPLE", help="test samples (never trained on)")
    split.add_argument("--calibration", nargs="+", default=[], metavar="SAMPLE",
                       help="held-out samples to calibrate intervals and the out-of-distribution flag on (never "
                            "trained or early-stopped on; the card then holds the calibration)")
    split.add_argument("--val-fraction", type=fraction, default=0.2, help="when --val is not given (default 0.2)")
    split.add_argument("--test-fraction", type=fraction, default=0.0, help="when --test is not given (default 0)")
    split.add_argument("--split-seed", type=whole_number(0), default=0)
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm ViT name (default {DEFAULT_BACKBONE})")
    model.add_argument("--backbone-kwargs", type=json.loads, default={}, metavar="JSON",
                       help='the ViT\'s shape and dropout as timm kwargs, e.g. \'{"depth": 2, "embed_dim": 96, '
                            f'"num_heads": 3}}\' for a small ViT; keys: {", ".join(BACKBONE_KWARGS)}')
    model.add_argument("--backbone-weights", metavar="FILE",
                       help='pretrained backbone (.safetensors/.pth/.npz, or "hub"); default random init')
    model.add_argument("--learnable-gate", action="store_true", help="tanh(alpha) gate on the added expression")
    model.add_argument("--variance-head", action="store_true",
                       help="a second head predicting each tile prediction's variance (the spread calibrated "
                            "intervals scale; neural variants)")
    model.add_argument("--token-head", choices=("poisson", "mse_log1p"), metavar="LOSS",
                       help="also predict the add-on panel per token (18 um for the paper's tiles), trained on the "
                            "per-token counts with this loss (poisson or mse_log1p) beside the tile loss; variants "
                            "without a token sequence are trained without it")
    model.add_argument("--modality-dropout", type=real_number(0.0, 1.0), default=0.0, metavar="RATE",
                       help="fraction of training batches that lose one modality (half the image, half the "
                            "transcripts), so a fusion model also predicts from an H&E alone or from transcripts "
                            "alone (default 0: both inputs always; the shipped model uses 0.2)")
    model.add_argument("--token-loss-weight", type=real_number(0.0, 1e3), default=1.0,
                       help="weight of the per-token loss against the tile MSE (default 1)")
    fit = parser.add_argument_group("training (defaults: the paper's)")
    fit.add_argument("--epochs", type=whole_number(1), default=35)
    fit.add_argument("--warmup-epochs", type=whole_number(0), default=5)
    fit.add_argument("--batch-size", type=whole_number(1), default=256)
    fit.add_argument("--accumulate", type=whole_number(1), default=2, help="gradient accumulation steps")
    fit.add_argument("--lr-head", type=real_number(0.0, 1.0, open_minimum=True), default=1e-4)
    fit.add_argument("--lr-backbone", type=real_number(0.0, 1.0), default=1e-5, help="0 freezes the backbone")
    fit.add_argument("--weight-decay", type=real_number(0.0, 1.0), default=1e-3)
    fit.add_argument("--patience", type=whole_number(1), default=10, help="early stopping on validation MSE")
    fit.add_argument("--seed", type=whole_number(0), default=0)
    fit.add_argument("--precision", default="auto",
                     help='Lightning precision (default: bf16-mixed on GPU, else "32-true")')
    fit.add_argument("--workers", type=whole_number(0, 256), default=0,
                     help="data loader processes (default 0: load in the training process)")
    fit.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    hardware = parser.add_argument_group(
        "hardware (Lightning's; e.g. --accelerator gpu --devices 4 --strategy ddp, or --num-nodes N on a cluster)")
    hardware.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto (default)")
    hardware.add_argument("--devices", default="auto", type=_devices, help="how many devices (or auto)")
    hardware.add_argument("--num-nodes", type=_node_count, default=1, help="machines taking part (default 1)")
    hardware.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ... (Lightning strategies)")


def _node_count(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: give a number of nodes (machines), 1 or more")


def _devices(value: str) -> int | str:
    if value == "auto" or value.isdigit() and int(value) > 0:
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: give a number of devices (e.g. 2) or auto")


def _sample_names(given: list[str], names: list[str]) -> list[str]:
    """--val/--test entries as sample ids: a name, or a path as given in DATA (folder or store)."""
    from napari_morphomol.models.data import sample_id_of

    return [value if value in names else sample_id_of(value) for value in given]


def _split(sample_ids, args):
    from napari_morphomol.models import split_by_sample

    names = sorted(set(sample_ids))
    args.val, args.test = _sample_names(args.val, names), _sample_names(args.test, names)
    args.calibration = _sample_names(args.calibration, names)
    unknown = sorted(set(args.val + args.test + args.calibration) - set(names))
    if unknown:
        raise InputError(f"--val/--test/--calibration name samples that are not in DATA: {', '.join(unknown)}; "
                         f"samples: {', '.join(names)}")
    named = {"--val": set(args.val), "--test": set(args.test), "--calibration": set(args.calibration)}
    for (a, first), (b, second) in itertools.combinations(named.items(), 2):
        if first & second:
            raise InputError(f"a sample cannot be both {a} and {b} ({', '.join(sorted(first & second))})")
    held_out = set(args.test) | set(args.calibration)
    if args.val:
        val = set(args.val)
        train = [n for n in names if n not in val | held_out]
        if not train:
            raise InputError("no sample is left for training; name fewer --val/--test/--calibration samples")
        groups = {"train": train, "val": sorted(val), "test": sorted(args.test)}
    else:
        drawn = split_by_sample(sample_ids, val_fraction=args.val_fraction,
                                test_fraction=0.0 if args.test else args.test_fraction, seed=args.split_seed)
        groups = {"train": [n for n in drawn.samples["train"] if n not in held_out],
                  "val": [n for n in drawn.samples["val"] if n not in held_out],
                  "test": sorted(args.test) or [n for n in drawn.samples["test"] if n not in held_out]}
        if not groups["train"] or not groups["val"]:
            raise InputError("--test/--calibration leave no training or validation sample; give more samples or "
                             "use --val")
    groups["calibration"] = sorted(args.calibration)
    return groups


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from napari_morphomol.models import ADDON_TOKEN_HEAD, VARIANT_TABLE, ModelConfig, TrainingSettings, train_model
    from napari_morphomol.models.data import open_cohort, tiles_stores_for
    from napari_morphomol.models.training import is_primary_process
    from napari_morphomol.tiling import GenePanel

    primary = is_primary_process()
    inputs = [*args.data, args.panel, args.backbone_weights if args.backbone_weights != "hub" else None]
    out = guard_output_folder(args.out, inputs=inputs)
    if out.exists() and primary:
        guard_output(out / "split.json", SPLIT_JSON, inputs=inputs, overwrite=True)
        clash = [v for v in args.variants if (out / f"{v}.safetensors").exists()]
        if clash:
            raise InputError(
                f"{out} already holds {', '.join(v + '.safetensors' for v in clash)}; choose another --out"
            )
    if len({Path(p).absolute() for p in args.data}) < 2:  # each path is one sample: refused before tiling into --out
        raise InputError(f"{len(args.data)} sample cannot be split into train and validation without sharing a "
                         "tissue section; give at least two samples (tiles stores or sample folders) in DATA")
    panel = GenePanel.from_json(args.panel) if args.panel else None

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    work = guard_output_folder(args.work or out / "tiles", inputs=inputs)
    stores = tiles_stores_for(args.data, work_dir=work, panel=panel, progress=say)
    cohort = open_cohort(stores, progress=lambda path, done, total: say(f"decoding tiles of {path}: {done}/{total}"))
    sample_ids = cohort.sample_ids
    groups = _split(sample_ids, args)
    index = {name: [i for i, s in enumerate(sample_ids) if s in set(groups[name])] for name in groups}
    report = print if primary else (lambda *_: None)
    report(f"samples: train {', '.join(groups['train'])} ({len(index['train'])} tiles); "
          f"validation {', '.join(groups['val'])} ({len(index['val'])} tiles); "
          f"test {', '.join(groups['test']) or '-'} ({len(index['test'])} tiles, not used here); "
          f"calibration {', '.join(groups['calibration']) or '-'} ({len(index['calibration'])} tiles)")
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "split.json", json.dumps(
            {"format": SPLIT_FORMAT, **groups,
             "stores": {s.sample_id: str(s.store.path.absolute()) for s in cohort.samples}}, indent=1),
            SPLIT_JSON, inputs=inputs, overwrite=True)

    settings = TrainingSettings(
        lr_head=args.lr_head, lr_backbone=args.lr_backbone, weight_decay=args.weight_decay, max_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, accumulate_grad_batches=args.accumulate,
        patience=args.patience, seed=args.seed, precision=args.precision, num_workers=args.workers,
        progress_bar=args.progress, accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
        strategy=args.strategy, token_loss=args.token_head or "poisson", token_loss_weight=args.token_loss_weight,
    )
    for variant in args.variants:
        unimodal = args.modality_dropout > 0 and VARIANT_TABLE[variant].stage is not None
        if args.modality_dropout > 0 and not unimodal:
            report(f"{variant}: reads one modality, trained without modality dropout")
        variant_settings = dataclasses.replace(settings, modality_dropout=args.modality_dropout if unimodal else 0.0)
        token_head = args.token_head is not None and VARIANT_TABLE[variant].has_token_sequence
        if args.token_head is not None and not token_head:
            report(f"{variant}: no token sequence, trained without the token head")
        config = ModelConfig(
            n_core_genes=len(cohort.core_genes), n_addon_genes=len(cohort.addon_genes), variant=variant,
            backbone=args.backbone, backbone_kwargs=args.backbone_kwargs,
            learnable_gate=args.learnable_gate and config_allows_gate(variant),
            token_heads={ADDON_TOKEN_HEAD: len(cohort.addon_genes)} if token_head else {},
            variance_head=args.variance_head and VARIANT_TABLE[variant].neural,
            unimodal_inputs=unimodal,
        )
        result = train_model(
            config, Subset(cohort, index["train"]), Subset(cohort, index["val"]),
            core_genes=cohort.core_genes, addon_genes=cohort.addon_genes,
            checkpoint_path=out / f"{variant}.safetensors", settings=variant_settings,
            backbone_weights=args.backbone_weights,
            tile_geometry=cohort.tile_spec(),
            data_summary={"samples": groups, "cli_arguments": _arguments(args)},
            calibration_dataset=Subset(cohort, index["calibration"]) if index["calibration"] else None,
            calibration_samples=groups["calibration"],
        )
        means = result.validation.means
        report(f"{variant}: validation pearson {means['pearson']:.3f} spearman {means['spearman']:.3f} "
              f"mse {means['mse']:.4f} -> {result.checkpoint_path}")
        calibration = result.card.calibration
        if calibration is not None:
            report(f"{variant}: calibrated on {', '.join(calibration.samples)} at scales "
                   f"{', '.join(calibration.scales) or 'none (no variance or token head)'}; out-of-distribution "
                   f"threshold {calibration.outliers.threshold:.2f}"
                   + ("; the H&E alone calibrated too" if "image" in calibration.routes else ""))
        if result.validation.token_means is not None:
            tokens, summed = result.validation.token_means, result.validation.token_sum_means
            report(f"{variant}: per token pearson {tokens['pearson']:.3f} spearman {tokens['spearman']:.3f}; "
                   f"tile from the token sum spearman {summed['spearman']:.3f} "
                   f"(better tile estimate: {result.card.training['better_tile_estimate']})")
    return 0


def _arguments(args: argparse.Namespace) -> dict:
    """The parsed command line, as JSON, for the model card."""
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


def config_allows_gate(variant: str) -> bool:
    """The gate exists only for add fusion."""
    return variant.startswith(("early_fusion_add", "late_fusion_add"))
