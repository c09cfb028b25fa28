"""Dock widget "Register H&E to Xenium": click landmark pairs, fit, apply, import and export.

Two Points layers hold the landmarks, paired by order (the i-th H&E point with the i-th Xenium
point). The H&E one holds H&E px and carries the H&E layer's affine (and, side by side, its
shift), so a click on the H&E image lands in H&E px; the Xenium one holds ``global`` px shown at
the Xenium pixel size. The science is in ``napari_morphomol.registration``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    PushButton,
    Table,
)
from napari.layers.base import ActionType
from napari.qt.threading import create_worker
from napari.utils.notifications import show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QAbstractItemView, QMessageBox

from napari_morphomol.coords import HE_PX, apply_affine_xy, napari_to_xy, xy_to_napari
from napari_morphomol.elements import HE_IMAGE, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.layers.sample import DAPI_LAYER, UNITS_UM, display_pixel_size_um, he_pixel_to_global
from napari_morphomol.registration import (
    REGISTRATION_MODELS,
    check_direction,
    propose_landmarks_for_sample,
    read_alignment_csv,
    read_bigwarp_csv,
    read_keypoints_csv,
    write_alignment_csv,
    write_bigwarp_csv,
    write_keypoints_csv,
)
from napari_morphomol.registration.manual import (
    RegistrationHistory,
    fit_landmark_points,
    landmark_pairs_from_points,
    moved_layer_affine,
    sample_geometry,
    side_by_side_shift_um,
    unique_landmark_names,
)
from napari_morphomol.widgets._errors import status_label

HE_POINTS_LAYER = "landmarks (H&E)"
XENIUM_POINTS_LAYER = "landmarks (Xenium)"
MARKER_UM = 10.0
"""Diameter of a landmark marker. napari sizes points by ``size x scale`` and ignores the affine,
so the H&E layer (scale 1, affine in um) gets this size as is."""
MARKER_SCREEN_PX = (8, 40)
"""On screen a marker is never smaller or larger than this (px), whatever the zoom: readable at
slide zoom, not a blob up close."""
PAIR_VIEW_UM = 250.0
"""A click on a residual row zooms the view to about this many um across, around the pair."""
LIVE_FIT_DELAY_MS = 200
"""Residuals are refitted this long after the last point edit (not on every drag step)."""

OVERLAY, SIDE_BY_SIDE = "overlay", "side by side"
KEYPOINTS, ALIGNMENT, BIGWARP = "Xenium Explorer keypoints", "alignment matrix (3x3 CSV)", "BigWarp landmarks"
TABLE_COLUMNS = ["residual um", "left-out um", "used"]


def _same_layer(a, b) -> bool:
    """Identity that also holds through napari's proxies of plugin viewers (``is`` does not)."""
    return a is not None and b is not None and a.unique_id == b.unique_id


def _fmt_um(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.2f}"


def shown_as_best_affine(fitted) -> str:
    """What the overlay cannot show of a fit that is not one affine: napari places the H&E by one
    matrix, so it shows the fit's best single affine; the tiles and transcripts use the full model.
    Says how far that affine is from the landmarks ("" for affine fits)."""
    if fitted.matrix is not None:
        return ""
    used = fitted.used  # active pairs, robust outliers left out
    miss_px = apply_affine_xy(fitted.best_affine, fitted.pairs.he_px[used]) - fitted.pairs.global_px[used]
    rmse_um = float(np.sqrt((miss_px**2).sum(axis=1).mean())) * fitted.xenium_pixel_size_um
    return (f". The overlay shows its best single affine (RMSE {rmse_um:.2f} um at the landmarks): napari places "
            f"an image by one matrix. Tiles, transcripts and predictions use the full {fitted.model} model")


class RegistrationWidget(Container):
    """Landmark registration of the H&E of a loaded sample onto its Xenium images."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.sdata = None
        self._deleted = ""  # what the last deletion of the landmark layers took, said when new ones come
        self.geometry = None
        self.fitted = None
        self.history = RegistrationHistory()
        self.he_points = self.xenium_points = None
        self.auto_worker = None
        self._syncing = False
        self._shift_um = np.zeros(2)
        self._row_pairs: list[int] = []
        self._point_callbacks: list = []

        self.status = status_label("")
        self.model = ComboBox(choices=list(REGISTRATION_MODELS), value="affine", label="model")
        self.robust = CheckBox(value=False, text="robust (leave out outliers)")
        self.auto_button = PushButton(text="Automatic start")
        self.fit_button = PushButton(text="Fit")
        self.apply_button = PushButton(text="Apply")
        self.undo_button = PushButton(text="Undo apply")
        self.redo_button = PushButton(text="Redo apply")
        self.view = ComboBox(choices=[OVERLAY, SIDE_BY_SIDE], value=OVERLAY, label="view")
        self.blend = FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, label="DAPI <-> H&E")
        self.flick_button = PushButton(text="Flick H&&E / DAPI")  # && shows one &: Qt takes & for a shortcut key
        self.table = Table(value={"data": [], "index": [], "columns": TABLE_COLUMNS})
        self.file_format = ComboBox(choices=[KEYPOINTS, ALIGNMENT, BIGWARP], value=KEYPOINTS, label="format")
        self.import_path = FileEdit(mode="r", label="import from", filter="*.csv")
        self.import_button = PushButton(text="Import")
        self.export_path = FileEdit(mode="w", label="export to", filter="*.csv")
        self.export_button = PushButton(text="Export")
        super().__init__(
            widgets=[
                self.status, self.auto_button, self.model, self.robust, self.fit_button, self.apply_button,
                self.undo_button, self.redo_button, self.view, self.blend, self.flick_button, self.table,
                self.file_format, self.import_path, self.import_button, self.export_path, self.export_button,
            ]
        )
        table = self.table.native
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.itemSelectionChanged.connect(self._on_row_selected)
        table.cellDoubleClicked.connect(lambda row, _column: self.toggle_pair(self._row_pairs[row]))
        table.setToolTip("click: centre on the pair; double-click: leave the pair out of the fit or take it back")

        self._fit_timer = QTimer(self.native)
        self._fit_timer.setSingleShot(True)
        self._fit_timer.setInterval(LIVE_FIT_DELAY_MS)
        self._fit_timer.timeout.connect(partial(self.fit, notify=False))
        self.auto_button.changed.connect(self.start_automatic)
        self.fit_button.changed.connect(lambda: self.fit(notify=True))
        self.apply_button.changed.connect(self.apply)
        self.undo_button.changed.connect(self.undo)
        self.redo_button.changed.connect(self.redo)
        self.view.changed.connect(self._place_views)
        self.model.changed.connect(self._schedule_fit)
        self.robust.changed.connect(self._schedule_fit)
        self.blend.changed.connect(self._set_blend)
        self.flick_button.changed.connect(self.flick)
        self.import_button.changed.connect(self.import_file)
        self.export_button.changed.connect(self.export_file)
        # the landmark layers come once a batch of inserted layers (H&E, DAPI, ...) is in, on top
        self._attach_timer = QTimer(self.native)
        self._attach_timer.setSingleShot(True)
        self._attach_timer.setInterval(0)
        self._attach_timer.timeout.connect(self._attach)
        self.viewer.layers.events.inserted.connect(self._attach_soon)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.native.destroyed.connect(self._detach)
        self._attach()
        self._update_buttons()

    # setup ---------------------------------------------------------------------------------
    def _he_image_layer(self):
        for layer in self.viewer.layers:
            if layer.metadata.get("element") == HE_IMAGE and "sdata" in layer.metadata:
                return layer
        return None

    def _attach_soon(self, *_):
        self._attach_timer.start()

    def _attach(self, *_):
        """Find the loaded sample's H&E layer and add the two landmark layers next to it."""
        if self.he_points is not None and self.xenium_points is not None:
            self._keep_points_on_top()
            return
        he = self._he_image_layer()
        if he is None:
            self.status.value = "load a sample with an H&E image and a Xenium run first (Load sample widget)"
            return
        try:
            self.geometry = sample_geometry(he.metadata["sdata"])
        except InputError as exc:
            self.status.value = str(exc)
            return
        self.sdata = he.metadata["sdata"]
        self._add_landmark_layers(he)
        if sample_info(self.sdata).he_to_global is None:
            self.view.value = SIDE_BY_SIDE  # nothing to overlay yet
        self.viewer.layers.selection.active = self.he_points
        self.he_points.mode = "add"
        self.status.value = "click a feature on the H&E, then the same feature on the DAPI; repeat"
        if self._deleted:
            self.status.value = (f"{self._deleted}; new empty ones are ready: click pairs again, or import "
                                 "landmarks (export them first to keep them)")
            self._deleted = ""

    def _add_landmark_layers(self, he):
        xenium_px = display_pixel_size_um(self.sdata)
        common = {
            "ndim": 2, "units": UNITS_UM, "border_color": "white", "border_width": 0.15,
            "features": pd.DataFrame({"name": pd.Series([], dtype=object), "active": pd.Series([], dtype=bool)}),
            "feature_defaults": {"name": "", "active": True},
            "canvas_size_limits": MARKER_SCREEN_PX,
        }
        # the two names of a pair sit on either side of it, so overlaid they do not print over each other
        self.he_points = self.viewer.add_points(
            name=HE_POINTS_LAYER, affine=he.affine.affine_matrix, translate=he.translate,
            size=MARKER_UM, face_color="lime", metadata={"sdata": self.sdata, "space": HE_PX},
            text={"string": "{name}", "color": "lime", "size": 9, "anchor": "upper_left"}, **common,
        )
        self.xenium_points = self.viewer.add_points(
            name=XENIUM_POINTS_LAYER, scale=(xenium_px, xenium_px), size=MARKER_UM / xenium_px,
            face_color="magenta", metadata={"sdata": self.sdata},
            text={"string": "{name}", "color": "magenta", "size": 9, "anchor": "lower_right"}, **common,
        )
        for layer, partner in ((self.he_points, self.xenium_points), (self.xenium_points, self.he_points)):
            callback = partial(self._on_points_changed, layer, partner)
            layer.events.data.connect(callback)
            self._point_callbacks.append((layer, callback))

    def _keep_points_on_top(self):
        layers = self.viewer.layers
        indices = [layers.index(self.he_points), layers.index(self.xenium_points)]
        if indices != [len(layers) - 2, len(layers) - 1]:
            layers.move_multiple(indices, len(layers))

    def _detach(self, *_):
        """The dock widget is gone: stop listening to the viewer."""
        self.viewer.layers.events.inserted.disconnect(self._attach_soon)
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        for layer, callback in self._point_callbacks:
            layer.events.data.disconnect(callback)

    def _on_layer_removed(self, event):
        """Pairs need both layers: deleting one deletes the other, and while the sample is loaded
        a new, empty pair of layers takes their place at once, so clicking (or Fit) goes on
        (issue 18, finding 8: Fit used to say to load the sample that was loaded)."""
        if not any(_same_layer(event.value, ours) for ours in (self.he_points, self.xenium_points)):
            return
        other = self.xenium_points if _same_layer(event.value, self.he_points) else self.he_points
        n_pairs = len(event.value.data)
        self.he_points = self.xenium_points = self.fitted = None
        self._fit_timer.stop()
        self._show_table()
        for layer in list(self.viewer.layers):
            if _same_layer(layer, other):
                self.viewer.layers.remove(layer)
        self._deleted = f"the landmark layers were deleted with their {n_pairs} pair{'s' * (n_pairs != 1)}"
        self.status.value = self._deleted
        self._attach_soon()  # after the event loop: a viewer clearing all its layers gets none back

    # points --------------------------------------------------------------------------------
    def _on_points_changed(self, layer, partner, event):
        """Name new points after their partner, delete partners together, refit soon."""
        if self._syncing or partner is None:
            return
        if event.action == ActionType.ADDED:
            self._name_new_points(layer, partner)
            if len(layer.data) >= len(partner.data):  # click alternately
                self.viewer.layers.selection.active = partner
                partner.mode = "add"
        elif event.action == ActionType.REMOVED:
            partner_indices = [i for i in event.data_indices if i < len(partner.data)]
            if partner_indices:
                self._syncing = True
                try:
                    partner.selected_data = set()
                    partner.remove(partner_indices)
                finally:
                    self._syncing = False
        elif event.action != ActionType.CHANGED:
            return
        self._schedule_fit()

    def _name_new_points(self, layer, partner):
        """A new point takes its partner's name; without a partner yet, the first free ``Pt-k``."""
        features = layer.features.copy()
        partner_names = [str(n) for n in partner.features["name"]]
        names = [str(n) or (partner_names[i] if i < len(partner_names) else "") for i, n in enumerate(features["name"])]
        features["name"] = unique_landmark_names(names + partner_names[len(names):])[: len(names)]
        layer.features = features

    def _require_landmark_layers(self):
        if self.he_points is None or self.xenium_points is None:
            raise InputError("no landmark layers: load a sample with an H&E image and a Xenium run first")

    def landmark_points(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """(H&E px, global px, names, active) as (x, y) arrays, in pair order."""
        self._require_landmark_layers()
        he = self.he_points.features
        return (
            napari_to_xy(self.he_points.data.reshape(-1, 2)),
            napari_to_xy(self.xenium_points.data.reshape(-1, 2)),
            [str(n) for n in he["name"]],
            he["active"].to_numpy(dtype=bool),
        )

    def set_pairs(self, pairs):
        """Replace the points of both layers with landmark pairs (imported or proposed)."""
        features = pd.DataFrame({"name": list(pairs.names), "active": pairs.active})
        self._syncing = True
        try:
            for layer, points in ((self.he_points, pairs.he_px), (self.xenium_points, pairs.global_px)):
                layer.selected_data = set()
                layer.data = xy_to_napari(points)
                layer.features = features.copy()
        finally:
            self._syncing = False
        self.fit(notify=False)

    # fit / apply ---------------------------------------------------------------------------
    def _schedule_fit(self, *_):
        self._fit_timer.start()

    def fit(self, *_, notify: bool = True):
        """Fit the model to the current pairs and show residuals, worst first."""
        self._fit_timer.stop()
        try:
            he_px, global_px, names, active = self.landmark_points()
            self.fitted = fit_landmark_points(
                he_px, global_px, self.model.value, self.geometry, names=names, active=active,
                robust=self.robust.value,
            )
        except InputError as exc:
            self.fitted = None
            self._show_table()
            self._message(str(exc), notify)
            return None
        self._show_table()
        f = self.fitted
        text = f"{f.model}: RMSE {f.rmse_um:.2f} um over {int(f.used.sum())} pairs"
        if f.warnings:
            text += "\n" + "\n".join(f"warning: {w}" for w in f.warnings)
        self._message(text, notify and bool(f.warnings))
        self._update_buttons()
        return f

    def _show_table(self):
        if self.fitted is None:
            self._row_pairs = []
            self.table.value = {"data": [], "index": [], "columns": TABLE_COLUMNS}
            self._update_buttons()
            return
        quality = self.fitted.quality_table()
        order = quality.sort_values("residual_um", ascending=False, na_position="last").index
        self._row_pairs = [int(i) for i in order]
        rows = [
            [_fmt_um(quality.residual_um[i]), _fmt_um(quality.loo_um[i]), "yes" if quality.used[i] else "no"]
            for i in order
        ]
        self.table.value = {"data": rows, "index": [quality.name[i] for i in order], "columns": TABLE_COLUMNS}
        self.table.native.resizeColumnsToContents()

    def apply(self, *_):
        """Move the H&E (and every layer in H&E space) to the fitted registration; undoable."""
        if self.fitted is None:
            self._message("nothing to apply: add at least as many pairs as the model needs and Fit", True)
            return
        self._move_he_layers(partial(self.history.apply, self.sdata, self.fitted))
        self._message(f"applied the {self.fitted.model} fit (RMSE {self.fitted.rmse_um:.2f} um)"
                      + shown_as_best_affine(self.fitted), False)

    def undo(self, *_):
        if not self.history.can_undo:
            self._message("nothing to undo: no registration has been applied", True)
            return
        self._move_he_layers(partial(self.history.undo, self.sdata))
        self._message("undone: the H&E is back at the registration before", False)

    def redo(self, *_):
        if not self.history.can_redo:
            self._message("nothing to redo", True)
            return
        self._move_he_layers(partial(self.history.redo, self.sdata))
        self._message("redone: the H&E is at the registration undone last", False)

    def _he_space_layers(self):
        return [
            layer for layer in self.viewer.layers
            if layer.metadata.get("sdata") is self.sdata
            and (layer.metadata.get("element") == HE_IMAGE or layer.metadata.get("space") == HE_PX)
        ]

    def _move_he_layers(self, change_registration):
        """Run ``change_registration`` on the sample, then move every H&E-space layer with it."""
        old = he_pixel_to_global(self.sdata)
        shift = self._shift_um.copy()
        self._shift_he_layers(np.zeros(2))
        try:
            change_registration()
        finally:
            new = he_pixel_to_global(self.sdata)
            pixel_um = display_pixel_size_um(self.sdata)
            for layer in self._he_space_layers():
                layer.affine = moved_layer_affine(layer.affine.affine_matrix, old, new, pixel_um)
            self._shift_he_layers(shift if self.view.value == OVERLAY else self._side_by_side_shift())
            self._update_buttons()

    # view ----------------------------------------------------------------------------------
    def _side_by_side_shift(self) -> np.ndarray:
        return np.asarray(side_by_side_shift_um(he_pixel_to_global(self.sdata), self.geometry))

    def _shift_he_layers(self, shift_um: np.ndarray):
        """Shift every H&E-space layer by ``shift_um`` (x, y) in the world, data untouched.

        napari applies ``translate`` before ``affine``, so the translate is the world shift
        mapped back through each layer's own affine.
        """
        delta_rc = xy_to_napari((np.asarray(shift_um) - self._shift_um)[None])[0]
        for layer in self._he_space_layers():
            linear = layer.affine.affine_matrix[:2, :2]
            layer.translate = np.asarray(layer.translate) + np.linalg.solve(linear, delta_rc)
        self._shift_um = np.asarray(shift_um, dtype=np.float64)

    def _place_views(self, *_):
        if self.sdata is None:
            return
        self._shift_he_layers(np.zeros(2) if self.view.value == OVERLAY else self._side_by_side_shift())
        self.viewer.reset_view()

    def _set_blend(self, value: float):
        """0 = DAPI only, 0.5 = both, 1 = H&E only."""
        he = self._he_image_layer()
        if he is not None:
            he.opacity = min(1.0, 2 * value)
        if DAPI_LAYER in self.viewer.layers:
            self.viewer.layers[DAPI_LAYER].opacity = min(1.0, 2 * (1 - value))

    def flick(self, *_):
        self.blend.value = 0.0 if self.blend.value >= 0.5 else 1.0

    def _on_row_selected(self):
        rows = self.table.native.selectionModel().selectedRows()
        if not rows or self.he_points is None:
            return
        i = self._row_pairs[rows[0].row()]
        if i >= len(self.he_points.data) or i >= len(self.xenium_points.data):
            return
        self.centre_on_pair(i)

    def toggle_pair(self, i: int):
        """Leave pair i out of the fit, or take it back (it keeps its residual either way)."""
        for layer in (self.he_points, self.xenium_points):
            features = layer.features.copy()
            features.loc[i, "active"] = not bool(features.loc[i, "active"])
            layer.features = features
        self.fit(notify=False)

    def centre_on_pair(self, i: int):
        """Centre the view on pair i (on the Xenium point; side by side, between the two) and zoom
        to about PAIR_VIEW_UM across it (side by side: wide enough for both points)."""
        he_world = np.asarray(self.he_points.data_to_world(self.he_points.data[i]))
        xenium_world = np.asarray(self.xenium_points.data_to_world(self.xenium_points.data[i]))
        centre = xenium_world if self.view.value == OVERLAY else (he_world + xenium_world) / 2
        across_um = PAIR_VIEW_UM if self.view.value == OVERLAY else (
            PAIR_VIEW_UM + float(np.abs(he_world - xenium_world).max()))
        self.viewer.scene.camera.center = tuple(centre)
        self.viewer.scene.camera.zoom = min(self.viewer.canvas.size) / across_um
        self.he_points.selected_data = {i}
        self.xenium_points.selected_data = {i}

    # automatic start -----------------------------------------------------------------------
    def start_automatic(self, *_):
        """Propose pairs from hematoxylin vs DAPI in a worker thread; they replace the points,
        after asking when there are clicked pairs (No keeps them and proposes nothing)."""
        try:
            self._require_landmark_layers()
        except InputError as exc:
            self._message(str(exc), True)
            return None
        clicked = len(self.he_points.data)
        if clicked and not self._ask("Replace the clicked pairs?",
                                     f"Automatic start replaces the {clicked} clicked landmark points with the pairs "
                                     "it proposes. Replace them?"):
            self._message(f"kept the {clicked} clicked points; no pairs proposed", False)
            return None
        self.auto_button.enabled = False
        self.status.value = "looking for landmark pairs (hematoxylin vs DAPI)..."
        worker = create_worker(
            propose_landmarks_for_sample, self.sdata, _progress={"desc": "Automatic landmarks"},
            _connect={"returned": self._on_proposed, "errored": self._on_worker_error,
                      "finished": lambda: setattr(self.auto_button, "enabled", True)},
        )
        self.auto_worker = worker
        return worker

    def _on_proposed(self, auto):
        self.set_pairs(auto.pairs)
        self._message(
            f"{len(auto.pairs)} pairs proposed (rotation {auto.angle_deg:.1f} deg); "
            f"check the worst ones, move or delete them, then Apply.\n{self.status.value}",
            False,
        )

    def _on_worker_error(self, exc):
        self._message(str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}", True)

    # files ---------------------------------------------------------------------------------
    def import_file(self, *_):
        """Read pairs (keypoints, BigWarp) into the layers, or apply a 3 x 3 alignment matrix."""
        path = Path(self.import_path.value)
        try:
            self._require_landmark_layers()
            if self.file_format.value == ALIGNMENT:
                matrix = read_alignment_csv(path)
                g = self.geometry
                check_direction(matrix, he_size_xy=g.he_size_xy, global_size_xy=g.global_size_xy,
                                he_pixel_size_um=g.he_pixel_size_um, xenium_pixel_size_um=g.xenium_pixel_size_um,
                                source=str(path))
                self._move_he_layers(partial(self.history.apply_matrix, self.sdata, matrix))
                self._message(f"applied the alignment matrix of {path.name}", False)
                return
            reader = read_keypoints_csv if self.file_format.value == KEYPOINTS else read_bigwarp_csv
            self.set_pairs(reader(path))
        except InputError as exc:
            self._message(str(exc), True)
            return
        self._message(f"read {len(self.he_points.data)} pairs from {path.name}\n{self.status.value}", False)

    def export_file(self, *_):
        """Write the pairs or the applied matrix; an existing file is replaced only when confirmed."""
        path = Path(self.export_path.value)
        try:
            self._require_landmark_layers()
            info = sample_info(self.sdata)
            inputs = info.input_paths
            if self.file_format.value == ALIGNMENT:
                if info.he_to_global is None:
                    raise InputError("the H&E has no registration yet: Fit and Apply first, then export the matrix")
                write = partial(write_alignment_csv, path, np.asarray(info.he_to_global), inputs=inputs)
            else:
                he_px, global_px, names, active = self.landmark_points()
                pairs = landmark_pairs_from_points(he_px, global_px, names=names, active=active)
                writer = write_keypoints_csv if self.file_format.value == KEYPOINTS else write_bigwarp_csv
                write = partial(writer, path, pairs, inputs=inputs)
            if path.is_dir():
                raise InputError(f"{path} is a folder: choose a file name to export to")
            replace = path.exists()
            if replace and not self.confirm_overwrite(path):
                self._message(f"{path.name} not written (it exists)", False)
                return None
            written = write(overwrite=replace)
        except InputError as exc:
            self._message(str(exc), True)
            return None
        self._message(f"wrote {written}", False)
        return written

    def confirm_overwrite(self, path: Path) -> bool:
        return self._ask("File exists", f"{path} exists. Replace it?")

    def _ask(self, title: str, text: str) -> bool:
        """A Yes / No question (No by default), kept as ``self.question`` while it is open."""
        box = QMessageBox(QMessageBox.Icon.Question, title, text,
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self.native)
        box.setDefaultButton(QMessageBox.StandardButton.No)
        self.question = box
        return box.exec() == QMessageBox.StandardButton.Yes

    # messages ------------------------------------------------------------------------------
    def _message(self, text: str, notify: bool):
        self.status.value = text
        if notify:
            show_warning(text)

    def _update_buttons(self):
        self.undo_button.enabled = self.history.can_undo
        self.redo_button.enabled = self.history.can_redo
