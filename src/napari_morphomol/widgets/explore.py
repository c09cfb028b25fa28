"""Dock widget "Explore predictions": gene maps, metrics, tile inspector, clusters and the UMAP dock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import FileEdit
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_morphomol.analysis import (
    EXPRESSION_UNITS,
    PAPER_N_PCS,
    TOKEN_EXPRESSION_UNITS,
    RunExplorer,
    explore_run,
)
from napari_morphomol.analysis.gene_maps import require_token_head
from napari_morphomol.coords import napari_to_xy
from napari_morphomol.errors import InputError
from napari_morphomol.layers.run import (
    CLUSTERS_LAYER,
    INTERVAL_LAYER,
    MAP_COLORMAPS,
    MAP_UNITS,
    OUTLIER_LAYER,
    PCA_LAYER,
    RESOLUTIONS,
    SELECTION_LAYER,
    cluster_label_colors,
    cluster_labels,
    clusters_layer,
    gene_map_layer,
    map_affine_um,
    map_limits,
    map_raster,
    outlier_layer,
    pca_layer,
    selection_layer,
    selection_mask,
)
from napari_morphomol.layers.view import event_xy_um, is_click, percentile_limits, rgba_image
from napari_morphomol.widgets._errors import report_error
from napari_morphomol.widgets.umap_dock import UmapDock

SELECT_SHAPES_LAYER = "draw to select tiles"
TOKEN_PREVIEW_PX = 168
"""Side of the tile inspector's token map (14 x 14 tokens, 12 screen px each)."""
TOP_GENES = 10
TABLE_MIN_HEIGHT_PX = 160
"""The metrics and inspector tables keep at least about five rows in view; the dock scrolls instead."""


def _no_token_maps(explorer: RunExplorer) -> str:
    """Why a run has no token maps, in the words of the core's refusal."""
    try:
        require_token_head(explorer.results, "token maps")
    except InputError as exc:
        return str(exc)
    return ""


def trust_note(explorer: RunExplorer) -> str:
    """What the dock says of a run's trust: its intervals and flagged tiles, or why it has none."""
    trust = explorer.trust
    if trust.unavailable:
        return trust.unavailable
    parts = [f"{trust.level:.0%} intervals (layer {INTERVAL_LAYER!r}: upper - lower bound)"]
    if trust.has_flags:
        parts.append(f"{int(trust.outlier_flag.sum()):,} of {len(trust.outlier_flag):,} tiles out of distribution, "
                     f"greyed out (layer {OUTLIER_LAYER!r}): the model never saw tissue like them")
    return "; ".join(parts)


def _outlier_words(info: dict, trust) -> str:
    if info["outlier_score"] is None:
        return ""
    verdict = "OUT OF DISTRIBUTION: do not trust its predictions" if info["out_of_distribution"] else "in distribution"
    return f"; outlier score {info['outlier_score']:.2f} (threshold {trust.threshold:.2f}): {verdict}"


def _colour_note(resolution: str) -> str:
    return f"colour bar: {MAP_UNITS[resolution]}; contrast 1st-99th percentile"


class _NumericItem(QTableWidgetItem):
    """Sorts by number, not by text."""

    def __lt__(self, other):
        return float(self.data(Qt.UserRole)) < float(other.data(Qt.UserRole))


def parse_resolutions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InputError(
            f"Leiden resolutions must be numbers separated by commas (e.g. 0.5, 1.0), got {text!r}"
        ) from None
    if not values:
        raise InputError("give at least one Leiden resolution (e.g. 0.5, 1.0)")
    return values


class ExploreWidget(QWidget):
    """Open a results store (or receive a finished run) and explore it as napari layers."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.explorer: RunExplorer | None = None
        self.gene: str | None = None
        self.map_layers: dict = {}
        self.umap_dock: UmapDock | None = None
        self._umap_dock_widget = None
        self.selected_tiles = np.zeros(0, dtype=np.int64)
        self.inspected_tile = -1
        self.cluster_worker = self.open_worker = None
        self._all_genes: list[str] = []

        self.results_path = FileEdit(mode="d", label="results store", filter="*.zarr")
        self.open_button = QPushButton("Open results")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.gene_search = QLineEdit()
        self.gene_search.setPlaceholderText("find gene")
        self.gene_list = QListWidget()
        self.gene_list.setMaximumHeight(140)
        self.resolution = QComboBox()
        for key, text in RESOLUTIONS.items():
            self.resolution.addItem(text, key)
        self.colour_note = QLabel(_colour_note("tile"))
        self.trust_note = QLabel("")
        self.trust_note.setWordWrap(True)

        self.metrics_table = QTableWidget(0, 4)
        self.metrics_table.setSortingEnabled(True)
        self.metrics_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.metrics_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.metrics_table.verticalHeader().setVisible(False)
        self.metrics_table.setMaximumHeight(180)

        self.inspector_label = QLabel("click a tile in the viewer")
        self.inspector_label.setWordWrap(True)
        self.inspector_table = QTableWidget(0, 4)
        self.inspector_table.setHorizontalHeaderLabels(["gene", "predicted", "measured", "interval"])
        self.inspector_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.inspector_table.verticalHeader().setVisible(False)
        self.inspector_table.setMaximumHeight(180)
        self.inspector_tokens = QLabel()
        self.inspector_tokens_caption = QLabel("")
        self.inspector_tokens_caption.setWordWrap(True)

        self.resolutions = QLineEdit("0.5, 1.0")
        self.n_pcs = QSpinBox()
        self.n_pcs.setRange(2, 512)
        self.n_pcs.setValue(PAPER_N_PCS)
        self.cluster_button = QPushButton("Compute clusters + UMAP")
        self.clustering_choice = QComboBox()
        self.umap_colour = QComboBox()
        self.umap_colour.addItems(["cluster", "selected gene"])
        self.legend = QWidget()
        self.legend_layout = QGridLayout(self.legend)
        self.legend_layout.setContentsMargins(0, 0, 0, 0)

        # the dock's content scrolls: docks stacked in the window share its height instead of
        # growing it past the screen (issue 18, finding 1), and no table is squeezed to a row
        content = QWidget()
        layout = QVBoxLayout(content)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.metrics_table.setMinimumHeight(TABLE_MIN_HEIGHT_PX)
        self.inspector_table.setMinimumHeight(TABLE_MIN_HEIGHT_PX)
        layout.addWidget(self.results_path.native)
        layout.addWidget(self.open_button)
        layout.addWidget(self.status)
        genes_box = QGroupBox("gene maps")
        genes_layout = QVBoxLayout(genes_box)
        for widget in (self.gene_search, self.gene_list, self.resolution, self.colour_note, self.trust_note,
                       QLabel("per-gene metrics (click to show)"), self.metrics_table):
            genes_layout.addWidget(widget)
        layout.addWidget(genes_box)
        inspector_box = QGroupBox("tile inspector")
        inspector_layout = QVBoxLayout(inspector_box)
        inspector_layout.addWidget(self.inspector_label)
        inspector_layout.addWidget(self.inspector_table)
        inspector_layout.addWidget(self.inspector_tokens_caption)
        inspector_layout.addWidget(self.inspector_tokens)
        layout.addWidget(inspector_box)
        clusters_box = QGroupBox("embeddings")
        clusters_form = QFormLayout(clusters_box)
        clusters_form.addRow("Leiden resolutions", self.resolutions)
        clusters_form.addRow("PCA components", self.n_pcs)
        clusters_form.addRow(self.cluster_button)
        clusters_form.addRow("show clustering", self.clustering_choice)
        clusters_form.addRow("colour UMAP by", self.umap_colour)
        clusters_form.addRow(self.legend)
        layout.addWidget(clusters_box)
        layout.addStretch(1)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll = scroll
        self._fit_width()

        self.open_button.clicked.connect(self.open)
        self.gene_search.textChanged.connect(self._filter_genes)
        self.gene_list.currentTextChanged.connect(self._on_gene_list)
        self.resolution.currentIndexChanged.connect(lambda _: self.set_resolution(self.resolution.currentData()))
        self.metrics_table.cellClicked.connect(self._on_metrics_click)
        self.cluster_button.clicked.connect(self.compute_clusters)
        self.clustering_choice.currentTextChanged.connect(self.show_clustering)
        self.umap_colour.currentTextChanged.connect(lambda _: self._colour_umap())
        self.viewer.mouse_drag_callbacks.append(self._on_viewer_click)
        self.destroyed.connect(lambda *_: self._detach_from_viewer())
        self._set_enabled(False)

    def _fit_width(self):
        """As wide as the content (no sideways scrolling), as tall as the window gives it."""
        scroll = self.scroll
        scrollbar_px = scroll.verticalScrollBar().sizeHint().width()
        scroll.setMinimumWidth(scroll.widget().minimumSizeHint().width() + scrollbar_px)

    def _detach_from_viewer(self):
        if self._on_viewer_click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_viewer_click)

    def _set_enabled(self, enabled: bool):
        for widget in (self.gene_search, self.gene_list, self.metrics_table, self.cluster_button, self.resolutions,
                       self.n_pcs, self.resolution):
            widget.setEnabled(enabled)
        token_item = self.resolution.model().item(self.resolution.findData("token"))
        has_tokens = enabled and self.explorer is not None and self.explorer.has_token_maps
        token_item.setEnabled(has_tokens)
        token_item.setToolTip("" if has_tokens or self.explorer is None else _no_token_maps(self.explorer))
        cell_item = self.resolution.model().item(self.resolution.findData("cell"))
        refusal = None if self.explorer is None else self.explorer.cell_view_refusal()
        cell_item.setEnabled(enabled and self.explorer is not None and refusal is None)
        cell_item.setToolTip(refusal or "")

    # opening -----------------------------------------------------------------------------------
    def open(self, *_):
        path = self.results_path.value
        if path is None or str(path) in ("", "."):
            show_info("choose a results store (RESULTS.zarr written by Predict or `morphomol predict`)")
            return None
        self.status.setText(f"opening {Path(path).name}...")
        worker = create_worker(explore_run, Path(path), _progress={"desc": "Opening results"},
                               _connect={"errored": self._on_error}, _start_thread=False)
        worker.returned.connect(self.set_explorer)
        worker.start()
        self.open_worker = worker
        return worker

    def _on_error(self, exc):
        report_error(exc, self.status.setText)

    def set_explorer(self, explorer: RunExplorer):
        """Show a run: the map layers (one per kind), the gene list and the metrics table."""
        self.explorer = explorer
        self._all_genes = explorer.genes
        self.inspected_tile = -1
        first = explorer.metrics.index[0] if len(explorer.metrics) else explorer.genes[0]
        self.resolution.blockSignals(True)
        self.resolution.setCurrentIndex(self.resolution.findData("tile"))
        self.resolution.blockSignals(False)
        self.colour_note.setText(_colour_note("tile"))
        self._add_map_layers(first, "tile")
        self._show_outliers()
        self.trust_note.setText(trust_note(explorer))
        self._fill_metrics()
        self._filter_genes()
        self._set_enabled(True)
        self._show_status()
        self.show_gene(first)
        self.viewer.canvas.overlays.scale_bar.visible = True
        self._fit_width()

    def _show_status(self):
        """The status line: the shown run's tiles, genes and store (finished tiles of a running one)."""
        explorer = self.explorer
        done = np.isfinite(explorer.results.predictions).all(axis=1).sum()
        tiles = f"{explorer.adata.n_obs:,} tiles" if done == explorer.adata.n_obs else (
            f"{done:,} of {explorer.adata.n_obs:,} tiles predicted")
        measured = f"{len(explorer.results.measured_genes)} measured" if not explorer.route_note else "H&E alone"
        status = f"{tiles}, {len(explorer.genes)} add-on genes ({measured}) from {explorer.results.path.name}"
        self.status.setText(status + (f". {explorer.route_note}" if explorer.route_note else ""))

    def _add_map_layers(self, gene: str, resolution: str):
        """One map layer per kind the run has (only the predicted one shown), made anew at ``resolution``;
        the out-of-distribution mask stays on top of them."""
        kinds = self.explorer.map_kinds
        for kind in [kind for kind in self.map_layers if kind not in kinds]:  # another run's kinds
            layer = self.map_layers.pop(kind)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        visible = {kind: self.map_layers[kind].visible for kind in self.map_layers if kind in kinds}
        for kind in kinds:
            data, kwargs, _ = gene_map_layer(self.explorer, gene, kind, resolution)
            if kwargs["name"] in self.viewer.layers:
                self.viewer.layers.remove(kwargs["name"])
            kwargs["visible"] = visible.get(kind, kind == "predicted")
            layer = self.viewer.add_image(data, **kwargs)
            layer.events.visible.connect(lambda _event, kind=kind: self._on_map_visibility(kind))
            self.map_layers[kind] = layer
        self.map_layers["predicted"].colorbar.visible = True
        if OUTLIER_LAYER in self.viewer.layers:  # back on top of the maps made anew
            self.viewer.layers.move(self.viewer.layers.index(OUTLIER_LAYER), len(self.viewer.layers))
        self.viewer.layers.selection.active = self.map_layers["predicted"]  # not the last one added

    def _show_outliers(self):
        """The grey mask of the tiles flagged out of distribution (a calibrated run only)."""
        if OUTLIER_LAYER in self.viewer.layers:
            self.viewer.layers.remove(OUTLIER_LAYER)
        if self.explorer.trust.has_flags:
            data, kwargs, _ = outlier_layer(self.explorer)
            self.viewer.add_labels(data, **kwargs)
            self.viewer.layers.selection.active = self.map_layers["predicted"]

    def update_explorer(self, explorer: RunExplorer):
        """A newer state of the same run (chunks finished): refresh the shown maps in place (made
        anew when the run gained a kind of map: the intervals of a finished calibrated run)."""
        if (not self.map_layers or self.explorer is None or explorer.grid.shape != self.explorer.grid.shape
                or explorer.map_kinds != tuple(self.map_layers)):
            self.set_explorer(explorer)
            return
        self.explorer = explorer
        self._show_status()
        self.trust_note.setText(trust_note(explorer))
        self._show_outliers()
        for layer in self.map_layers.values():
            layer.metadata["gene"] = None
        self._fill_metrics()
        self.show_gene(self.gene)

    # genes -------------------------------------------------------------------------------------
    def _filter_genes(self, *_):
        text = self.gene_search.text().strip().upper()
        genes = [g for g in self._all_genes if text in g.upper()] if text else self._all_genes
        self.gene_list.blockSignals(True)
        self.gene_list.clear()
        self.gene_list.addItems(genes)
        self.gene_list.blockSignals(False)

    def _on_gene_list(self, gene: str):
        if gene:
            self._show_gene_maps()
            self.show_gene(gene)

    def _show_gene_maps(self):
        """Back from the cluster view to the gene maps: the clusters are hidden, the predicted map and
        the out-of-distribution mask shown."""
        if CLUSTERS_LAYER in self.viewer.layers and self.viewer.layers[CLUSTERS_LAYER].visible:
            self.viewer.layers[CLUSTERS_LAYER].visible = False
            self.map_layers["predicted"].visible = True
            if OUTLIER_LAYER in self.viewer.layers:
                self.viewer.layers[OUTLIER_LAYER].visible = True

    def show_gene(self, gene: str):
        """Swap the data of the map layers to ``gene`` (layers are reused, never re-created).

        Hidden map layers are brought up to date when they are shown, so a switch costs one update.
        """
        if self.explorer is None:
            return
        self.gene = gene
        for kind, layer in self.map_layers.items():
            if layer.visible:
                self._update_map_layer(kind)
        self._caption()
        if self.inspected_tile >= 0:
            self._show_tile_tokens(self.inspected_tile)
        self._colour_umap()

    @property
    def shown_resolution(self) -> str:
        """The resolution of the shown maps: a key of ``layers.run.RESOLUTIONS``."""
        return self.resolution.currentData()

    def set_resolution(self, resolution: str):
        """Show the maps at ``resolution`` ("tile" or "token"); the same layers, re-placed."""
        if self.explorer is None or resolution is None:
            return
        item = self.resolution.model().item(self.resolution.findData(resolution))
        if not item.isEnabled():
            show_info(item.toolTip())
            self.resolution.setCurrentIndex(self.resolution.findData(self._placed_resolution))
            return
        if self.resolution.currentData() != resolution:
            self.resolution.setCurrentIndex(self.resolution.findData(resolution))  # comes back here
            return
        self.colour_note.setText(_colour_note(resolution))
        if "cell" in (resolution, self._placed_resolution) and self.gene is not None:
            self._add_map_layers(self.gene, resolution)  # a cell map is multiscale: the layers are made anew
        for layer in self.map_layers.values():
            layer.metadata["gene"] = None
        if self.gene is not None:
            self.show_gene(self.gene)

    @property
    def _placed_resolution(self) -> str:
        """The resolution the map layers are placed at now."""
        layer = self.map_layers.get("predicted")
        return "tile" if layer is None else layer.metadata.get("resolution", "tile")

    def _update_map_layer(self, kind: str):
        layer, gene, explorer, resolution = self.map_layers[kind], self.gene, self.explorer, self.shown_resolution
        if gene is None or layer.metadata.get("gene", "") == gene:
            return
        raster = map_raster(explorer, gene, kind, resolution)
        layer.data = raster
        if layer.metadata.get("resolution", "tile") != resolution:
            layer.affine = map_affine_um(explorer, resolution)
            layer.metadata["resolution"] = resolution
        limits = map_limits(explorer, gene, kind, resolution, raster)
        if limits is not None:
            layer.contrast_limits = limits
        layer.metadata["gene"] = gene

    def _on_map_visibility(self, kind: str):
        if self.map_layers[kind].visible:
            self._update_map_layer(kind)
        self._caption()

    def _caption(self):
        """The canvas caption: the gene, the maps shown (by their layer names), their units, and
        whether the sample measured the gene."""
        if self.gene is None:
            return
        overlay = self.viewer.canvas.overlays.text
        clusters = self.viewer.layers[CLUSTERS_LAYER] if CLUSTERS_LAYER in self.viewer.layers else None
        if clusters is not None and clusters.visible and not any(m.visible for m in self.map_layers.values()):
            key = clusters.metadata.get("clustering", "")
            n = self.explorer.adata.obs[key].cat.categories.size if key in self.explorer.adata.obs else 0
            overlay.text = f"{CLUSTERS_LAYER} ({key}): {n} clusters"
            overlay.visible = True
            return
        shown = [layer.name for layer in self.map_layers.values() if layer.visible] or ["no map shown"]
        measured = "measured in this sample" if self.explorer.is_measured(self.gene) else "not measured in this sample"
        if self.explorer.route_note:
            measured = "predicted from the H&E alone"
        overlay.text = f"{self.gene}: {', '.join(shown)} ({MAP_UNITS[self.shown_resolution]}); {measured}"
        overlay.visible = True

    def _fill_metrics(self):
        metrics = self.explorer.metrics
        table = self.metrics_table
        table.setSortingEnabled(False)
        names = list(metrics.columns)
        table.setColumnCount(1 + len(names))
        table.setHorizontalHeaderLabels(["gene", *names])
        table.setRowCount(len(metrics))
        for i, (gene, row) in enumerate(metrics.iterrows()):
            table.setItem(i, 0, QTableWidgetItem(str(gene)))
            for j, name in enumerate(names, start=1):
                value = float(row[name])
                item = _NumericItem(f"{value:.3f}")
                item.setData(Qt.UserRole, value if np.isfinite(value) else -np.inf)
                table.setItem(i, j, item)
        table.setSortingEnabled(True)
        table.resizeColumnsToContents()

    def metrics_genes_in_order(self) -> list[str]:
        return [self.metrics_table.item(i, 0).text() for i in range(self.metrics_table.rowCount())]

    def _on_metrics_click(self, row: int, _column: int):
        self._show_gene_maps()
        self.show_gene(self.metrics_table.item(row, 0).text())

    # tile inspector ----------------------------------------------------------------------------
    def _on_viewer_click(self, viewer, event):
        press = event.position
        yield
        while event.type == "mouse_move":
            yield
        if self.explorer is None or not is_click(press, event.position, viewer.scene.camera.zoom):
            return
        self.inspect_at_um(*event_xy_um(event.position))

    def inspect_at_um(self, x_um: float, y_um: float) -> int:
        """Fill the inspector with the tile under (x, y) um; returns its results row or -1."""
        tile = int(self.explorer.tiles_at_um(np.array([[x_um, y_um]]))[0])
        self.inspected_tile = tile
        if tile < 0:
            self.inspector_label.setText(f"no tile at ({x_um:.0f}, {y_um:.0f}) um")
            self.inspector_table.setRowCount(0)
            self.inspector_tokens.clear()
            self.inspector_tokens_caption.setText("")
            return tile
        info = self.explorer.tile_summary(tile)
        self.inspector_label.setText(
            f"tile {info['tile_id']} (row {info['row']}, col {info['col']}) "
            f"at ({info['um_x']:.0f}, {info['um_y']:.0f}) um: "
            f"{info['n_transcripts']:,} transcripts ({info['n_core']:,} core, {info['n_addon']:,} add-on)"
            + _outlier_words(info, self.explorer.trust))
        report = self.explorer.tile_report(tile, TOP_GENES)
        self.inspector_table.setRowCount(len(report))
        level = self.explorer.trust.level
        self.inspector_table.setHorizontalHeaderLabels(
            ["gene", "predicted", "measured", "interval" if level is None else f"{level:.0%} interval"])
        for i, (gene, row) in enumerate(report.iterrows()):
            measured = "" if np.isnan(row["measured"]) else f"{row['measured']:.2f}"
            interval = f"{row['lower']:.2f} - {row['upper']:.2f}" if "lower" in report else "unavailable"
            for j, text in enumerate((str(gene), f"{row['predicted']:.2f}", measured, interval)):
                self.inspector_table.setItem(i, j, QTableWidgetItem(text))
        self.inspector_table.resizeColumnsToContents()
        self._show_tile_tokens(tile)
        return tile

    def _show_tile_tokens(self, tile: int):
        """The shown gene's 14 x 14 token map of the tile, when the run's model has the token head."""
        self.inspector_tokens.clear()
        self.inspector_tokens_caption.setText("")
        if not self.explorer.has_token_maps or self.gene is None:
            return
        values = self.explorer.tile_token_map(tile, self.gene)
        low, high = percentile_limits(values, (0.0, 100.0))
        rgba = rgba_image(values, (low, high), MAP_COLORMAPS["predicted"])
        height, width = values.shape
        image = QImage(rgba.data, width, height, 4 * width, QImage.Format_RGBA8888).copy()
        self.inspector_tokens.setPixmap(QPixmap.fromImage(image).scaled(TOKEN_PREVIEW_PX, TOKEN_PREVIEW_PX))
        caption = (f"{self.gene} predicted per token in this tile ({TOKEN_EXPRESSION_UNITS}): "
                   f"{low:.2f} (dark) to {high:.2f} (light)")
        self.inspector_tokens_caption.setText(caption)
        self.inspector_tokens.setToolTip(caption)

    # clusters ----------------------------------------------------------------------------------
    def compute_clusters(self, *_):
        if self.explorer is None:
            show_info("open a results store first")
            return None
        try:
            resolutions = parse_resolutions(self.resolutions.text())
        except InputError as exc:
            self._on_error(exc)
            return None
        self.cluster_button.setEnabled(False)
        self.status.setText("PCA, neighbours, Leiden and UMAP...")
        worker = create_worker(self.explorer.cluster, resolutions, self.n_pcs.value(),
                               _progress={"desc": "Clusters + UMAP"}, _connect={"errored": self._on_error},
                               _start_thread=False)
        worker.returned.connect(self._on_clusters)
        worker.finished.connect(lambda: self.cluster_button.setEnabled(True))
        worker.start()
        self.cluster_worker = worker
        return worker

    def _on_clusters(self, keys: list[str]):
        explorer = self.explorer
        info = explorer.adata.uns["morphomol_clusters"]
        self.status.setText(f"{info['n_pcs']} PCs, {info['n_neighbors']} neighbours; "
                            + ", ".join(f"{k}: {explorer.adata.obs[k].cat.categories.size} clusters" for k in keys))
        for name in (PCA_LAYER, CLUSTERS_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        data, kwargs, _ = pca_layer(explorer)
        self.viewer.add_image(data, **kwargs)
        data, kwargs, _ = clusters_layer(explorer, keys[0])
        self.viewer.add_labels(data, **kwargs)
        self._ensure_selection_layers()
        self._show_umap_dock()
        self.clustering_choice.blockSignals(True)
        self.clustering_choice.clear()
        self.clustering_choice.addItems(keys)
        self.clustering_choice.blockSignals(False)
        self.show_clustering(keys[0])

    def show_clustering(self, key: str):
        """Point the clusters layer, the legend and the UMAP colours at one clustering."""
        if not key or self.explorer is None or CLUSTERS_LAYER not in self.viewer.layers:
            return
        layer = self.viewer.layers[CLUSTERS_LAYER]
        layer.data = cluster_labels(self.explorer, key)
        layer.colormap = cluster_label_colors(self.explorer, key)
        layer.metadata["clustering"] = key
        self._fill_legend(key)
        self._colour_umap()
        # the clusters alone: a gene map or the grey mask under them would mix their colours (issue 18, 4)
        layer.visible = True
        for map_layer in self.map_layers.values():
            map_layer.visible = False
        if OUTLIER_LAYER in self.viewer.layers:
            self.viewer.layers[OUTLIER_LAYER].visible = False
        self._caption()

    def legend_entries(self) -> list[tuple[str, str, int]]:
        """(cluster, colour, tiles) of the shown clustering."""
        key = self.clustering_choice.currentText()
        obs = self.explorer.adata.obs[key]
        counts = obs.value_counts()
        return [(str(c), color, int(counts[c])) for c, color in
                zip(obs.cat.categories, self.explorer.adata.uns[f"{key}_colors"])]

    def _fill_legend(self, key: str):
        while self.legend_layout.count():
            self.legend_layout.takeAt(0).widget().deleteLater()
        for i, (cluster, color, count) in enumerate(self.legend_entries()):
            swatch = QLabel()
            swatch.setFixedSize(14, 14)
            swatch.setStyleSheet(f"background-color: {color}; border: 1px solid #808080;")
            text = QLabel(f"{cluster} ({count})")
            self.legend_layout.addWidget(swatch, i // 3, 2 * (i % 3))
            self.legend_layout.addWidget(text, i // 3, 2 * (i % 3) + 1)

    # UMAP and selection ------------------------------------------------------------------------
    def _show_umap_dock(self):
        umap = self.explorer.adata.obsm["X_umap"]
        if self.umap_dock is not None and self._umap_dock_widget is not None:
            self.viewer.window.remove_dock_widget(self._umap_dock_widget)
        self.umap_dock = UmapDock(umap, on_select=lambda tiles: self.select_tiles(tiles, source="umap"))
        self._umap_dock_widget = self.viewer.window.add_dock_widget(self.umap_dock, name="UMAP of tiles", area="left")

    def _colour_umap(self):
        if self.umap_dock is None or self.explorer is None:
            return
        key = self.clustering_choice.currentText()
        if self.umap_colour.currentText() == "selected gene" and self.gene is not None:
            self.umap_dock.color_by_values(self.explorer.tile_values(self.gene), f"{self.gene} (predicted)",
                                           EXPRESSION_UNITS)
        elif key:
            obs = self.explorer.adata.obs[key]
            self.umap_dock.color_by_cluster(obs.cat.codes.to_numpy(), self.explorer.adata.uns[f"{key}_colors"], key)

    def _ensure_selection_layers(self):
        for name in (SELECTION_LAYER, SELECT_SHAPES_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        data, kwargs, _ = selection_layer(self.explorer, self.selected_tiles)
        self.viewer.add_labels(data, **kwargs)
        shapes = self.viewer.add_shapes(name=SELECT_SHAPES_LAYER, units=kwargs["units"], edge_color="yellow",
                                        face_color=[0, 0, 0, 0], edge_width=3)
        shapes.events.data.connect(self._on_shapes_drawn)

    def _on_shapes_drawn(self, event=None):
        shapes = self.viewer.layers[SELECT_SHAPES_LAYER]
        if getattr(event, "action", "added") not in ("added", "removed", "changed"):
            return
        tiles = [self.explorer.tiles_in_polygon_um(napari_to_xy(polygon)) for polygon in shapes.data]
        self.select_tiles(np.unique(np.concatenate(tiles)) if tiles else np.zeros(0, np.int64), source="map")

    def select_tiles(self, tiles: np.ndarray, source: str = "map"):
        """Highlight tiles (results rows) in the map and, unless they came from it, in the UMAP."""
        self.selected_tiles = np.asarray(tiles, dtype=np.int64)
        if SELECTION_LAYER in self.viewer.layers:
            self.viewer.layers[SELECTION_LAYER].data = selection_mask(self.explorer, self.selected_tiles)
        if self.umap_dock is not None and source != "umap":
            self.umap_dock.set_selection(self.selected_tiles)
        self.status.setText(f"{len(self.selected_tiles)} tiles selected")
