"""Predict a trained model's add-on gene panel for every tissue tile of an H&E + Xenium sample,
or of an H&E alone.

Tiles (512 px at 0.5 um/px, stride 256, as the model was trained) are cut from the registered
H&E and run through the model with their core-gene token counts, chunk by chunk, as a dask
graph: threads by default, or a dask.distributed cluster with --scheduler. SAMPLE is a sample
folder (as `morphomol synth` writes) or a Xenium folder; the H&E and its alignment are found in or
beside it unless --he / --alignment name them. Without SAMPLE (`predict --he HE.svs --out
R.zarr`) the tiles are cut from the H&E alone and the model runs image-only (a model trained with
modality dropout, as the shipped one; others are refused before any work); the tiles then lie in
the H&E's own frame, in um. Results go to RESULTS.zarr (one array per model output: predictions,
embeddings; tile table, run metadata; for a calibrated model the interval bounds and the
out-of-distribution flag; layout in docs/inference.md).
An interrupted run leaves RESULTS.zarr.partial: run the same command again to resume it.
"""

from __future__ import annotations

import argparse
import sys
import time

from napari_morphomol.commands._arguments import fraction, whole_number
from napari_morphomol.commands._sample_inputs import add_sample_arguments, region_polygon_he_px, sample_paths
from napari_morphomol.errors import InputError

NAME = "predict"
HELP = "run a trained model over a sample -> RESULTS.zarr (resumable, any dask scheduler)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sample_arguments(parser, region_action="predict", xenium_optional=True)
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="model .safetensors with its model card; default: the model shipped with napari-morphomol")
    parser.add_argument("--out", required=True, metavar="RESULTS.zarr", help="results store (finalised atomically)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto = CUDA, then MPS, then CPU (default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto = bf16 autocast on CUDA, fp32 on the CPU and MPS (default auto)")
    parser.add_argument("--jpeg-decoder", default="cpu", choices=["cpu", "cuda"],
                        help="decode the H&E's JPEG tiles with libjpeg-turbo on the CPU (default) or nvJPEG on CUDA")
    parser.add_argument("--batch-size", type=whole_number(1), default=32, help="tiles per forward pass (default 32)")
    parser.add_argument("--tiles-per-chunk", type=whole_number(1), default=64,
                        help="tiles per dask task, a spatially contiguous block (default 64)")
    parser.add_argument("--scheduler", metavar="ADDR", default="threads",
                        help="threads (default), processes, or a dask scheduler address, e.g. tcp://host:8786")
    parser.add_argument("--workers", type=whole_number(1),
                        help="threads or processes for the local schedulers (default 2)")
    parser.add_argument("--min-transcripts", type=whole_number(0), default=0,
                        help="skip tiles with fewer core + add-on transcripts (default 0: every tissue tile)")
    parser.add_argument("--max-background", type=fraction, default=0.3,
                        help="largest background fraction of a predicted tile, 0 to 1 (default 0.3)")
    parser.add_argument("--interval-level", type=float, default=0.9, choices=(0.5, 0.8, 0.9, 0.95, 0.99),
                        help="nominal coverage of the interval bounds written beside the predictions, for a "
                             "calibrated model (default 0.9)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is a results store written by napari-morphomol "
                             "(and discard a partial run)")


class ProgressBar:
    """One line on stderr: bar, chunks, tiles/s since start."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        filled = int(self.width * done / max(total, 1))
        elapsed = time.perf_counter() - self.started
        print(f"\rpredicting [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} chunks, "
              f"{elapsed:.0f} s", end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from napari_morphomol.inference import InferenceCancelled, PredictOptions, open_results, partial_path, predict
    from napari_morphomol.inference.store import partial_progress
    from napari_morphomol.io.sample import load_sample
    from napari_morphomol.registration import read_registration_json

    if args.xenium_dir is None and (args.alignment or args.registration):
        raise InputError("--alignment and --registration map the H&E onto a Xenium run: give the sample (SAMPLE) "
                         "too, or leave them out to predict from the H&E alone")
    xenium_dir, he, alignment = sample_paths(args)
    registration = read_registration_json(args.registration) if args.registration else None
    sdata = load_sample(xenium_dir, he, alignment, he_pixel_size_um=args.he_pixel_size_um)
    options = PredictOptions(store=args.out, checkpoint=args.checkpoint, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, scheduler=args.scheduler, num_workers=args.workers,
                             tiles_per_chunk=args.tiles_per_chunk, min_transcripts=args.min_transcripts,
                             max_background=args.max_background, region_he_px=region_polygon_he_px(args.region),
                             he_to_global=registration, overwrite=args.overwrite,
                             interval_level=args.interval_level,
                             jpeg_device="cuda" if args.jpeg_decoder == "cuda" else None)
    try:
        out = predict(sdata, options, progress=ProgressBar())
    except (KeyboardInterrupt, InferenceCancelled):
        kept = partial_progress(args.out)
        if kept is None:
            print("\nstopped before anything was written", file=sys.stderr)
        else:
            print(f"\nstopped; {partial_path(args.out)} keeps {kept[0]} of {kept[1]} chunks finished: run the same "
                  "command to resume", file=sys.stderr)
        return 130
    print(file=sys.stderr)
    results = open_results(out)
    precision = results.metadata["precision"]
    segment = results.metadata["segments"][-1]
    route = {"both": "H&E + transcripts", "image": "the H&E alone", "transcripts": "transcripts alone"}[results.route]
    print(f"{len(results.tiles)} tiles x {len(results.addon_genes)} add-on genes from {route} on {precision['device']} "
          f"({precision['dtype']}: {precision['reason']}); {segment['tiles_run']} tiles run now in "
          f"{segment['timings'].get('inference_s', 0):.1f} s")
    trust = results.trust
    if trust.unavailable:
        print(trust.unavailable)
    elif trust.has_flags:
        print(f"{int(trust.outlier_flag.sum())} of {len(trust.outlier_flag)} tiles flagged out of distribution "
              f"(outlier score above {trust.threshold:.2f}); {trust.level:.0%} intervals written")
    print(f"wrote {out}")
    return 0
