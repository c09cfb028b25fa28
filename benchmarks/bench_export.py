"""SpatialData export of a run: the default store (the run's elements, an H&E overview, the sample
referred to) against the self-contained copy (``--self-contained``): size, wall time, peak RSS.

Usage::

    python benchmarks/bench_export.py --sample SAMPLE_DIR --results RESULTS.zarr [--json]
    python benchmarks/bench_export.py --size-mm 2 2      # makes the sample and the run in benchmarks/out/

Each export runs in a fresh process (its peak RSS is VmHWM, the export's alone) into a temporary
folder that is removed afterwards. The figures: the store's size and its ratio to the sample's files
(the Xenium bundle plus the H&E; target for the default: at most 5 %), the default's size by element,
the wall time of each and their ratio (the same run, the same machine), and whether reading the
default back with ``open_export`` attaches the sample's full H&E and transcripts. ``--json`` prints
one JSON line of the figures at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "out"

_EXPORT = """
import json, sys, time
from napari_morphomol.export import export_results
start = time.perf_counter()
export_results(sys.argv[1], spatialdata=sys.argv[2], self_contained=sys.argv[3] == "1")
seconds = time.perf_counter() - start
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_bytes": hwm}))
"""


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def ensure_run(size_mm: tuple[float, float], seed: int) -> tuple[Path, Path]:
    """A synthetic sample and a run of the shipped model on it, made once under benchmarks/out/."""
    from napari_morphomol.cli import main

    sample = OUT / f"export-bench-{size_mm[0]:g}x{size_mm[1]:g}mm-seed{seed}"
    results = sample.with_suffix(".run.zarr")
    if not sample.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        assert main(["synth", str(sample), "--size-mm", str(size_mm[0]), str(size_mm[1]), "--seed", str(seed)]) == 0
    if not results.exists():
        assert main(["predict", str(sample), "--out", str(results)]) == 0
    return sample, results


def export_once(results: Path, target: Path, self_contained: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _EXPORT, str(results), str(target), "1" if self_contained else "0"],
                         capture_output=True, text=True, check=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "bytes": tree_bytes(target)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, help="the sample folder the run was predicted on")
    parser.add_argument("--results", type=Path, help="the run (RESULTS.zarr)")
    parser.add_argument("--size-mm", type=float, nargs=2, default=(2.0, 2.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.results is None:
        args.sample, args.results = ensure_run(tuple(args.size_mm), args.seed)
    from napari_morphomol.inference import open_results

    recorded = open_results(args.results).metadata["sample"]
    inputs = [Path(recorded[k]) for k in ("xenium_dir", "he_path") if recorded.get(k)]
    sample_bytes = sum(tree_bytes(p) for p in inputs)
    figures: dict = {"sample_bytes": sample_bytes, "sample": [str(p) for p in inputs]}
    with tempfile.TemporaryDirectory(dir=args.results.parent, prefix=".bench-export-") as tmp:
        for name, self_contained in (("default", False), ("self_contained", True)):
            target = Path(tmp) / f"{name}.zarr"
            figures[name] = export_once(args.results, target, self_contained)
            if name == "default":
                figures["default_by_element"] = {f"{kind.name}/{element.name}": tree_bytes(element)
                                                 for kind in sorted(target.iterdir()) if kind.is_dir()
                                                 for element in sorted(kind.iterdir()) if element.is_dir()}
                from napari_morphomol.elements import HE_IMAGE, TRANSCRIPTS
                from napari_morphomol.export import open_export

                opened = open_export(target)
                figures["open_export_attaches"] = HE_IMAGE in opened.images and TRANSCRIPTS in opened.points
    d, s = figures["default"], figures["self_contained"]
    figures["default_over_sample"] = d["bytes"] / sample_bytes
    figures["default_over_self_contained_time"] = d["seconds"] / s["seconds"]
    print(f"sample's files: {sample_bytes / 1e6:,.1f} MB ({', '.join(figures['sample'])})")
    for name, f in (("default", d), ("self-contained", s)):
        print(f"{name:>15}: {f['bytes'] / 1e6:9,.1f} MB ({f['bytes'] / sample_bytes:6.1%} of the sample)  "
              f"{f['seconds']:6.1f} s  peak RSS {f['peak_rss_bytes'] / 1e6:,.0f} MB")
    print(f"default / self-contained: size {d['bytes'] / s['bytes']:.3f}, time "
          f"{figures['default_over_self_contained_time']:.3f}, "
          f"peak RSS {d['peak_rss_bytes'] / s['peak_rss_bytes']:.3f}")
    print("default store by element:")
    for element, size in sorted(figures["default_by_element"].items(), key=lambda kv: -kv[1]):
        print(f"  {element:40} {size / 1e6:8,.2f} MB ({size / sample_bytes:6.2%} of the sample)")
    print(f"target: default at most 5 % of the sample: {figures['default_over_sample']:.1%} "
          f"({'met' if figures['default_over_sample'] <= 0.05 else 'NOT met'}); open_export attaches the full H&E "
          f"and the transcripts: {figures['open_export_attaches']}")
    if args.json:
        print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
