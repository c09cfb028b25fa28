"""The whole path on the embedded default: a synthetic Xenium + H&E sample, loaded as one
SpatialData sample, summarised, and shown in napari (a screenshot is written).

Prediction, clusters and export join this command as they land."""

from __future__ import annotations

import json
import time
from pathlib import Path

from napari_morphomol.io.sample import open_sample, summarize_sample
from napari_morphomol.io.synthetic import write_synthetic_sample

NAME = "demo"
HELP = "run the main job on a synthetic sample and write a screenshot"


def add_arguments(parser):
    parser.add_argument("--out", default="morphomol-demo", help="output folder (default: ./morphomol-demo)")
    parser.add_argument("--size-mm", nargs=2, type=float, default=(1.0, 1.0), metavar=("W", "H"),
                        help="synthetic tissue size in mm (default: 1 1)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic sample seed (default: 0)")


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample_dir = out / f"sample-{args.size_mm[0]:g}x{args.size_mm[1]:g}mm-seed{args.seed}"
    start = time.perf_counter()
    if sample_dir.exists():
        print(f"reusing the synthetic sample in {sample_dir}")
    else:
        print(f"writing a synthetic {args.size_mm[0]:g} x {args.size_mm[1]:g} mm sample to {sample_dir} ...")
        write_synthetic_sample(sample_dir, size_mm=tuple(args.size_mm), seed=args.seed)
    print(f"  {time.perf_counter() - start:.1f} s")
    sdata = open_sample(sample_dir)
    print(json.dumps(summarize_sample(sdata), indent=2, default=str))

    from napari_morphomol.widgets.screenshot import screenshot_sample

    shot = screenshot_sample(sdata, out / "screenshot.png")
    print(f"screenshot of the sample in napari: {shot}")
    return 0
