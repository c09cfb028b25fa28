"""Calibrate a model's intervals and out-of-distribution threshold on your own held-out slides.

Give the model (MODEL.safetensors) and finished runs of it (RESULTS.zarr from `morphomol predict
--checkpoint MODEL`) over samples it was not trained on that measured the add-on panel (a Xenium
run with the panel, beside its H&E). Each run is scored as Explore shows it: per tile (a model
with a variance head), per stitched 18 um token and per Xenium cell (a model with the token head),
and the outlier threshold is set at the 99 % quantile of the runs' tiles. The new card is written
to --out (never over MODEL or any input, nor inside one; an existing checkpoint of ours only with
--overwrite); the weights are the same. See docs/trust.md.
"""

from __future__ import annotations

NAME = "calibrate"
HELP = "calibrate a model's intervals and out-of-distribution flag on runs of held-out slides"


def add_arguments(parser):
    parser.add_argument("checkpoint", metavar="MODEL.safetensors", help="the model the runs were predicted with")
    parser.add_argument("runs", nargs="+", metavar="RESULTS.zarr",
                        help="finished runs of the model over held-out samples that measured the add-on panel")
    parser.add_argument("--out", required=True, metavar="OUT.safetensors", help="the calibrated model to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is a napari-morphomol checkpoint (never MODEL or another input)")


def _is_our_checkpoint(path) -> bool:
    from napari_morphomol.errors import InputError
    from napari_morphomol.models import read_model_card

    try:
        read_model_card(path)
    except InputError:
        return False
    return True


def run(args) -> int:
    import dataclasses
    from pathlib import Path

    from napari_morphomol._atomic import OutputKind, guard_output
    from napari_morphomol.analysis import explore_run
    from napari_morphomol.analysis.calibration import calibrate_on_runs
    from napari_morphomol.errors import InputError
    from napari_morphomol.inference.prediction import file_sha256
    from napari_morphomol.models import load_checkpoint, save_checkpoint

    checkpoint = Path(args.checkpoint)
    out = guard_output(args.out, OutputKind("napari-morphomol checkpoint (.safetensors)", _is_our_checkpoint),
                       inputs=[checkpoint, *args.runs], overwrite=args.overwrite)
    model, card = load_checkpoint(checkpoint)
    sha = file_sha256(checkpoint)
    explorers = []
    for path in args.runs:
        explorer = explore_run(path)
        recorded = explorer.results.metadata["checkpoint"]
        if recorded["sha256"] != sha:
            raise InputError(f"{path} was predicted with another model ({recorded['path']}); calibrate on runs of "
                             f"{checkpoint.name} (morphomol predict --checkpoint {checkpoint})")
        explorers.append(explorer)
    samples = [Path(e.results.metadata["sample"].get("xenium_dir") or e.results.path).parent.name for e in explorers]
    calibration = calibrate_on_runs(explorers, card, samples)
    save_checkpoint(model, dataclasses.replace(card, calibration=calibration), out)
    for scale, values in calibration.scales.items():
        print(f"{scale}: {values.n_calibration:,} predictions per gene at most; 90% quantile median "
              f"{float(sorted(calibration.quantile(scale, 0.9))[len(card.addon_genes) // 2]):.2f}")
    if calibration.outliers is not None:
        print(f"out-of-distribution threshold {calibration.outliers.threshold:.2f}")
    print(f"wrote {out}")
    return 0
