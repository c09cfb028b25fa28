"""One epoch's worth of training items from tiles stores: images held in memory vs read per item.

Baseline, measured in the same run: the same ``TileDataset`` reading each tile image from its
zarr sidecar (one chunk decode per item, as every sample larger than the in-memory limit does).
Ours: the images read into memory once (samples up to 256 MiB of tiles). Both build every item
(image, 196 x G_core tokens, targets) the way the DataLoader asks for them. Usage:

    python benchmarks/bench_tile_dataset.py STORE.tiles.zarr [STORE ...]

e.g. the cohort of ``bench_variants.py`` (/tmp/morphomol-bench-variants/seed10*.tiles.zarr).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_morphomol.models import data
from napari_morphomol.models.data import TileDataset


def epoch_seconds(datasets: list[TileDataset]) -> float:
    start = time.perf_counter()
    for dataset in datasets:
        for position in np.random.default_rng(0).permutation(len(dataset)):
            dataset[int(position)]
    return time.perf_counter() - start


def main(paths: list[str]) -> None:
    in_memory = [TileDataset.from_store(path) for path in paths]
    limit, data._IMAGES_IN_MEMORY_BYTES = data._IMAGES_IN_MEMORY_BYTES, 0  # as for a sample above the limit
    from_zarr = [TileDataset.from_store(path) for path in paths]
    data._IMAGES_IN_MEMORY_BYTES = limit
    n_tiles = sum(len(d) for d in in_memory)
    baseline = min(epoch_seconds(from_zarr) for _ in range(2))
    ours = min(epoch_seconds(in_memory) for _ in range(2))
    print(f"{n_tiles} tiles from {len(paths)} store(s), one pass in random order, best of 2")
    print(f"  baseline, image read from zarr per item : {baseline:6.2f} s  {n_tiles / baseline:8.0f} tiles/s  1.00x")
    print(f"  images held in memory                  : {ours:6.2f} s  {n_tiles / ours:8.0f} tiles/s  "
          f"{baseline / ours:5.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", metavar="STORE", help="tiles stores (.tiles.zarr) with their image caches")
    main(parser.parse_args().stores)
