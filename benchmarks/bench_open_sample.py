"""Opening a large sample in napari: first frame, density pass, points in view, stalls, peak memory.

Run under a display (``xvfb-run -a``), on a sample folder (``--sample``, e.g. one made by
``benchmarks/make_scale_sample.py``) or on a synthetic sample of about ``--transcripts``
transcripts generated once into ``benchmarks/out/``. Figures are printed as seconds and as ratios
against a baseline measured in the same run: reading the transcripts' x, y, gene and qv columns
with pyarrow (the least any viewer of these transcripts must do), in a process of its own, with
the file in the page cache (it is read once first). The sample is opened in a fresh process too,
so its peak RSS is the viewer's alone. ``--json`` prints one JSON line of the figures at the end
(``bench_slide_scale.py`` reads it).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
TRANSCRIPTS_PER_MM2 = 1.3e6
POINTS_VIEW_UM = 600.0
"""The field of view zoomed to for the points-in-view figure (under the dock's 800 um)."""


def ensure_sample(n_transcripts: float, seed: int) -> Path:
    from napari_morphomol.synthetic import write_synthetic_sample

    side_mm = round(math.sqrt(n_transcripts / TRANSCRIPTS_PER_MM2), 1)
    folder = OUT / f"open-bench-{side_mm}mm-seed{seed}"
    if not folder.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        print(f"generating a {side_mm} x {side_mm} mm sample into {folder} ...", flush=True)
        start = time.perf_counter()
        write_synthetic_sample(folder, size_mm=(side_mm, side_mm), seed=seed)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


_BASELINE = """
import resource, sys, time
import pyarrow.parquet as pq
start = time.perf_counter()
pq.read_table(sys.argv[1], columns=["x_location", "y_location", "feature_name", "qv"])
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def pyarrow_baseline(parquet: Path) -> tuple[float, float]:
    """(seconds, peak RSS bytes) of a pyarrow read of x, y, gene and qv, the file in the page cache."""
    for _ in range(2):  # the first read brings the file into the page cache
        out = subprocess.run([sys.executable, "-c", _BASELINE, str(parquet)], capture_output=True, text=True,
                             check=True).stdout.split()
    return float(out[0]), float(out[1])


def measure_open(folder: Path) -> dict:
    """Open ``folder`` in the Load sample dock as a user would; the figures of one open."""
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_morphomol.io.sample import find_sample_parts
    from napari_morphomol.widgets.load_sample import LoadSampleWidget

    parts = find_sample_parts(folder)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    widget = LoadSampleWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.xenium_dir.value = parts.xenium_dir
    widget.he_path.value = parts.he_path
    widget.alignment_csv.value = parts.alignment_csv

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    def wait_for(condition):
        while not condition():
            app.processEvents()
            time.sleep(0.005)

    start = time.perf_counter()
    widget.load()
    wait_for(lambda: widget.sdata is not None and len(viewer.layers))
    drawing = time.perf_counter()
    viewer.screenshot(canvas_only=True, flash=False)  # forces the first frame to be drawn
    drawn = time.perf_counter()
    first_frame = drawn - start
    wait_for(lambda: widget.density is not None)
    density_ready = time.perf_counter() - start

    gene = widget.density.gene_totals().idxmax()
    widget.gene_list.value = [gene]
    ny, nx = widget.density.shape_yx
    centre_um = (nx * widget.density.bin_um / 2, ny * widget.density.bin_um / 2)
    viewer.camera.center = (0, centre_um[1], centre_um[0])
    zoomed = time.perf_counter()
    viewer.camera.zoom = viewer.canvas.size[1] / POINTS_VIEW_UM  # the dock's debounce timer fetches the points
    wait_for(lambda: "transcripts in view" in viewer.layers and widget.status.value.endswith("in view"))
    points_in_view = time.perf_counter() - zoomed
    n_points = len(viewer.layers["transcripts in view"].data)
    timer.stop()

    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)
            if not (a <= drawn and b >= drawing)]  # the forced screenshot blocks by design
    figures = {
        "sample": str(folder),
        "transcripts": int(widget.density.n_binned + widget.density.n_low_qv + widget.density.n_outside
                           + widget.density.n_non_finite + widget.density.n_unnamed),
        "first_frame_s": first_frame,
        "density_ready_s": density_ready,
        "points_in_view_s": points_in_view,
        "points_in_view": n_points,
        "points_gene": gene,
        "worst_stall_ms": 1000 * max(gaps) if gaps else float("nan"),
        "p99_stall_ms": 1000 * float(np.percentile(gaps, 99)) if gaps else float("nan"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    viewer.close()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, help="a sample folder to open (else one is generated)")
    parser.add_argument("--transcripts", type=float, default=30e6, help="approximate transcripts (default 30e6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    parser.add_argument("--open-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    folder = args.sample or ensure_sample(args.transcripts, args.seed)
    if args.open_only:
        print("FIGURES " + json.dumps(measure_open(folder)), flush=True)
        return

    from napari_morphomol.io.sample import find_sample_parts

    parquet = find_sample_parts(folder).xenium_dir / "transcripts.parquet"
    baseline_s, baseline_rss = pyarrow_baseline(parquet)
    child = subprocess.run([sys.executable, __file__, "--sample", str(folder), "--open-only"],
                           capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("FIGURES ")]
    if child.returncode or not lines:
        sys.exit(f"the open failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    f = json.loads(lines[-1][len("FIGURES "):])
    f["baseline_s"], f["baseline_rss_bytes"] = baseline_s, baseline_rss
    print(f"sample: {folder} ({f['transcripts']:,} transcripts)")
    print(f"baseline: pyarrow read of x, y, gene, qv (warm): {baseline_s:.2f} s, peak RSS {baseline_rss / 1e9:.2f} GB")
    print(f"first frame (H&E + DAPI drawn): {f['first_frame_s']:.2f} s  = {f['first_frame_s'] / baseline_s:.2f} x "
          "baseline (target 0.3 x)")
    print(f"density of all genes ready:     {f['density_ready_s']:.2f} s  = {f['density_ready_s'] / baseline_s:.2f} x "
          "baseline (target 1.0 x)")
    print(f"points of {f['points_gene']} in a {POINTS_VIEW_UM:.0f} um view: {f['points_in_view_s']:.2f} s after the "
          f"zoom (the dock waits 0.3 s for the camera to settle; target 1 s), {f['points_in_view']:,} points")
    print(f"event loop while opening: worst stall {f['worst_stall_ms']:.0f} ms, 99th percentile "
          f"{f['p99_stall_ms']:.0f} ms (target: none over 200 ms)")
    print(f"peak RSS of the viewer: {f['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({f['peak_rss_bytes'] / max(f['transcripts'], 1):.1f} bytes per transcript)")
    if args.json:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
