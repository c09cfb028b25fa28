"""Screenshots of a run as napari shows it (used by ``morphomol demo`` and the docs); the window is
shown (an unshown canvas renders black): run under a display or ``xvfb-run``."""

from __future__ import annotations

import time
from pathlib import Path

import napari
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication

from napari_morphomol.layers.run import gene_map_layer, he_alone_in_frame_of, outlier_layer
from napari_morphomol.layers.sample import sample_layers


def settle(seconds: float = 1.0) -> None:
    """Let Qt draw (and napari fetch the visible multiscale tiles) for a moment."""
    app = QApplication.instance()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def _save_window(viewer, add_layers, path: Path, size_px: tuple[int, int]) -> Path:
    """Add layers to the shown ``viewer`` (``add_layers(viewer)``), draw it with a scale bar at
    ``size_px`` (height, width), save the window as PNG and close the viewer."""
    try:
        add_layers(viewer)
        viewer.canvas.overlays.scale_bar.visible = True
        viewer.window._qt_window.resize(size_px[1], size_px[0])
        viewer.reset_view()
        settle()
        viewer.window.screenshot(str(path), flash=False)
    finally:
        viewer.close()
    return path


def screenshot_maps(explorer, gene: str, path: str | Path, *, size_px: tuple[int, int] = (900, 1800)) -> Path:
    """One gene's maps of a run side by side (napari grid mode), left to right: predicted at tile
    resolution, predicted at token resolution, measured at token resolution (the last only when
    the sample measured the gene); saved as PNG. Needs a run of a token-head model.
    """
    kinds = [("predicted", "tile"), ("predicted", "token")]
    if explorer.is_measured(gene):
        kinds.append(("measured", "token"))

    def add_layers(viewer):
        for kind, resolution in kinds:  # napari's grid puts the first layer added on the left
            data, kwargs, _ = gene_map_layer(explorer, gene, kind, resolution)
            kwargs["name"] = f"{gene} {kind}, {resolution}"
            viewer.add_image(data, **kwargs)
        viewer.grid.enabled = True
        viewer.grid.shape = (1, len(kinds))
        viewer.canvas.overlays.text.text = f"{gene}: " + " | ".join(f"{k}, {r}" for k, r in kinds)
        viewer.canvas.overlays.text.visible = True

    return _save_window(napari.Viewer(show=True), add_layers, Path(path), size_px)


def screenshot_trust(explorer, gene: str, path: str | Path, *, size_px: tuple[int, int] = (900, 1800)) -> Path:
    """A calibrated run's trust in one picture (napari grid mode, two layers a panel): left the
    predicted map of ``gene`` at token resolution (tile for a tile-only model), right the width of
    its interval, both with the tiles flagged out of distribution greyed out; saved as PNG."""
    resolution = "token" if explorer.has_token_maps else "tile"
    level = f"{explorer.trust.level:.0%}"

    def add_layers(viewer):
        for kind, title in (("predicted", f"{gene} predicted"), ("interval", f"{gene} {level} interval width")):
            data, kwargs, _ = gene_map_layer(explorer, gene, kind, resolution)
            kwargs["name"] = title
            viewer.add_image(data, **kwargs).colorbar.visible = True
            data, kwargs, _ = outlier_layer(explorer)
            kwargs["name"] = f"{title}: out of distribution"
            viewer.add_labels(data, **kwargs)
        viewer.grid.enabled = True
        viewer.grid.stride = 2
        viewer.grid.shape = (1, 2)
        viewer.canvas.overlays.text.text = (f"{gene} at {resolution} resolution: predicted | {level} interval width; "
                                            f"grey: {int(explorer.trust.outlier_flag.sum())} tiles out of "
                                            "distribution")
        viewer.canvas.overlays.text.visible = True

    return _save_window(napari.Viewer(show=True), add_layers, Path(path), size_px)


def screenshot_routes(explorers: dict, gene: str, path: str | Path, *, size_px: tuple[int, int] = (900, 1800)
                      ) -> Path:
    """One slide's predictions of ``gene`` by each route, side by side (napari grid mode, one
    panel per run, left to right in the order of ``explorers``, a title -> ``RunExplorer`` map):
    at token resolution when every run has token maps (else tile), with the contrast limits of the
    first, so equal colours are equal values, and in the first run's frame (an H&E alone of the
    same slide is carried into its Xenium frame by its registration); saved as PNG."""
    resolution = "token" if all(e.has_token_maps for e in explorers.values()) else "tile"
    first = next(iter(explorers.values()))

    def add_layers(viewer):
        limits = None
        for title, explorer in explorers.items():
            data, kwargs, _ = gene_map_layer(explorer, gene, "predicted", resolution)
            into_first = he_alone_in_frame_of(first, explorer)
            if into_first is not None:
                kwargs["affine"] = into_first @ kwargs["affine"]
            kwargs["name"] = f"{gene} predicted, {title}"
            limits = kwargs.get("contrast_limits") if limits is None else limits
            kwargs["contrast_limits"] = limits
            viewer.add_image(data, **kwargs).colorbar.visible = True
        viewer.grid.enabled = True
        viewer.grid.shape = (1, len(explorers))
        viewer.canvas.overlays.text.text = (f"{gene} predicted at {resolution} resolution, one colour scale: "
                                            + " | ".join(explorers))
        viewer.canvas.overlays.text.visible = True

    return _save_window(napari.Viewer(show=True), add_layers, Path(path), size_px)


def screenshot_product(sdata, explorer, gene: str, path: str | Path, *, size_px: tuple[int, int] = (1000, 1600)
                       ) -> Path:
    """The first picture a newcomer sees: the sample's H&E with ``gene`` predicted over it, its colour
    bar and the Explore dock beside it (clusters computed: their legend, the metrics, the trust note),
    as a user has it after the demo's steps; saved as PNG."""
    from napari_morphomol.widgets.explore import ExploreWidget

    def add_layers(viewer):
        for data, kwargs, kind in sample_layers(sdata, with_density=False):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        for layer in list(viewer.layers)[1:]:  # the H&E under the map; DAPI and the rest hidden
            layer.visible = False
        dock = ExploreWidget(viewer)
        viewer.window.add_dock_widget(dock, name="Explore predictions")
        dock.set_explorer(explorer)
        dock._on_clusters(explorer.cluster())  # the clusters' legend, in the dock
        dock.gene_list.setCurrentItem(dock.gene_list.findItems(gene, Qt.MatchExactly)[0])  # back to the gene
        settle(0.3)
        dock.scroll.ensureWidgetVisible(dock.legend)  # the dock scrolls: show its clusters' legend

    return _save_window(napari.Viewer(show=True), add_layers, Path(path), size_px)
