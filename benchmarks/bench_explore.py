"""Explore: switching the shown gene on a 3,000-tile run, and PCA + Leiden + UMAP on 20,000 tiles.

Prints figures measured in this run on this machine, on synthetic arrays shaped like a run of the
paper's model (100 add-on genes, 384-d embeddings with cluster structure):

- ``switch``: wall time of ``ExploreWidget.show_gene`` (stride map, contrast, the data of the
  predicted / measured / residual layers, the viewer redraw) on a 3,000-tile run, first view of a
  gene (map computed) and again (cached); target under 100 ms. Ratio against the bare
  ``layer.data = raster`` update of one layer measured in the same run. ``--resolution token``
  does the same at token resolution (18 um) for a run of a model with the add-on token head;
  about 1,000 tiles is a 16 mm^2 sample.
- ``clusters``: ``add_clusters`` (PCA 31, neighbours, Leiden 0.5 and 1.0, UMAP) on 20,000 tiles,
  numba and BLAS limited to 2 threads; ratio against PCA alone in the same run.

Run: ``xvfb-run -a python benchmarks/bench_explore.py [--section switch|clusters] [--switch-tiles N]
[--resolution tile|token]``
(``switch`` needs a display; ``clusters`` does not).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np
import pandas as pd

from napari_morphomol.inference import Results
from napari_morphomol.tiling import TileGeometry

N_GENES = 100
EMBEDDING_DIM = 384


def synthetic_results(n_tiles: int, seed: int = 0, n_states: int = 8, token_head: bool = False) -> Results:
    """A square-ish tissue of ``n_tiles`` tiles on a 0.5 um/px H&E, hidden states driving genes and
    embeddings; with ``token_head`` also per-token predictions and measured counts per token."""
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(n_tiles))
    geometry = TileGeometry(he_pixel_size_um=0.5, he_height_px=256 * (side + 1), he_width_px=256 * (side + 1))
    rows, cols = np.divmod(np.arange(n_tiles), side)
    state = ((rows // 8) * 3 + cols // 8) % n_states
    gene_means = rng.gamma(2.0, 1.0, size=(n_states, N_GENES))
    measured = rng.poisson(gene_means[state] * 20).astype(np.uint32)
    predictions = (np.log1p(measured) + rng.normal(scale=0.3, size=measured.shape)).astype(np.float32)
    centres = rng.normal(scale=3.0, size=(n_states, EMBEDDING_DIM))
    embeddings = (centres[state] + rng.normal(size=(n_tiles, EMBEDDING_DIM))).astype(np.float32)
    s = 256.0
    tiles = pd.DataFrame({"tile_id": rows * side + cols, "row": rows, "col": cols,
                          "he_x0": cols * s, "he_y0": rows * s, "he_x1": cols * s + 512, "he_y1": rows * s + 512})
    he_to_global = np.diag([0.5 / 0.2125, 0.5 / 0.2125, 1.0])
    tiles["global_x"] = (cols + 1) * s * he_to_global[0, 0]
    tiles["global_y"] = (rows + 1) * s * he_to_global[1, 1]
    tiles["um_x"], tiles["um_y"] = tiles["global_x"] * 0.2125, tiles["global_y"] * 0.2125
    tiles["n_transcripts"] = tiles["n_core"] = measured.sum(axis=1).astype(np.int64)
    tiles["n_addon"] = 0
    genes = [f"GENE{i:03d}" for i in range(N_GENES)]
    metadata = {"geometry_args": {f.name: getattr(geometry, f.name) for f in dataclasses.fields(geometry)},
                "registration": {"model": "affine", "matrix": he_to_global.tolist()},
                "sample": {"xenium_pixel_size_um": 0.2125},
                "outputs": [{"name": "predictions", "level": "tile", "width": N_GENES},
                            {"name": "embeddings", "level": "tile", "width": EMBEDDING_DIM}]}
    outputs = {"predictions": predictions, "embeddings": embeddings}
    measured_tokens = None
    if token_head:
        token_rates = np.repeat(np.log(gene_means[state] * 20 / 196)[:, None, :], 196, axis=1)
        outputs["addon_tokens"] = (token_rates + rng.normal(scale=0.5, size=token_rates.shape)).astype(np.float32)
        metadata["outputs"].append({"name": "addon_tokens", "level": "token", "width": N_GENES})
        measured_tokens = rng.poisson(0.1, size=(*geometry.raster_shape, N_GENES)).astype(np.uint32)
    return Results(Path(f"synthetic-{n_tiles}.zarr"), tiles, genes, outputs, genes, measured, metadata,
                   measured_tokens)


def bench_switch(n_tiles: int, repeats: int = 20, resolution: str = "tile") -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_morphomol.analysis import explore_results
    from napari_morphomol.widgets.explore import ExploreWidget

    explorer = explore_results(synthetic_results(n_tiles, token_head=resolution == "token"))
    viewer = napari.Viewer(show=True)
    widget = ExploreWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_explorer(explorer)
    widget.set_resolution(resolution)
    app = QApplication.instance()
    app.processEvents()

    cpu = {"first": [], "again": []}

    def timed(gene: str, phase: str) -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        widget.show_gene(gene)
        app.processEvents()  # the redraw the user waits for
        cpu[phase].append(time.process_time() - start_cpu)
        return time.perf_counter() - start

    first = [timed(g, "first") for g in explorer.genes[1:1 + repeats]]
    again = [timed(g, "again") for g in explorer.genes[1:1 + repeats]]
    layer = widget.map_layers["predicted"]
    map_of = explorer.gene_map if resolution == "tile" else explorer.token_map
    rasters = [map_of(g) for g in explorer.genes[1:1 + repeats]]
    bare = []
    for raster in rasters:
        start = time.perf_counter()
        layer.data = raster
        app.processEvents()
        bare.append(time.perf_counter() - start)
    med = {name: float(np.median(v)) * 1000 for name, v in (("first", first), ("again", again), ("bare", bare))}
    shape = explorer.grid.shape if resolution == "tile" else explorer.token_grid.shape
    print(f"switch: {n_tiles} tiles, {resolution} map {shape}, 3 map layers")
    print(f"  show_gene first view  median {med['first']:.1f} ms (max {max(first) * 1000:.1f}); target < 100 ms")
    print(f"  show_gene cached      median {med['again']:.1f} ms")
    print(f"  process CPU per switch (first, cached): {np.median(cpu['first']) * 1000:.1f}, "
          f"{np.median(cpu['again']) * 1000:.1f} ms; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  bare layer.data       median {med['bare']:.1f} ms (one layer)")
    print(f"  ratio first / bare    {med['first'] / med['bare']:.2f}")
    viewer.close()


def bench_clusters(n_tiles: int) -> None:
    import anndata as ad
    import scanpy as sc

    from napari_morphomol.analysis import add_clusters

    results = synthetic_results(n_tiles)
    adata = ad.AnnData(X=results.predictions)
    adata.obsm["X_embedding"] = results.embeddings
    warm = ad.AnnData(X=np.zeros((200, 2), np.float32))
    warm.obsm["X_embedding"] = results.embeddings[:200]
    start = time.perf_counter()
    add_clusters(warm)  # numba compilation, paid once per process
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    sc.pp.pca(ad.AnnData(X=results.embeddings), n_comps=31, svd_solver="arpack", random_state=0)
    pca_s = time.perf_counter() - start
    start = time.perf_counter()
    add_clusters(adata)
    total_s = time.perf_counter() - start
    n = {k: adata.obs[k].cat.categories.size for k in ("leiden_0.5", "leiden_1.0")}
    print(f"clusters: {n_tiles} tiles x {EMBEDDING_DIM}-d, threads: numba {os.environ['NUMBA_NUM_THREADS']}, "
          f"BLAS {os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"  first call on 200 tiles (numba compile) {compile_s:.1f} s")
    print(f"  PCA alone                 {pca_s:.2f} s")
    print(f"  add_clusters (PCA, neighbours, Leiden 0.5 + 1.0, UMAP) {total_s:.1f} s; "
          f"ratio to PCA alone {total_s / pca_s:.0f}x; clusters {n}; load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["switch", "clusters"], action="append")
    parser.add_argument("--switch-tiles", type=int, default=3000)
    parser.add_argument("--cluster-tiles", type=int, default=20000)
    parser.add_argument("--resolution", choices=["tile", "token"], default="tile", help="maps of the switch section")
    args = parser.parse_args()
    sections = args.section or ["switch", "clusters"]
    if "switch" in sections:
        bench_switch(args.switch_tiles, resolution=args.resolution)
    if "clusters" in sections:
        bench_clusters(args.cluster_tiles)


if __name__ == "__main__":
    main()
