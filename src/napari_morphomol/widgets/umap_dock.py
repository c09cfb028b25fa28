"""Dock widget "UMAP of tiles": a matplotlib scatter of the tiles' UMAP with a lasso."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.path import Path as PolygonPath
from matplotlib.widgets import LassoSelector
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from napari_morphomol.layers.run import MAP_PERCENTILES
from napari_morphomol.layers.view import percentile_limits

SELECTED_EDGE = "#ffff00"
UNSELECTED_ALPHA = 0.35


class UmapDock(QWidget):
    """Points are tiles (results rows); a lasso selects tiles and reports them to ``on_select``."""

    def __init__(self, umap_xy: np.ndarray, on_select: Callable[[np.ndarray], None], parent=None):
        super().__init__(parent)
        self.umap_xy = np.asarray(umap_xy, dtype=np.float64)
        self.on_select = on_select
        self.selected = np.zeros(len(self.umap_xy), dtype=bool)
        self.figure = Figure(figsize=(4, 4), facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumSize(280, 280)
        self.axes = self.figure.add_subplot(111)
        self.axes.set_facecolor("#262930")
        self.axes.tick_params(colors="#a0a0a0", labelsize=7)
        for spine in self.axes.spines.values():
            spine.set_color("#606060")
        self.axes.set_xlabel("UMAP 1", color="#d0d0d0", fontsize=8)
        self.axes.set_ylabel("UMAP 2", color="#d0d0d0", fontsize=8)
        self.scatter = self.axes.scatter(self.umap_xy[:, 0], self.umap_xy[:, 1], s=self._marker_size(), linewidths=0)
        self.colorbar = None
        self.figure.tight_layout()
        self.caption = QLabel("lasso: drag around points to select tiles")
        self.caption.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.canvas)
        layout.addWidget(self.caption)
        self.lasso = LassoSelector(self.axes, onselect=self.select_polygon, props={"color": SELECTED_EDGE})
        self._base_rgba = np.tile(to_rgba("#c0c0c0"), (len(self.umap_xy), 1))
        self._redraw()

    def _marker_size(self) -> float:
        return float(np.clip(4000.0 / max(len(self.umap_xy), 1), 1.0, 40.0))

    # colouring ---------------------------------------------------------------------------------
    def color_by_cluster(self, codes: np.ndarray, colors: list[str], title: str) -> None:
        palette = np.array([to_rgba(c) for c in colors])
        self._base_rgba = palette[np.asarray(codes, dtype=np.int64)]
        self._set_colorbar(None)
        self.axes.set_title(title, color="#d0d0d0", fontsize=9)
        self._redraw()

    def color_by_values(self, values: np.ndarray, title: str, units: str, cmap: str = "magma") -> None:
        from matplotlib import colormaps
        from matplotlib.colors import Normalize

        values = np.asarray(values, dtype=np.float64)
        norm = Normalize(*percentile_limits(values, MAP_PERCENTILES))
        self._base_rgba = colormaps[cmap](norm(values))
        self._set_colorbar((norm, cmap, units))
        self.axes.set_title(title, color="#d0d0d0", fontsize=9)
        self._redraw()

    def _set_colorbar(self, spec) -> None:
        from matplotlib.cm import ScalarMappable

        if self.colorbar is not None:
            self.colorbar.remove()
            self.colorbar = None
        if spec is not None:
            norm, cmap, units = spec
            self.colorbar = self.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=self.axes, fraction=0.046)
            self.colorbar.set_label(units, color="#d0d0d0", fontsize=8)
            self.colorbar.ax.tick_params(colors="#a0a0a0", labelsize=7)

    # selection ---------------------------------------------------------------------------------
    def select_polygon(self, vertices) -> None:
        """The lasso's callback: the tiles inside the polygon become the selection."""
        inside = PolygonPath(np.asarray(vertices, dtype=np.float64)).contains_points(self.umap_xy)
        self.set_selection(np.flatnonzero(inside))
        self.on_select(np.flatnonzero(inside))

    def set_selection(self, tiles: np.ndarray) -> None:
        self.selected[:] = False
        self.selected[np.asarray(tiles, dtype=np.int64)] = True
        n = int(self.selected.sum())
        self.caption.setText(f"{n} tiles selected" if n else "lasso: drag around points to select tiles")
        self._redraw()

    def _redraw(self) -> None:
        rgba = self._base_rgba.copy()
        if self.selected.any():
            rgba[~self.selected, 3] = UNSELECTED_ALPHA
        self.scatter.set_facecolors(rgba)
        self.scatter.set_edgecolors(np.where(self.selected[:, None], to_rgba(SELECTED_EDGE), (0, 0, 0, 0)))
        self.scatter.set_linewidths(np.where(self.selected, 1.0, 0.0))
        self.figure.tight_layout()
        self.canvas.draw_idle()
