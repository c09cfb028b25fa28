"""Dock widget "Predict add-on genes": run a checkpoint over the loaded sample in a worker thread.

The core it calls (``inference``, ``analysis``: torch and timm, seconds to import) is imported in a
thread when the dock opens, not at the dock's import, so opening it does not freeze the window
(issue 18, finding 5)."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info

from napari_morphomol.coords import napari_to_xy
from napari_morphomol.errors import InputError
from napari_morphomol.layers.sample import um_to_he_px
from napari_morphomol.layers.view import camera_box_xy_um
from napari_morphomol.models.trust import CALIBRATED_LEVELS, DEFAULT_LEVEL
from napari_morphomol.widgets._errors import report_error, status_label

if TYPE_CHECKING:
    from napari_morphomol.inference import PredictOptions

WHOLE_SLIDE = "whole slide"
IN_VIEW = "what is in view"
DEVICES = ["auto", "cpu", "cuda", "mps"]


def _shipped_checkpoint() -> Path | None:
    from napari_morphomol.models.shipped import shipped_model_path

    try:
        return shipped_model_path()
    except InputError:
        return None


def _import_core() -> None:
    """Import what Run needs (torch among it) ahead of time, off the event loop."""
    import napari_morphomol.analysis  # noqa: F401
    import napari_morphomol.inference  # noqa: F401


class PredictWidget(Container):
    """Checkpoint, device, batch size, region; Run and Cancel. Finished runs open in Explore."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        shipped = _shipped_checkpoint()
        self.checkpoint = FileEdit(mode="r", label="checkpoint", filter="*.safetensors",
                                   value=shipped if shipped is not None else "")
        self.device = ComboBox(choices=DEVICES, value="auto", label="device")
        self.batch_size = SpinBox(value=32, min=1, max=4096, label="batch size")
        self.interval_level = ComboBox(choices=[(f"{level:.0%}", level) for level in CALIBRATED_LEVELS],
                                       value=DEFAULT_LEVEL, label="interval level",
                                       tooltip="nominal coverage of the intervals a calibrated model writes")
        self.region = ComboBox(choices=self._region_choices, label="region")
        self.store = FileEdit(mode="w", label="results store", filter="*.zarr")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = status_label("" if shipped else "no shipped model found: choose a checkpoint")
        super().__init__(widgets=[self.checkpoint, self.device, self.batch_size, self.interval_level, self.region,
                                  self.store,
                                  self.run_button, self.cancel_button, self.status])
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(lambda _: self.region.reset_choices())
        self.viewer.layers.events.removed.connect(lambda _: self.region.reset_choices())
        self._cancel = threading.Event()
        self.worker = None
        self.explore_widget = None
        self.results_path: Path | None = None
        threading.Thread(target=_import_core, name="morphomol-import", daemon=True).start()

    def _region_choices(self, *_) -> list[str]:
        shapes = [layer.name for layer in self.viewer.layers if layer._type_string == "shapes"]
        return [WHOLE_SLIDE, IN_VIEW, *shapes]

    def _sample(self):
        for layer in self.viewer.layers:
            sdata = layer.metadata.get("sdata") if isinstance(layer.metadata, dict) else None
            if sdata is not None:
                return sdata
        raise InputError("no sample in the viewer: open one with the Load sample widget first")

    def region_he_px(self, sdata) -> np.ndarray | None:
        """The chosen region as an (x, y) polygon in H&E px, or None for the whole slide."""
        choice = self.region.value
        if choice == WHOLE_SLIDE:
            return None
        if choice == IN_VIEW:
            camera = self.viewer.scene.camera
            return um_to_he_px(sdata, camera_box_xy_um(camera.center, camera.zoom, self.viewer.canvas.size))
        layer = self.viewer.layers[choice]
        if not len(layer.data):
            raise InputError(f"Shapes layer {choice!r} has no shape: draw the region first")
        vertices_rc = np.asarray(layer.data[0])[:, -2:]
        world_rc = np.array([layer.data_to_world(v) for v in vertices_rc])[:, -2:]
        return um_to_he_px(sdata, napari_to_xy(world_rc))

    def run(self, *_):
        from napari_morphomol.inference import PredictOptions, run_route

        try:
            sdata = self._sample()
            checkpoint = self.checkpoint.value
            if checkpoint is None or not Path(checkpoint).is_file():
                raise InputError("choose a checkpoint file (.safetensors), e.g. one trained with `morphomol train`")
            store = self.store.value
            if store is None or str(store) in ("", "."):
                raise InputError("choose where to write the results store (a new folder ending in .zarr)")
            options = PredictOptions(store=Path(store), checkpoint=Path(checkpoint),
                                     batch_size=int(self.batch_size.value), device=self.device.value,
                                     region_he_px=self.region_he_px(sdata), interval_level=self.interval_level.value)
            route = run_route(sdata, options.checkpoint)  # a model that cannot run on an H&E alone says so now
        except InputError as exc:
            self._on_error(exc)
            return None
        self._cancel.clear()
        worker = create_worker(self._work, sdata, options,
                               _progress={"desc": "Predicting", "total": 0},
                               _connect={"errored": self._on_error}, _start_thread=False)
        worker.yielded.connect(lambda done_total: self._on_progress(worker, done_total))
        worker.returned.connect(self._on_done)
        worker.finished.connect(self._on_finished)
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = ("tiling and calibrating (the model predicts from the H&E alone)..."
                             if route == "image" else "tiling and calibrating...")
        worker.start()
        self.worker = worker
        return worker

    def _work(self, sdata, options: PredictOptions):
        """Runs predict in a thread of its own and yields its (done, total) chunks to the GUI thread."""
        from napari_morphomol.inference import predict

        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def target():
            try:
                outcome["path"] = predict(sdata, options, progress=lambda d, t: events.put((d, t)),
                                          cancel=self._cancel.is_set)
            except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread below
                outcome["error"] = exc
            finally:
                events.put(None)

        thread = threading.Thread(target=target, name="morphomol-predict", daemon=True)
        thread.start()
        while (event := events.get()) is not None:
            yield event
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["path"]

    def _on_progress(self, worker, done_total):
        done, total = done_total
        if worker.pbar is not None:
            worker.pbar.total = total
            worker.pbar.n = done
            worker.pbar.refresh()
        self.status.value = f"{done} / {total} chunks"
        if 0 < done < total:
            self._show_partial()

    def _show_partial(self):
        """Gene maps fill in as chunks finish: show what the partial store holds so far."""
        from napari_morphomol.analysis import explore_results, partial_results

        partial = partial_results(self.store.value)
        if partial is None or not np.isfinite(partial.predictions).all(axis=1).any():
            return
        self._explore_dock().update_explorer(explore_results(partial))

    def _explore_dock(self):
        from napari_morphomol.widgets.explore import ExploreWidget

        if self.explore_widget is None:
            self.explore_widget = ExploreWidget(self.viewer)
            self.viewer.window.add_dock_widget(self.explore_widget, name="Explore predictions")
        return self.explore_widget

    def cancel(self, *_):
        self._cancel.set()
        self.status.value = "cancelling after the current batch..."

    def _on_done(self, path):
        from napari_morphomol.analysis import explore_run

        self.results_path = Path(path)
        self.status.value = f"done: {self.results_path}"
        explore = self._explore_dock()
        explore.results_path.value = self.results_path
        explore.update_explorer(explore_run(self.results_path))

    def _on_error(self, exc):
        from napari_morphomol.inference import InferenceCancelled

        if isinstance(exc, InferenceCancelled):
            self.status.value = "cancelled: run again with the same settings to resume"
            show_info(self.status.value)
            return
        report_error(exc, lambda text: setattr(self.status, "value", text))

    def _on_finished(self):
        self.run_button.enabled, self.cancel_button.enabled = True, False
