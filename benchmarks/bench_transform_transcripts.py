"""Map 50 M transcripts from ``global`` px to H&E px; print throughput and ratios.

Baseline, measured in the same run: plain numpy, ``np.column_stack([x, y]) @ L.T + t`` on the
whole (N, 2) float64 array (what one writes without thinking about chunks). Ours:
``transform_xy_columns`` (columns, chunks, thread pool) for an affine fit, on float32
columns as Xenium stores them and on float64, and for a per-region fit (inverse solved by
Newton steps per point). Run: ``python benchmarks/bench_transform_transcripts.py [N]``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from napari_morphomol.registration import FitOptions, LandmarkPairs, fit_transform, transform_xy_columns

TRUTH = np.array([[1.2841, 0.0312, 812.25], [-0.0298, 1.2853, -431.5], [0.0, 0.0, 1.0]])


def timed(fn, repeat: int = 3) -> float:
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(n_points: int) -> None:
    rng = np.random.default_rng(0)
    extent = 40000.0
    he = rng.uniform(0, extent / 1.3, (36, 2))
    warp = 15.0 * np.sin(he / 3000.0)
    pairs = LandmarkPairs.from_arrays(he, he @ TRUTH[:2, :2].T + TRUTH[:2, 2] + warp)
    affine = fit_transform(pairs, FitOptions("affine"), leave_one_out=False)
    per_region = fit_transform(pairs, FitOptions("per-region"), leave_one_out=False)
    x32 = rng.uniform(0, extent, n_points).astype(np.float32)
    y32 = rng.uniform(0, extent, n_points).astype(np.float32)
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    inverse = np.linalg.inv(affine.matrix)

    def baseline():
        return np.column_stack([x64, y64]) @ inverse[:2, :2].T + inverse[:2, 2]

    t_base = timed(baseline)
    t_aff32 = timed(lambda: transform_xy_columns(affine, x32, y32, inverse=True))
    t_aff64 = timed(lambda: transform_xy_columns(affine, x64, y64, inverse=True))
    t_region = timed(lambda: transform_xy_columns(per_region, x64, y64, inverse=True), repeat=1)

    ours = np.column_stack(transform_xy_columns(affine, x64, y64, inverse=True))
    assert np.allclose(ours, baseline(), atol=1e-6), "chunked result differs from the baseline"

    m = n_points / 1e6
    regions = len(per_region.transform.region_matrices)
    print(f"{m:.0f} M transcripts, global px -> H&E px, best of 3 (per-region: 1 run)")
    print(f"  baseline numpy (N,2) float64 matmul : {t_base:6.2f} s  {m / t_base:7.1f} M/s  1.00x")
    for label, t in [
        ("affine, float32 columns (chunked)   ", t_aff32),
        ("affine, float64 columns (chunked)   ", t_aff64),
        (f"per-region ({regions} regions), float64    ", t_region),
    ]:
        print(f"  {label}: {t:6.2f} s  {m / t:7.1f} M/s  {t_base / t:4.2f}x")


if __name__ == "__main__":
    main(int(float(sys.argv[1])) if len(sys.argv) > 1 else 50_000_000)
