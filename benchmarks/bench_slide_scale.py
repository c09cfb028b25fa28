"""Slide scale on a laptop: open, tiles, predict and export, with wall time and peak RSS.

Run under a display (``xvfb-run -a``): ``python benchmarks/bench_slide_scale.py``. The samples are
scale samples (``synthetic.write_scale_sample``, see ``benchmarks/make_scale_sample.py``) under
``$MORPHOMOL_BENCH_DIR`` (default ``/tmp/morphomol-scale``), made when missing:

- ``mm16`` (4 x 4 mm) and ``cm1`` (10 x 10 mm): the CLI path, ``morphomol tiles``, ``predict``
  (the shipped model, CPU) and ``export`` (``--h5ad`` and the default ``--spatialdata``), each in a
  process of its own, its peak RSS from ``wait4``; the growth of each peak beyond the size of
  what the step wrote, from 16 mm^2 to 1 cm^2 (target at most 1.25 x, each peak under 4 GB);
- ``t135M`` and ``t300M`` (135 M and 300 M transcripts): opening in the Load sample dock
  (``bench_open_sample.py``: first frame, density, points in view, stalls, peak RSS) beside the
  pyarrow read of x, y, gene and qv measured in the same run (targets: peak RSS at most 3 GB,
  growing at most 1.2 x from 135 M to 300 M; density within 1.0 x and first frame within 0.3 x
  of the pyarrow read; no stall over 200 ms; points in view within 1 s).

``--only open`` or ``--only cli`` runs one half; ``--samples`` picks samples by name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = {"mm16": {"size_mm": (4.0, 4.0)}, "cm1": {"size_mm": (10.0, 10.0)},
           "t135M": {"n_transcripts": 135e6}, "t300M": {"n_transcripts": 300e6}}
CLI_SAMPLES, OPEN_SAMPLES = ("mm16", "cm1"), ("t135M", "t300M")
MORPHOMOL = [sys.executable, "-m", "napari_morphomol.cli"]


def bench_dir() -> Path:
    return Path(os.environ.get("MORPHOMOL_BENCH_DIR", "/tmp/morphomol-scale"))


def ensure_sample(name: str) -> Path:
    from napari_morphomol.synthetic import write_scale_sample

    folder = bench_dir() / name
    if not folder.exists():
        print(f"writing the scale sample {name} into {folder} ...", flush=True)
        block = bench_dir() / "block-2mm-seed0"
        write_scale_sample(folder, block_dir=block if block.exists() else None, **SAMPLES[name])
    return folder


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_process(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command in a process of its own; fails loudly."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(command)}\n{output[-4000:]}")
    return wall, usage.ru_maxrss * 1024


def cli_path(sample: Path, work: Path) -> dict:
    """tiles, predict and export of one sample: wall time, peak RSS and output size of each."""
    steps = {
        "tiles": [*MORPHOMOL, "tiles", str(sample), "--out", str(work / "tiles.zarr")],
        "predict": [*MORPHOMOL, "predict", str(sample), "--out", str(work / "run.zarr"), "--device", "cpu"],
        "export": [*MORPHOMOL, "export", str(work / "run.zarr"), "--h5ad", str(work / "run.h5ad"),
                   "--spatialdata", str(work / "run_sdata.zarr")],
    }
    outputs = {"tiles": ["tiles.zarr"], "predict": ["run.zarr"], "export": ["run.h5ad", "run_sdata.zarr"]}
    figures = {}
    for step, command in steps.items():
        wall, peak = timed_process(command)
        figures[step] = {"wall_s": wall, "peak_rss_bytes": peak,
                         "output_bytes": sum(disk_bytes(work / name) for name in outputs[step])}
        wrote_mb = figures[step]["output_bytes"] / 1e6
        print(f"  {step:8s} {wall:7.1f} s  peak RSS {peak / 1e9:5.2f} GB  wrote {wrote_mb:8.1f} MB", flush=True)
    return figures


def open_figures(sample: Path) -> dict:
    child = subprocess.run([sys.executable, str(HERE / "bench_open_sample.py"), "--sample", str(sample), "--json"],
                           capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"the open benchmark failed on {sample}:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    lines = child.stdout.strip().splitlines()
    print("\n".join("  " + line for line in lines[:-1]), flush=True)
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["open", "cli"])
    parser.add_argument("--samples", nargs="+", choices=list(SAMPLES))
    args = parser.parse_args()
    chosen = args.samples or list(SAMPLES)
    results: dict = {"open": {}, "cli": {}}
    if args.only != "open":
        for name in [n for n in CLI_SAMPLES if n in chosen]:
            sample = ensure_sample(name)
            print(f"CLI path on {name} ({sample}, {disk_bytes(sample) / 1e9:.2f} GB on disk):", flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"slide-scale-{name}-", dir=bench_dir()))
            try:
                results["cli"][name] = cli_path(sample, work)
                results["cli"][name]["bundle_bytes"] = disk_bytes(sample)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    if args.only != "cli":
        for name in [n for n in OPEN_SAMPLES if n in chosen]:
            sample = ensure_sample(name)
            print(f"opening {name} ({sample}):", flush=True)
            results["open"][name] = open_figures(sample)
    summary(results)


def summary(results: dict) -> None:
    print("\nsummary")
    cli = results["cli"]
    for name, steps in cli.items():
        export = steps["export"]
        print(f"  {name}: " + ", ".join(f"{s} {f['wall_s']:.0f} s / {f['peak_rss_bytes'] / 1e9:.2f} GB"
                                        for s, f in steps.items() if s != "bundle_bytes")
              + f"; export wrote {export['output_bytes'] / steps['bundle_bytes']:.1%} of the bundle (target 5%)")
    if {"mm16", "cm1"} <= cli.keys():
        for step in ("tiles", "predict", "export"):
            small, large = cli["mm16"][step], cli["cm1"][step]
            growth = ((large["peak_rss_bytes"] - large["output_bytes"])
                      / max(small["peak_rss_bytes"] - small["output_bytes"], 1))
            print(f"  {step}: peak RSS beyond its output grows {growth:.2f} x from 16 mm^2 to 1 cm^2 (target 1.25 x); "
                  f"1 cm^2 peak {large['peak_rss_bytes'] / 1e9:.2f} GB (target 4 GB)")
    opened = results["open"]
    for name, f in opened.items():
        print(f"  open {name} ({f['transcripts'] / 1e6:.0f} M): peak RSS {f['peak_rss_bytes'] / 1e9:.2f} GB "
              "(target 3), "
              f"first frame {f['first_frame_s'] / f['baseline_s']:.2f} x (0.3), density "
              f"{f['density_ready_s'] / f['baseline_s']:.2f} x (1.0) of the pyarrow read ({f['baseline_s']:.1f} s), "
              f"worst stall {f['worst_stall_ms']:.0f} ms (200), points in view {f['points_in_view_s']:.2f} s (1)")
    if {"t135M", "t300M"} <= opened.keys():
        growth = opened["t300M"]["peak_rss_bytes"] / opened["t135M"]["peak_rss_bytes"]
        print(f"  open: peak RSS grows {growth:.2f} x from 135 M to 300 M transcripts (target 1.2 x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
