"""Screenshots of "Explore predictions" for docs/images/ (run under Xvfb):

    xvfb-run -a -s "-screen 0 1800x1100x24" .venv/bin/python scripts/screenshot_explore.py \
        --workdir /tmp/explore-shots [--checkpoint MODEL.safetensors] [--gene MKI67]

Writes a 1.2 mm synthetic sample and predicts it (with ``--checkpoint``, or a tiny randomly
initialised model when none is given: the maps then show the plumbing, not a model's skill),
then saves: the predicted map beside the measured one, the clusters with their legend, and the
UMAP dock with a lasso selection highlighted on the map.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import napari
import numpy as np

from napari_morphomol.analysis import explore_run
from napari_morphomol.inference import PredictOptions, predict
from napari_morphomol.io.sample import load_sample
from napari_morphomol.layers.run import (
    CLUSTERS_LAYER,
    MEASURED_LAYER,
    PREDICTED_LAYER,
    SELECTION_LAYER,
)
from napari_morphomol.layers.sample import sample_layers
from napari_morphomol.synthetic import SyntheticSample, write_synthetic_sample
from napari_morphomol.widgets.explore import ExploreWidget
from napari_morphomol.widgets.screenshot import settle

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def tiny_checkpoint(sample, out: Path) -> Path:
    import torch

    from napari_morphomol.models import ModelCard, ModelConfig, build_model, save_checkpoint

    panel = json.loads(sample.panel_json.read_text())
    torch.manual_seed(0)
    config = ModelConfig(n_core_genes=len(panel["core"]), n_addon_genes=len(panel["addon"]),
                         backbone_kwargs={"depth": 2, "embed_dim": 192, "num_heads": 3})
    return save_checkpoint(build_model(config), ModelCard(config, tuple(panel["core"]), tuple(panel["addon"])), out)


def show_only(viewer, names):
    for layer in viewer.layers:
        layer.visible = layer.name in names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--gene", help="add-on gene of the first screenshot (default: the best predicted by Pearson)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sample_root = args.workdir / "sample"
    if (sample_root / "panel.json").exists():
        sample = SyntheticSample.at(sample_root)
    else:
        sample = write_synthetic_sample(sample_root, size_mm=(1.2, 1.2), seed=0, deformation=False)
    checkpoint = args.checkpoint or tiny_checkpoint(sample, args.workdir / "tiny.safetensors")
    sdata = load_sample(sample.xenium_dir, sample.he_path, sample.alignment_csv)
    store = args.workdir / "RESULTS.zarr"
    if not store.exists():  # a finished run in the workdir is reused as it is
        predict(sdata, PredictOptions(checkpoint=checkpoint, store=store, batch_size=8, device="cpu"))

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1750, 1050)
    for data, kwargs, kind in sample_layers(sdata, with_density=False):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = ExploreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explore predictions")
    widget.set_explorer(explore_run(store))
    gene = args.gene or widget.explorer.metrics["pearson"].idxmax()
    widget.show_gene(gene)
    rows = [i for i in range(widget.metrics_table.rowCount()) if widget.metrics_table.item(i, 0).text() == gene]
    widget.metrics_table.selectRow(rows[0])
    x, y = widget.explorer.results.tiles[["um_x", "um_y"]].to_numpy()[len(widget.explorer.results.tiles) // 2]
    widget.inspect_at_um(x, y)

    # 1. predicted beside measured
    show_only(viewer, {PREDICTED_LAYER, MEASURED_LAYER})
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 2)
    viewer.reset_view()
    settle(2.0)
    layers = list(viewer.layers)
    column = {name: viewer.grid.position(layers.index(viewer.layers[name]), layers)[1]
              for name in (PREDICTED_LAYER, MEASURED_LAYER)}
    left_first = column[PREDICTED_LAYER] < column[MEASURED_LAYER]
    sides = ("predicted", "measured") if left_first else ("measured", "predicted")
    viewer.canvas.overlays.text.text = f"{gene}: left {sides[0]}, right {sides[1]} (log1p counts per tile)"
    settle(0.5)
    viewer.window.screenshot(str(IMAGES / "explore_predicted_vs_measured.png"), flash=False)
    viewer.grid.enabled = False
    widget.show_gene(gene)  # the overlay's usual text again

    # 2. clusters with the legend
    widget._on_clusters(widget.explorer.cluster())
    show_only(viewer, {"H&E", CLUSTERS_LAYER})
    viewer.layers[CLUSTERS_LAYER].opacity = 0.55
    viewer.reset_view()
    settle(2.0)
    viewer.window.screenshot(str(IMAGES / "explore_clusters_legend.png"), flash=False)

    # 3. UMAP dock with a lasso selection shown on the map
    umap = widget.explorer.adata.obsm["X_umap"]
    centre = np.median(umap, axis=0)
    radius = 0.6 * np.median(np.linalg.norm(umap - centre, axis=1))
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    widget.umap_dock.select_polygon(centre + radius * np.c_[np.cos(angles), np.sin(angles)])
    widget.umap_colour.setCurrentText("cluster")
    show_only(viewer, {"H&E", CLUSTERS_LAYER, SELECTION_LAYER})
    viewer.layers.selection.active = viewer.layers[SELECTION_LAYER]
    settle(2.0)
    viewer.window.screenshot(str(IMAGES / "explore_umap_dock.png"), flash=False)
    print("wrote", *(IMAGES / n for n in ("explore_predicted_vs_measured.png", "explore_clusters_legend.png",
                                          "explore_umap_dock.png")))
    viewer.close()


if __name__ == "__main__":
    main()
