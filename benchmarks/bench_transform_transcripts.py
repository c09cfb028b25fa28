"""Map 50 M transcripts from ``global`` px to H&E px; print throughput, ratios and the grid's error.

Baseline, measured in the same run: plain numpy, ``np.column_stack([x, y]) @ L.T + t`` on the
whole (N, 2) float64 array (what one writes without thinking about chunks). Ours:
``transform_xy_columns`` (columns, chunks, thread pool) for an affine fit, on float32 columns as
Xenium stores them and on float64, and for a per-region fit: read from its inverse grid (the
default; the grid is built once, before the timed runs, and its build time printed), and solved
exactly by Newton steps per point (``exact=True``, on a sample). The largest distance between the
two on that sample is the error of the grid. ``--tps`` adds the thin-plate spline (its grid takes
about half a minute to build: each exact inverse costs ~10 us).
Run: ``python benchmarks/bench_transform_transcripts.py [N] [--tps]``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from napari_morphomol.registration import FitOptions, LandmarkPairs, fit_transform, transform_xy_columns
from napari_morphomol.registration.transforms import INVERSE_GRID_TOLERANCE_PX

TRUTH = np.array([[1.2841, 0.0312, 812.25], [-0.0298, 1.2853, -431.5], [0.0, 0.0, 1.0]])
EXACT_SAMPLE_POINTS = 2_000_000


def timed(fn, repeat: int = 3) -> float:
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(n_points: int, with_tps: bool) -> None:
    rng = np.random.default_rng(0)
    extent = 40000.0
    he = rng.uniform(0, extent / 1.3, (36, 2))
    warp = 15.0 * np.sin(he / 3000.0)
    pairs = LandmarkPairs.from_arrays(he, he @ TRUTH[:2, :2].T + TRUTH[:2, 2] + warp)
    affine = fit_transform(pairs, FitOptions("affine"), leave_one_out=False)
    x32 = rng.uniform(0, extent, n_points).astype(np.float32)
    y32 = rng.uniform(0, extent, n_points).astype(np.float32)
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    inverse = np.linalg.inv(affine.matrix)

    def baseline():
        return np.column_stack([x64, y64]) @ inverse[:2, :2].T + inverse[:2, 2]

    t_base = timed(baseline)
    rows = [
        ("affine, float32 columns (chunked)", timed(lambda: transform_xy_columns(affine, x32, y32, inverse=True))),
        ("affine, float64 columns (chunked)", timed(lambda: transform_xy_columns(affine, x64, y64, inverse=True))),
    ]
    ours = np.column_stack(transform_xy_columns(affine, x64, y64, inverse=True))
    assert np.allclose(ours, baseline(), atol=1e-6), "chunked result differs from the baseline"
    del ours

    # a sample over the grid and 10 % beyond the points' extent on every side (off-grid points included)
    sx = rng.uniform(-0.1 * extent, 1.1 * extent, EXACT_SAMPLE_POINTS)
    sy = rng.uniform(-0.1 * extent, 1.1 * extent, EXACT_SAMPLE_POINTS)
    half = extent / 2.6
    quadrants = tuple(((x0, y0), (x0 + half, y0), (x0 + half, y0 + half), (x0, y0 + half))
                      for x0 in (0.0, half) for y0 in (0.0, half))
    models = [("per-region", FitOptions("per-region")),
              ("per-region, 4 polygons", FitOptions("per-region", region_polygons_he_px=quadrants))]
    if with_tps:
        models.append(("tps", FitOptions("tps")))
    checks = []
    for name, options in models:
        fitted = fit_transform(pairs, options, leave_one_out=False)
        start = time.perf_counter()
        grid = fitted.transform.inverse_grid()
        build = time.perf_counter() - start
        transform_xy_columns(fitted, x32[:1000], y32[:1000], inverse=True)  # compile the kernels (cached on disk)
        if options.n_regions is None and options.model == "per-region" and options.region_polygons_he_px is None:
            name = f"per-region ({len(fitted.transform.linear_parts())} regions)"
        how = "grid" if grid is not None else "compiled Newton"
        for label, x, y in [("float32", x32, y32), ("float64", x64, y64)]:
            seconds = timed(lambda f=fitted, x=x, y=y: transform_xy_columns(f, x, y, inverse=True))
            rows.append((f"{name}, {how}, {label} columns", seconds))
        start = time.perf_counter()
        ex, ey = transform_xy_columns(fitted, sx, sy, inverse=True, exact=True)
        exact_s = time.perf_counter() - start
        fx, fy = transform_xy_columns(fitted, sx, sy, inverse=True)
        checks.append((name, how, grid, build, exact_s, float(np.max(np.hypot(fx - ex, fy - ey)))))

    m = n_points / 1e6
    print(f"{m:.0f} M transcripts, global px -> H&E px, best of 3")
    print(f"  {'baseline numpy (N,2) float64 matmul':<52}: {t_base:6.2f} s  {m / t_base:7.1f} M/s  1.00x")
    for label, t in rows:
        print(f"  {label:<52}: {t:6.2f} s  {m / t:7.1f} M/s  {t_base / t:5.2f}x")
    s = EXACT_SAMPLE_POINTS / 1e6
    for name, how, grid, build, exact_s, error in checks:
        print(f"  {name}, numpy Newton (exact=True), {s:.0f} M sample points: {exact_s:6.2f} s  "
              f"{s / exact_s:7.1f} M/s  {t_base * s / m / exact_s:5.2f}x")
        if grid is not None:
            rows_n, cols_n = grid.nodes_he_px.shape[:2]
            print(f"    grid: {cols_n} x {rows_n} nodes, pitch {grid.pitch_global_px:.1f} global px, "
                  f"{grid.nbytes / 1e6:.1f} MB, built in {build:.2f} s; error at its cells' centres and edge "
                  f"midpoints {grid.max_error_px:.4f} px")
        print(f"    {how} vs numpy Newton, max over the {s:.0f} M sample points: {error:.5f} H&E px "
              f"(tolerance {INVERSE_GRID_TOLERANCE_PX} px)")

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--tps"]
    main(int(float(args[0])) if args else 50_000_000, "--tps" in sys.argv)
