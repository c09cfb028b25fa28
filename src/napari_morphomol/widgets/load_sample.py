"""Dock widget "Load sample": open Xenium + H&E, then browse genes as density maps and points."""

from __future__ import annotations

from magicgui.widgets import (
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    PushButton,
    Select,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer

from napari_morphomol.coords import xy_to_napari
from napari_morphomol.elements import TRANSCRIPTS, sample_info
from napari_morphomol.io.sample import load_sample
from napari_morphomol.io.transcript_density import transcripts_in_box_um
from napari_morphomol.layers.sample import UNITS_UM, density_layer, sample_layers, transcript_density
from napari_morphomol.layers.view import camera_box_xy_um
from napari_morphomol.widgets._errors import chosen_path, report_error, status_label

POINTS_FIELD_OF_VIEW_UM = 800.0
"""Actual transcripts are drawn only when the view is narrower than this (density otherwise)."""

GENE_COLORS = ["yellow", "lime", "orange", "red", "white", "dodgerblue", "magenta", "cyan"]
"""Transcript colours by gene, the first ones unlike the DAPI (cyan) and the H&E (pink) beneath them."""


class LoadSampleWidget(Container):
    """Open a sample (any of Xenium folder, H&E, alignment), then choose genes to show."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.sdata = None
        self.density = None
        self.xenium_dir = FileEdit(mode="d", label="Xenium folder")
        self.he_path = FileEdit(mode="r", label="H&E image", filter="*.tif *.tiff *.svs *.ome.tif")
        self.alignment_csv = FileEdit(mode="r", label="alignment CSV", filter="*.csv")
        self.he_pixel_size_um = FloatSpinBox(
            value=0.0, min=0.0, max=50.0, step=0.0001, label="H&E um/px (0 = from file)"
        )
        self.load_button = PushButton(text="Load")
        self.status = status_label("")
        self.gene_search = LineEdit(label="find gene")
        self._all_genes: list[str] = []
        self.gene_list = Select(choices=self._gene_choices, label="genes", allow_multiple=True)
        self.show_density_button = PushButton(text="Show density of selected genes")
        self.show_points = PushButton(text="Show transcripts in view")
        super().__init__(
            widgets=[
                self.xenium_dir, self.he_path, self.alignment_csv, self.he_pixel_size_um,
                self.load_button, self.status, self.gene_search, self.gene_list,
                self.show_density_button, self.show_points,
            ]
        )
        self.load_button.changed.connect(self.load)
        self.gene_search.changed.connect(self._filter_genes)
        self.show_density_button.changed.connect(self.add_density_of_selection)
        self.show_points.changed.connect(self.refresh_points_in_view)
        self._closed = False
        self._camera_timer = QTimer(self.native)
        self._camera_timer.setSingleShot(True)
        self._camera_timer.setInterval(300)
        self._camera_timer.timeout.connect(self._points_if_zoomed_in)
        camera = self.viewer.scene.camera
        camera.events.zoom.connect(self._on_camera_moved)
        camera.events.center.connect(self._on_camera_moved)
        self.native.destroyed.connect(self._disconnect_camera)
        self._points_worker = None
        self.load_worker = self.density_worker = None
        self.viewer.layers.events.inserted.connect(self._adopt_opened_sample)
        self._adopt_opened_sample()

    def _on_camera_moved(self, _event=None):
        if not self._closed:
            self._camera_timer.start()

    def _disconnect_camera(self, *_):
        """The dock is gone: stop following the camera and the layer list, and drop results still
        on their way."""
        self._closed = True
        camera = self.viewer.scene.camera
        camera.events.zoom.disconnect(self._on_camera_moved)
        camera.events.center.disconnect(self._on_camera_moved)
        self.viewer.layers.events.inserted.disconnect(self._adopt_opened_sample)

    # loading -------------------------------------------------------------------------------
    def load(self):
        """Images first (lazy, shown at once), then the transcript density pass in the background."""
        pixel = self.he_pixel_size_um.value or None
        args = (chosen_path(self.xenium_dir), chosen_path(self.he_path), chosen_path(self.alignment_csv))
        self.status.value = "loading..."
        self.load_button.enabled = False
        if self.density is not None:  # the last sample's index: its scratch goes now
            self.density.close()
            self.density = None

        def work():
            import pint  # napari imports it only for units; here, in the worker

            sdata = load_sample(*args, he_pixel_size_um=pixel)
            pint.get_application_registry().um  # builds pint's unit registry here, not in add_image (1 s)
            return sdata, sample_layers(sdata, with_density=False)

        worker = create_worker(work, _progress={"desc": "Loading sample"}, _connect={"errored": self._on_load_error},
                               _start_thread=False)
        worker.returned.connect(self._on_loaded)
        worker.start()
        self.load_worker = worker
        return worker

    def _on_error(self, exc):
        report_error(exc, lambda text: setattr(self.status, "value", text))

    def _on_load_error(self, exc):
        self.load_button.enabled = True
        self._on_error(exc)

    def _adopt_opened_sample(self, _event=None):
        """A sample opened another way (File > Open, File > Open Sample) becomes the dock's: its files
        fill the fields, the scale bar shows and its genes fill the list, as after Load (issue 18, 6)."""
        if self._closed or self.sdata is not None or self.load_worker is not None:
            return
        sdata = next((layer.metadata["sdata"] for layer in self.viewer.layers
                      if isinstance(layer.metadata, dict) and layer.metadata.get("sdata") is not None), None)
        if sdata is None:
            return
        self.sdata = sdata
        info = sample_info(sdata)
        for edit, path in ((self.xenium_dir, info.xenium_dir), (self.he_path, info.he_path),
                           (self.alignment_csv, info.alignment_csv)):
            if path is not None:
                edit.value = path
        self._show_sample()

    def _on_loaded(self, result):
        """One layer per turn of the event loop (each costs a few hundred ms of drawing set-up)."""
        self.sdata, layers = result
        if self._closed:
            return
        if not layers:
            self._show_sample()
            return
        data, kwargs, kind = layers[0]
        getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        if len(layers) == 1:
            self.viewer.reset_view()
            QTimer.singleShot(0, self._show_sample)
        else:
            QTimer.singleShot(0, lambda: self._on_loaded((self.sdata, layers[1:])))

    def _show_sample(self):
        """The scale bar, and the transcript density pass of a sample with a Xenium run."""
        self.viewer.canvas.overlays.scale_bar.visible = True
        if TRANSCRIPTS not in self.sdata.points:
            self.status.value = "H&E alone (no Xenium run): Predict runs the model on the image alone"
            self.load_button.enabled = True
            return
        self.status.value = "counting transcripts per gene..."
        sdata = self.sdata

        def work():  # the density layer's raster and pyramid too, off the event loop (0.5 s at 137 M)
            density = transcript_density(sdata)
            return density, density_layer(density, sdata)

        worker = create_worker(work, _progress={"desc": "Transcript density"},
                               _connect={"errored": self._on_error}, _start_thread=False)
        worker.returned.connect(lambda result: self._on_density(*result) if sdata is self.sdata else result[0].close())
        worker.finished.connect(lambda: setattr(self.load_button, "enabled", True))
        worker.start()
        self.density_worker = worker

    def _on_density(self, density, layer: tuple):
        self.density = density
        data, kwargs, _ = layer
        self.viewer.add_image(data, **kwargs)
        totals = density.gene_totals().sort_values(ascending=False)
        self._all_genes = list(totals.index)
        self._filter_genes()
        self.status.value = (
            f"{int(totals.sum()):,} transcripts (qv >= 20) of {len(totals)} genes; "
            f"{density.n_low_qv:,} below qv 20 not shown"
        )

    # genes ---------------------------------------------------------------------------------
    def _gene_choices(self, *_) -> list[str]:
        """Genes by total count, filtered by the search text (magicgui asks again on reset)."""
        text = (self.gene_search.value or "").strip().upper()
        return [g for g in self._all_genes if text in g.upper()] if text else self._all_genes

    def _filter_genes(self, *_):
        self.gene_list.reset_choices()

    def selected_genes(self) -> list[str]:
        return list(self.gene_list.value)

    def add_density_of_selection(self, *_):
        genes = self.selected_genes()
        if self.density is None or not genes:
            show_info("load a Xenium run and select one or more genes first")
            return None
        data, kwargs, _ = density_layer(self.density, self.sdata, genes)
        return self.viewer.add_image(data, **kwargs)

    def _view_box_um(self):
        """The (x, y) ranges in um currently in view."""
        camera = self.viewer.scene.camera
        corners = camera_box_xy_um(camera.center, camera.zoom, self.viewer.canvas.size)
        (x0, y0), (x1, y1) = corners[0], corners[2]
        return (x0, x1), (y0, y1)

    def _points_if_zoomed_in(self):
        if self.sdata is None or not self.selected_genes():
            return
        (x0, x1), _ = self._view_box_um()
        if x1 - x0 <= POINTS_FIELD_OF_VIEW_UM:
            self.refresh_points_in_view()

    def refresh_points_in_view(self, *_):
        genes = self.selected_genes()
        if self.sdata is None or TRANSCRIPTS not in self.sdata.points or not genes:
            show_info("load a Xenium run and select one or more genes first")
            return None
        x_range, y_range = self._view_box_um()
        if self._points_worker is not None:
            self._points_worker.quit()
        if self.density is not None:  # the index reads the blocks in view
            find, args = self.density.transcripts_in_box, (genes,)
        else:  # before the index is built: a pass over every partition
            find, args = transcripts_in_box_um, (self.sdata.points[TRANSCRIPTS], genes)
        worker = create_worker(
            find, *args, x_range_um=x_range, y_range_um=y_range,
            _connect={"errored": self._on_error}, _start_thread=False,
        )
        worker.returned.connect(lambda df: self._show_points(df, genes))
        self._points_worker = worker
        worker.start()
        return worker

    def _show_points(self, df, genes):
        if self._closed:
            return
        name = "transcripts in view"
        colors = {g: GENE_COLORS[i % len(GENE_COLORS)] for i, g in enumerate(genes)}
        data = xy_to_napari(df[["x", "y"]].to_numpy())
        kwargs = {
            "units": UNITS_UM, "size": 2.0, "border_width": 0, "features": {"gene": df["feature_name"].to_numpy()},
            "face_color": [colors[g] for g in df["feature_name"]] if len(df) else "white",
        }
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            layer.features = kwargs["features"]
            layer.face_color = kwargs["face_color"]
        else:
            self.viewer.add_points(data, name=name, **kwargs)
        n_in_view = df.attrs.get("n_in_box", len(df))
        shown = f"{len(df):,} of {n_in_view:,}" if n_in_view > len(df) else f"{len(df):,}"
        self.status.value = f"{shown} transcripts of {', '.join(genes)} in view"
