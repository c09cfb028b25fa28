"""`morphomol demo` runs the whole path and leaves the files it announces."""

import anndata as ad
import numpy as np
from PIL import Image
from spatialdata import read_zarr

from napari_morphomol.cli import main
from napari_morphomol.export import CELL_LABELS, CELL_TABLE, TILE_TABLE


def test_demo_runs_the_whole_path(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size-mm", "0.4", "0.4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for name in ("results.zarr", "tiles.h5ad", "sample.zarr", "screenshot.png", "cells.h5ad", "token_maps.png",
                 "trust.png", "results-he-alone.zarr", "routes.png"):
        assert (out / name).exists() and str(out / name) in printed
    assert "MKI67 from H&E + Xenium and from the H&E alone, side by side" in printed
    routes = np.asarray(Image.open(out / "routes.png").convert("RGB"))
    assert routes.std() > 10
    assert "MKI67 at tile and token resolution" in printed
    assert "tiles out of distribution; MKI67 with its 90% interval width" in printed
    trust = np.asarray(Image.open(out / "trust.png").convert("RGB"))
    assert trust.std() > 10
    assert ad.read_h5ad(out / "cells.h5ad").obs_names.name == "cell_id"
    maps = np.asarray(Image.open(out / "token_maps.png").convert("RGB"))
    assert maps.std() > 10
    tiles = ad.read_h5ad(out / "tiles.h5ad")
    assert tiles.n_obs > 0 and "X_embedding" in tiles.obsm and "spatial" in tiles.obsm
    exported = read_zarr(out / "sample.zarr")
    assert set(exported.tables) == {TILE_TABLE, CELL_TABLE} and CELL_LABELS in exported.labels
    shot = np.asarray(Image.open(out / "screenshot.png").convert("RGB"))
    assert shot.std() > 10  # a drawn viewer, not a black canvas
    # a second run reuses the sample and the finished prediction
    assert main(["demo", "--out", str(out), "--size-mm", "0.4", "0.4", "--device", "cpu"]) == 0
    assert "reusing the synthetic sample" in capsys.readouterr().out
