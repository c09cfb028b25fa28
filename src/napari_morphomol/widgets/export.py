"""Dock widget "Export": write a prediction run as .h5ad / SpatialData .zarr / QuPath GeoJSON / landmark CSV.

A thin view over :func:`napari_morphomol.export.export_results`: pick the results store (taken
from the viewer's layers when one shows a run), tick what to write, press Export. The work runs
in a worker thread; where the files went is shown in the widget and as a notification.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, PushButton
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info

from napari_morphomol.errors import InputError
from napari_morphomol.export import LANDMARK_FORMATS, RESULTS_LAYER_KEY, export_results
from napari_morphomol.widgets._errors import chosen_path, report_error, status_label


def default_outputs(results_path: Path) -> dict[str, Path]:
    """Outputs beside the results store, named after it: run.zarr -> run.h5ad, run.spatialdata.zarr, ..."""
    stem = results_path.name.removesuffix(".zarr")
    return {
        "h5ad": results_path.with_name(f"{stem}.h5ad"),
        "spatialdata": results_path.with_name(f"{stem}.spatialdata.zarr"),
        "landmarks": results_path.with_name(f"{stem}.landmarks.csv"),
        "cells_h5ad": results_path.with_name(f"{stem}.cells.h5ad"),
        "qupath": results_path.with_name(f"{stem}.qupath.geojson"),
    }


class ExportWidget(Container):
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.results_path = FileEdit(mode="d", label="results store")
        self.write_h5ad = CheckBox(value=True, text="AnnData (.h5ad)")
        self.h5ad_path = FileEdit(mode="w", label="h5ad file", filter="*.h5ad")
        self.write_spatialdata = CheckBox(value=True, text="SpatialData (.zarr)")
        self.spatialdata_path = FileEdit(mode="d", label="SpatialData store")
        self.self_contained = CheckBox(value=False, text="copy the whole sample into it (self-contained: about the "
                                                        "bundle's size; otherwise it refers to the sample's files)")
        self.write_landmarks = CheckBox(value=False, text="landmarks (CSV)")
        self.landmarks_path = FileEdit(mode="w", label="landmarks file", filter="*.csv")
        self.landmark_format = ComboBox(choices=LANDMARK_FORMATS, value="xenium", label="landmark format")
        self.write_cells = CheckBox(value=False, text="cells AnnData (.h5ad; a token-head model)")
        self.cells_path = FileEdit(mode="w", label="cells h5ad file", filter="*.h5ad")
        self.write_qupath = CheckBox(value=False, text="QuPath GeoJSON (tiles over the H&E)")
        self.qupath_path = FileEdit(mode="w", label="QuPath file", filter="*.geojson")
        self.clusters = CheckBox(value=True, text="clusters and UMAP of the embeddings")
        self.overwrite = CheckBox(value=False, text="replace existing files")
        self.export_button = PushButton(text="Export")
        self.status = status_label("")
        super().__init__(widgets=[
            self.results_path, self.write_h5ad, self.h5ad_path, self.write_spatialdata, self.spatialdata_path,
            self.self_contained,
            self.write_landmarks, self.landmarks_path, self.landmark_format, self.write_cells, self.cells_path,
            self.write_qupath, self.qupath_path, self.clusters, self.overwrite,
            self.export_button, self.status,
        ])
        self.results_path.changed.connect(self._fill_outputs)
        self.export_button.changed.connect(self.export)
        self.worker = None
        shown = self._results_in_viewer()
        if shown is not None:
            self.results_path.value = shown

    def _results_in_viewer(self) -> Path | None:
        for layer in self.viewer.layers:
            store = layer.metadata.get(RESULTS_LAYER_KEY)
            if store is not None:
                return Path(store)
        return None

    def _fill_outputs(self, *_):
        results = chosen_path(self.results_path)
        if results is None:
            return
        outputs = default_outputs(results)
        self.h5ad_path.value = outputs["h5ad"]
        self.spatialdata_path.value = outputs["spatialdata"]
        self.landmarks_path.value = outputs["landmarks"]
        self.cells_path.value = outputs["cells_h5ad"]
        self.qupath_path.value = outputs["qupath"]

    def export(self):
        """Write the ticked outputs in a worker thread."""
        ticked = {"h5ad": (self.write_h5ad, self.h5ad_path),
                  "spatialdata": (self.write_spatialdata, self.spatialdata_path),
                  "landmarks": (self.write_landmarks, self.landmarks_path),
                  "cells_h5ad": (self.write_cells, self.cells_path),
                  "qupath": (self.write_qupath, self.qupath_path)}
        targets = {kind: chosen_path(edit) for kind, (box, edit) in ticked.items() if box.value}
        results = chosen_path(self.results_path)
        options = {"landmark_format": self.landmark_format.value, "overwrite": self.overwrite.value,
                   "clusters": self.clusters.value, "self_contained": self.self_contained.value}

        def work():
            if results is None:
                raise InputError("choose the results store of a prediction run (RESULTS.zarr) first")
            unnamed = [kind for kind, path in targets.items() if path is None]
            if unnamed:
                raise InputError(f"choose where to write: {', '.join(unnamed)}")
            return export_results(results, **targets, **options)

        self.export_button.enabled = False
        self.status.value = "exporting..."
        worker = create_worker(work, _progress={"desc": "Exporting"}, _connect={"errored": self._on_error},
                               _start_thread=False)
        worker.returned.connect(self._on_exported)
        worker.finished.connect(lambda: setattr(self.export_button, "enabled", True))
        worker.start()
        self.worker = worker
        return worker

    def _on_error(self, exc):
        report_error(exc, lambda text: setattr(self.status, "value", text))

    def _on_exported(self, result):
        lines = [f"{kind}: {path}" for kind, path in result.items()]
        self.status.value = "written\n" + "\n".join(lines)
        show_info("Exported " + "; ".join(lines))
