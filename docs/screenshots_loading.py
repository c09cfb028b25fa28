"""Screenshots for docs/loading.md: run under a display, e.g. `xvfb-run -a python docs/screenshots_loading.py`.

Uses the demo sample (generated on first use, see napari_morphomol._sample_data).
"""

from pathlib import Path

import napari

from napari_morphomol._sample_data import ensure_demo_sample
from napari_morphomol.widgets.load_sample import LoadSampleWidget
from napari_morphomol.widgets.screenshot import settle

IMAGES = Path(__file__).parent / "images"


def main():
    folder = ensure_demo_sample()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    widget = LoadSampleWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Load sample")
    widget.xenium_dir.value = folder / "xenium"
    widget.he_path.value = folder / "he_image.ome.tif"
    widget.alignment_csv.value = folder / "he_imagealignment.csv"
    widget.load()
    while widget.density is None:
        settle(0.2)
    settle(1.5)
    viewer.window.screenshot(str(IMAGES / "loaded_sample.png"), flash=False)

    camera = viewer.scene.camera
    camera.center = (0, 520, 430)
    camera.zoom *= 6
    settle(1.5)
    viewer.window.screenshot(str(IMAGES / "overlay_he_dapi.png"), flash=False)

    gene = widget.gene_list.choices[0]
    widget.gene_search.value = gene[:3]
    widget.gene_list.value = [gene]
    viewer.layers["DAPI"].visible = False
    camera.zoom /= 6
    widget.add_density_of_selection()
    settle(1.5)
    viewer.window.screenshot(str(IMAGES / "gene_density.png"), flash=False)

    viewer.layers[f"density: {gene}"].visible = False
    camera.zoom *= 4
    worker = widget.refresh_points_in_view()
    while "transcripts in view" not in viewer.layers:
        settle(0.2)
    settle(1.5)
    viewer.window.screenshot(str(IMAGES / "transcripts_in_view.png"), flash=False)
    del worker
    viewer.close()


if __name__ == "__main__":
    main()
