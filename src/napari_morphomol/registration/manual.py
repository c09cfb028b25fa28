"""Headless steps of registering by hand in a viewer: clicked points -> checked pairs -> fit,
an undo history of applied registrations, and where to put the H&E beside the Xenium image.

The viewer keeps two point lists, one per image, paired by order: the i-th H&E point and the
i-th Xenium point are landmark pair i. Nothing here imports Qt or napari; the "Register H&E to
Xenium" widget calls these functions and shows their results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_morphomol.coords import GLOBAL, apply_affine_xy, layer_affine_um, scale_matrix
from napari_morphomol.elements import HE_IMAGE, MORPHOLOGY, SAMPLE_ATTRS_KEY, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.registration.apply import REGISTRATION_ATTRS_KEY, set_he_registration
from napari_morphomol.registration.fit import FitOptions, FittedTransform, fit_transform
from napari_morphomol.registration.formats import check_direction
from napari_morphomol.registration.landmarks import LandmarkPairs

SIDE_BY_SIDE_GAP = 0.05
"""Side by side, the H&E starts this fraction of the Xenium image's width right of it."""


@dataclass(frozen=True)
class SampleGeometry:
    """What clicked points are checked against: image sizes (x, y) in their px, pixel sizes."""

    he_size_xy: tuple[float, float]
    global_size_xy: tuple[float, float]
    he_pixel_size_um: float | None
    xenium_pixel_size_um: float


def sample_geometry(sdata, he_key: str = HE_IMAGE, morphology_key: str = MORPHOLOGY) -> SampleGeometry:
    """The geometry of a sample opened by ``napari_morphomol.io.load_sample`` (H&E and Xenium)."""
    for key in (he_key, morphology_key):
        if key not in sdata.images:
            raise InputError(f"registration needs the image {key!r}; the sample has {list(sdata.images)}. "
                             "Load both the Xenium run and the H&E image.")
    info = sample_info(sdata)

    def size_xy(key):
        height, width = sdata.images[key]["scale0"]["image"].shape[-2:]
        return float(width), float(height)

    return SampleGeometry(size_xy(he_key), size_xy(morphology_key), info.he_pixel_size_um, info.xenium_pixel_size_um)


def _outside(points_xy: np.ndarray, size_xy: tuple[float, float]) -> np.ndarray:
    return ~np.all((points_xy >= 0) & (points_xy <= np.asarray(size_xy)), axis=1)


def landmark_pairs_from_points(
    he_px: np.ndarray,
    global_px: np.ndarray,
    *,
    names: list[str] | None = None,
    active: np.ndarray | None = None,
    geometry: SampleGeometry | None = None,
) -> LandmarkPairs:
    """Pair the i-th H&E point with the i-th Xenium point, after checking counts and bounds.

    Missing, empty or repeated names become ``Pt-k``. With ``geometry``, points outside their
    image are refused with their names (a click beside the image is almost always a mistake).
    """
    he = np.asarray(he_px, dtype=np.float64).reshape(-1, 2)
    glob = np.asarray(global_px, dtype=np.float64).reshape(-1, 2)
    if len(he) != len(glob):
        more, fewer = ("H&E", "Xenium") if len(he) > len(glob) else ("Xenium", "H&E")
        raise InputError(
            f"{len(he)} H&E points but {len(glob)} Xenium points: every landmark needs a point in both images. "
            f"Click the partners of the last {abs(len(he) - len(glob))} {more} point(s) on the {fewer} image, "
            "or delete them."
        )
    names = unique_landmark_names(names if names is not None else [""] * len(he))
    pairs = LandmarkPairs.from_arrays(he, glob, names, active)
    if geometry is not None:
        messages = []
        for side, points, size in (("H&E", pairs.he_px, geometry.he_size_xy),
                                   ("Xenium", pairs.global_px, geometry.global_size_xy)):
            bad = [pairs.names[i] for i in np.flatnonzero(_outside(points, size))]
            if bad:
                messages.append(f"{', '.join(bad)} lie outside the {side} image ({size[0]:g} x {size[1]:g} px)")
        if messages:
            raise InputError("; ".join(messages) + ". Move those points onto the image or delete them.")
    return pairs


def unique_landmark_names(names: list[str]) -> list[str]:
    """Keep given names; give empty and repeated ones the first free ``Pt-k``."""
    out: list[str] = []
    taken = {str(n) for n in names if str(n)}
    seen: set[str] = set()
    k = 0
    for name in map(str, names):
        if not name or name in seen:
            while f"Pt-{k}" in taken:
                k += 1
            name = f"Pt-{k}"
            taken.add(name)
        seen.add(name)
        out.append(name)
    return out


def fit_landmark_points(
    he_px: np.ndarray,
    global_px: np.ndarray,
    model: str,
    geometry: SampleGeometry,
    *,
    names: list[str] | None = None,
    active: np.ndarray | None = None,
    robust: bool = False,
) -> FittedTransform:
    """Fit ``model`` to clicked points, refusing unequal counts, points off their image and a
    fit that maps the H&E the wrong way round (see :func:`fit_checked`)."""
    pairs = landmark_pairs_from_points(he_px, global_px, names=names, active=active, geometry=geometry)
    return fit_checked(pairs, FitOptions(model, robust=robust), geometry, source="the landmark pairs")


def fit_checked(pairs: LandmarkPairs, options: FitOptions, geometry: SampleGeometry, *, source: str) -> FittedTransform:
    """:func:`~napari_morphomol.registration.fit_transform` on a sample's pixel sizes, refusing a
    fit that maps the H&E the wrong way round (``check_direction``; ``source`` names the pairs in
    its message). The Register dock and ``morphomol register`` both fit through here.

    Parameters
    ----------
    pairs
        Landmark pairs (H&E px, ``global`` px), clicked, read from a file or proposed.
    options
        The model and its settings.
    geometry
        The sample's image sizes and pixel sizes (:func:`sample_geometry`).
    source
        What the pairs came from, e.g. a file name, for the error message.

    Returns
    -------
    FittedTransform
    """
    fitted = fit_transform(pairs, options, xenium_pixel_size_um=geometry.xenium_pixel_size_um,
                           he_pixel_size_um=geometry.he_pixel_size_um)
    check_direction(fitted.best_affine, he_size_xy=geometry.he_size_xy, global_size_xy=geometry.global_size_xy,
                    he_pixel_size_um=geometry.he_pixel_size_um, xenium_pixel_size_um=geometry.xenium_pixel_size_um,
                    source=source)
    return fitted


# ----------------------------------------------------------------------------- display


def moved_layer_affine(
    layer_affine_rc: np.ndarray, old_he_to_global: np.ndarray, new_he_to_global: np.ndarray, pixel_size_um: float
) -> np.ndarray:
    """napari affine of a layer in H&E space after the H&E moves from one registration to another.

    The layer's own map from its data to H&E px (pixels, tiles, a coarser grid) is kept.
    """
    old = layer_affine_um(old_he_to_global, pixel_size_um)
    new = layer_affine_um(new_he_to_global, pixel_size_um)
    return new @ np.linalg.solve(old, np.asarray(layer_affine_rc, dtype=np.float64))


def side_by_side_shift_um(he_to_global: np.ndarray, geometry: SampleGeometry) -> tuple[float, float]:
    """(dx, dy) in um that puts the H&E footprint right of the Xenium image, tops aligned."""
    w, h = geometry.he_size_xy
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64)
    footprint = apply_affine_xy(scale_matrix(geometry.xenium_pixel_size_um) @ np.asarray(he_to_global), corners)
    xenium_width_um = geometry.global_size_xy[0] * geometry.xenium_pixel_size_um
    dx = xenium_width_um * (1 + SIDE_BY_SIDE_GAP) - footprint[:, 0].min()
    dy = -footprint[:, 1].min()
    return float(dx), float(dy)


# ----------------------------------------------------------------------------- undo / redo


@dataclass(frozen=True)
class _RegistrationState:
    he_to_global: np.ndarray | None
    record: dict | None


@dataclass
class RegistrationHistory:
    """Registrations applied to one sample, undoable and redoable.

    A state is the H&E element's affine to ``global`` (absent before any registration), the
    loader's ``he_to_global`` and the registration record in ``sdata.attrs``.
    """

    image_key: str = HE_IMAGE
    _undo: list[_RegistrationState] = field(default_factory=list)
    _redo: list[_RegistrationState] = field(default_factory=list)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def apply(self, sdata, fitted: FittedTransform) -> None:
        """Give the H&E a fitted registration (``set_he_registration``)."""
        self._undo.append(self._state(sdata))
        self._redo.clear()
        set_he_registration(sdata, fitted, self.image_key)

    def apply_matrix(self, sdata, he_to_global: np.ndarray) -> None:
        """Give the H&E a bare 3 x 3 matrix (e.g. an imported alignment CSV); no landmarks go with it."""
        self._undo.append(self._state(sdata))
        self._redo.clear()
        self._restore(sdata, _RegistrationState(np.asarray(he_to_global, dtype=np.float64), None))

    def undo(self, sdata) -> None:
        if not self._undo:
            raise InputError("nothing to undo: no registration has been applied")
        self._redo.append(self._state(sdata))
        self._restore(sdata, self._undo.pop())

    def redo(self, sdata) -> None:
        if not self._redo:
            raise InputError("nothing to redo")
        self._undo.append(self._state(sdata))
        self._restore(sdata, self._redo.pop())

    def _state(self, sdata) -> _RegistrationState:
        from spatialdata.transformations import get_transformation

        element = sdata.images[self.image_key]
        transformation = get_transformation(element, get_all=True).get(GLOBAL)
        matrix = None if transformation is None else transformation.to_affine_matrix(("x", "y"), ("x", "y"))
        record = sdata.attrs.get(REGISTRATION_ATTRS_KEY)
        return _RegistrationState(matrix, None if record is None else dict(record))

    def _restore(self, sdata, state: _RegistrationState) -> None:
        from spatialdata.transformations import Affine, remove_transformation, set_transformation

        element = sdata.images[self.image_key]
        if state.he_to_global is None:
            remove_transformation(element, GLOBAL)
        else:
            affine = Affine(state.he_to_global, input_axes=("x", "y"), output_axes=("x", "y"))
            set_transformation(element, affine, to_coordinate_system=GLOBAL)
        if state.record is None:
            sdata.attrs.pop(REGISTRATION_ATTRS_KEY, None)
        else:
            sdata.attrs[REGISTRATION_ATTRS_KEY] = state.record
        sample_attrs = sdata.attrs.get(SAMPLE_ATTRS_KEY)
        if isinstance(sample_attrs, dict) and "he_to_global" in sample_attrs:
            sample_attrs["he_to_global"] = None if state.he_to_global is None else state.he_to_global.tolist()
