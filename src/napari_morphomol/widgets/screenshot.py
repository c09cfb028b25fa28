"""Screenshots of a sample as napari shows it (used by ``morphomol demo`` and the docs)."""

from __future__ import annotations

from pathlib import Path

import napari

from napari_morphomol._layers import sample_layers


def screenshot_sample(sdata, path: str | Path, *, size_px: tuple[int, int] = (1000, 1400)) -> Path:
    """Open the sample's layers in an offscreen viewer and save what the canvas shows as PNG."""
    path = Path(path)
    viewer = napari.Viewer(show=False)
    try:
        for data, kwargs, kind in sample_layers(sdata):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        viewer.scale_bar.visible = True
        viewer.window._qt_window.resize(size_px[1], size_px[0])
        viewer.reset_view()
        viewer.screenshot(str(path), canvas_only=True, flash=False)
    finally:
        viewer.close()
    return path
