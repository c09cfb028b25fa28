"""Opening a large sample in napari: time to first frame, density pass, viewer responsiveness.

Run under a display (``xvfb-run -a``). Generates (once) a synthetic sample of about
``--transcripts`` transcripts into ``benchmarks/out/``. Figures are printed as seconds and as
ratios against a baseline measured in the same run: reading the transcripts' x, y and gene
columns with pyarrow (the least any viewer of these transcripts must do).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pyarrow.parquet as pq

from napari_morphomol.synthetic import write_synthetic_sample

OUT = Path(__file__).parent / "out"
TRANSCRIPTS_PER_MM2 = 1.3e6


def ensure_sample(n_transcripts: float, seed: int) -> Path:
    side_mm = round(math.sqrt(n_transcripts / TRANSCRIPTS_PER_MM2), 1)
    folder = OUT / f"open-bench-{side_mm}mm-seed{seed}"
    if not folder.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        print(f"generating a {side_mm} x {side_mm} mm sample into {folder} ...", flush=True)
        start = time.perf_counter()
        write_synthetic_sample(folder, size_mm=(side_mm, side_mm), seed=seed)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transcripts", type=float, default=30e6, help="approximate transcripts (default 30e6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = ensure_sample(args.transcripts, args.seed)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_morphomol.widgets.load_sample import LoadSampleWidget

    parquet = folder / "xenium" / "transcripts.parquet"
    n_rows = pq.ParquetFile(parquet).metadata.num_rows
    start = time.perf_counter()
    pq.read_table(parquet, columns=["x_location", "y_location", "feature_name", "qv"])
    baseline = time.perf_counter() - start
    print(f"transcripts: {n_rows:,}")
    print(f"baseline: pyarrow read of x, y, gene, qv: {baseline:.2f} s")

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    widget = LoadSampleWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.xenium_dir.value = folder / "xenium"
    widget.he_path.value = folder / "he_image.ome.tif"
    widget.alignment_csv.value = folder / "he_imagealignment.csv"

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    start = time.perf_counter()
    widget.load()
    while widget.sdata is None or not len(viewer.layers):
        app.processEvents()
        time.sleep(0.005)
    viewer.screenshot(canvas_only=True, flash=False)  # forces the first frame to be drawn
    first_frame = time.perf_counter() - start
    ticks.clear()  # responsiveness is measured while the density pass runs in the background
    while widget.density is None:
        app.processEvents()
        time.sleep(0.005)
    density_done = time.perf_counter() - start
    timer.stop()
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    worst_gap_ms = 1000 * max(gaps) if gaps else float("nan")
    p99_gap_ms = 1000 * sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else float("nan")
    print(f"first frame (H&E + DAPI drawn): {first_frame:.2f} s  = {first_frame / baseline:.2f} x baseline")
    print(f"density of all genes ready:     {density_done:.2f} s  = {density_done / baseline:.2f} x baseline")
    print(f"event loop during the background density pass: worst stall {worst_gap_ms:.0f} ms, "
          f"99th percentile {p99_gap_ms:.0f} ms "
          f"(timer every 20 ms, {len(ticks)} ticks)")
    viewer.close()


if __name__ == "__main__":
    main()
