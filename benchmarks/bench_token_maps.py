"""Stitched token maps in bounded memory (issue 14): peak memory and time of writing a run's token
maps, at 16 mm^2 and at 1 cm^2, against the size of what they stitch.

Each size runs in a fresh process: a results store whose every stride square is tissue (tiles of
the paper's geometry at 0.5 um/px, stride 128 um) gets a random add-on token head output of
``--genes`` genes written chunk by chunk, and a measured token raster; then
``inference.token_maps.write_token_maps`` writes the predicted and measured maps (all levels)
while a thread samples the process's resident memory every 5 ms. Printed per size: tiles, the
token head output (tiles x 196 x genes float32, what open_results once loaded whole), the maps
written, the peak resident memory above the process's baseline, and seconds. Bounded means the
peak stays near a block's working set (128 x 128 tokens x genes plus the tiles covering it)
while the output grows with the area. Usage:

    python benchmarks/bench_token_maps.py [--sizes-mm 4 10] [--genes 300] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _peak_rss_during(work) -> tuple[float, float, object]:
    """(peak resident bytes above the start, seconds, result) of ``work()``, sampled every 5 ms."""
    import psutil

    process = psutil.Process()
    start_rss, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tick = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - tick
    done.set()
    thread.join()
    return max(peak[0], process.memory_info().rss) - start_rss, seconds, result


def one_size(job) -> dict:
    import zarr

    from napari_morphomol.inference.store import chunk_order
    from napari_morphomol.inference.token_maps import write_token_maps
    from napari_morphomol.models import ADDON_TOKEN_HEAD
    from napari_morphomol.tiling import TileGeometry

    side_mm, n_genes, workdir = job
    side_px = int(side_mm * 1000 / 0.5)
    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=side_px, he_width_px=side_px)
    grid_rows, grid_cols = geometry.grid_shape
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(grid_rows), np.arange(grid_cols), indexing="ij"))
    k = 64
    order = chunk_order(rows, cols, k)  # tiles in predict's chunk order: spatially contiguous chunks
    rows, cols = rows[order], cols[order]
    path = Path(workdir) / f"run-{side_mm}mm.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3)
    tiles = root.create_group("tiles")
    tiles.create_array("row", data=rows)
    tiles.create_array("col", data=cols)
    output = root.create_array(ADDON_TOKEN_HEAD, shape=(len(rows), 196, n_genes), dtype=np.float32,
                               chunks=(k, 196, n_genes))
    rng = np.random.default_rng(0)
    for start in range(0, len(rows), k):
        n = min(k, len(rows) - start)
        output[start:start + n] = rng.normal(-1.0, 1.0, size=(n, 196, n_genes)).astype(np.float32)
    n_measured = n_genes // 3
    raster_rows, raster_cols = geometry.raster_shape
    counts = root.create_array("measured_token_counts", shape=(raster_rows, raster_cols, n_measured), dtype=np.uint32,
                               chunks=(256, 256, n_measured))
    for r0 in range(0, raster_rows, 256):
        counts[r0:r0 + 256] = rng.poisson(0.5, size=(min(256, raster_rows - r0), raster_cols, n_measured))
    genes = [f"G{i}" for i in range(n_genes)]
    attrs = {"geometry_args": {"he_pixel_size_um": 0.5, "he_height_px": side_px, "he_width_px": side_px},
             "registration": {"matrix": np.diag([0.5 / 0.2125, 0.5 / 0.2125, 1.0]).tolist()},
             "addon_genes": genes, "measured_genes": genes[:n_measured]}
    peak, seconds, kinds = _peak_rss_during(lambda: write_token_maps(root, attrs))
    maps_bytes = sum(f.stat().st_size for f in (path / "token_maps").rglob("*") if f.is_file())
    predicted = root["token_maps"]["predicted"]
    levels = [predicted[str(level)].shape for level in range(len(predicted))]
    return {"side_mm": side_mm, "tiles": len(rows), "genes": n_genes, "kinds": kinds, "levels": levels,
            "output_bytes": len(rows) * 196 * n_genes * 4, "maps_bytes_on_disk": maps_bytes,
            "peak_rss_bytes": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mm", type=float, nargs="+", default=[4.0, 10.0], help="square sample sides")
    parser.add_argument("--genes", type=int, default=300, help="add-on genes of the token head")
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary folder, removed)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-token-maps-"))
    figures = []
    try:
        for side_mm in args.sizes_mm:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                figure = pool.map(one_size, [(side_mm, args.genes, workdir)])[0]
            figures.append(figure)
            print(f"{side_mm:g} x {side_mm:g} mm: {figure['tiles']} tiles x 196 tokens x {figure['genes']} genes "
                  f"= {figure['output_bytes'] / 1e9:.2f} GB of token head output; wrote {', '.join(figure['kinds'])} "
                  f"maps, levels {[tuple(s[1:]) for s in figure['levels']]}, {figure['maps_bytes_on_disk'] / 1e6:.0f} "
                  f"MB on disk, in {figure['seconds']:.1f} s; peak memory +{figure['peak_rss_bytes'] / 1e6:.0f} MB",
                  flush=True)
            shutil.rmtree(workdir / f"run-{side_mm}mm.zarr", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(figures) > 1:
        first, last = figures[0], figures[-1]
        growth = last["output_bytes"] / first["output_bytes"]
        print(f"area x{(last['side_mm'] / first['side_mm']) ** 2:.2f}: output x{growth:.2f}, "
              f"peak memory x{last['peak_rss_bytes'] / max(first['peak_rss_bytes'], 1):.2f}")


if __name__ == "__main__":
    sys.exit(main())
