"""napari layer data for a sample (H&E, DAPI, transcript density), placed in micrometres.

The invariant: every layer's world coordinates are um in the sample's ``global`` frame (the
Xenium frame; the H&E's own when there is no Xenium run), so all layers of a sample, and of runs
on it (:mod:`.run`), overlay. :func:`he_pixel_to_global` and :func:`display_pixel_size_um` are
that placement; :func:`um_to_he_px` is its inverse for regions drawn in the viewer. Layer data
tuples are plain data (no napari import); each layer's metadata carries its SpatialData sample.
"""

from __future__ import annotations

import numpy as np
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation

from napari_morphomol.coords import HE_PX, apply_affine_xy, layer_affine_um, scale_matrix
from napari_morphomol.elements import HE_IMAGE, MORPHOLOGY, TRANSCRIPTS, element_levels_cyx, levels_yxc, sample_info
from napari_morphomol.io.transcript_density import TranscriptDensity, build_transcript_density
from napari_morphomol.layers.view import percentile_limits

HE_LAYER = "H&E"
DAPI_LAYER = "DAPI"
DENSITY_LAYER = "transcripts (all genes)"
UNITS_UM = ("um", "um")
DENSITY_COLORMAP = {
    "name": "transcript density",
    "colors": [[0.0, 0.0, 0.0, 0.0], [0.0, 0.75, 0.3, 0.7], [0.85, 1.0, 0.1, 1.0]],
}
"""Transparent where there are no transcripts, so a density map reads on top of the H&E."""


IN_MEMORY_LEVEL_SIDE_PX = 4096
"""Pyramid levels this small (at most 50 MB of RGB) are read where the layer data is made (the Load
sample dock's worker), so napari's first frame and thumbnail read memory, not tiles, on the event loop."""


def _small_levels_in_memory(levels: list) -> list:
    return [np.asarray(level) if max(level.shape[:2]) <= IN_MEMORY_LEVEL_SIDE_PX else level for level in levels]


def he_pixel_to_global(sdata: SpatialData) -> np.ndarray:
    """H&E px -> global as a 3 x 3 (x, y) matrix; the H&E alone is shown at its own pixel size."""
    info = sample_info(sdata)
    if info.he_to_global is not None:
        return np.asarray(info.he_to_global)
    xenium_px = info.xenium_pixel_size_um or info.he_pixel_size_um
    return scale_matrix(info.he_pixel_size_um / xenium_px)


def display_pixel_size_um(sdata: SpatialData) -> float:
    """The um per ``global`` px used for display (the H&E's own when there is no Xenium run)."""
    info = sample_info(sdata)
    return info.xenium_pixel_size_um or info.he_pixel_size_um


def um_to_he_px(sdata: SpatialData, points_xy_um: np.ndarray) -> np.ndarray:
    """(x, y) points in the viewer's um (e.g. a drawn region) -> H&E px of the sample."""
    points_global_px = np.asarray(points_xy_um, dtype=np.float64) / display_pixel_size_um(sdata)
    return apply_affine_xy(np.linalg.inv(he_pixel_to_global(sdata)), points_global_px)


def he_layer(sdata: SpatialData) -> tuple:
    element = sdata.images[HE_IMAGE]
    assert get_transformation(element, HE_PX) is not None
    affine = layer_affine_um(he_pixel_to_global(sdata), display_pixel_size_um(sdata))
    return (
        _small_levels_in_memory(levels_yxc(element_levels_cyx(element))),
        {"name": HE_LAYER, "rgb": True, "units": UNITS_UM, "multiscale": True, "affine": affine,
         "metadata": {"sdata": sdata, "element": HE_IMAGE}},
        "image",
    )


def dapi_layer(sdata: SpatialData) -> tuple:
    element = sdata.images[MORPHOLOGY]
    levels = _small_levels_in_memory([level[0] for level in element_levels_cyx(element)])  # DAPI
    pixel_um = display_pixel_size_um(sdata)
    return (
        levels,
        {"name": DAPI_LAYER, "units": UNITS_UM, "multiscale": True, "scale": (pixel_um, pixel_um), "colormap": "cyan",
         "blending": "additive", "opacity": 0.6, "contrast_limits": percentile_limits(levels[-1], (1.0, 99.8)),
         "metadata": {"sdata": sdata, "element": MORPHOLOGY}},
        "image",
    )


def transcript_density(sdata: SpatialData, bin_um: float = 4.0) -> TranscriptDensity:
    """The density index of a sample's transcripts over the morphology image's extent."""
    height_px, width_px = sdata.images[MORPHOLOGY]["scale0"]["image"].shape[1:]
    pixel_um = display_pixel_size_um(sdata)
    return build_transcript_density(
        sdata.points[TRANSCRIPTS], extent_um=(width_px * pixel_um, height_px * pixel_um), bin_um=bin_um
    )


def density_layer(density: TranscriptDensity, sdata: SpatialData, genes: list[str] | None = None) -> tuple:
    """A density raster (transcripts per bin, qv >= 20) as a multiscale image in um."""
    raster = density.raster(genes)
    levels = density.pyramid(raster)
    b = density.bin_um
    name = DENSITY_LAYER if genes is None else f"density: {', '.join(genes)}"
    high = percentile_limits(raster[raster > 0], (0.0, 99.5))[1]
    return (
        levels if len(levels) > 1 else levels[0],
        {"name": name, "units": UNITS_UM, "multiscale": len(levels) > 1, "scale": (b, b), "translate": (b / 2, b / 2),
         "colormap": DENSITY_COLORMAP, "blending": "translucent", "contrast_limits": (0.0, max(high, 1.0)),
         "visible": genes is not None,
         "metadata": {"sdata": sdata, "element": TRANSCRIPTS, "density_genes": genes,
                      "units": f"transcripts per {b:g} x {b:g} um bin"}},
        "image",
    )


def sample_layers(sdata: SpatialData, *, with_density: bool = True) -> list[tuple]:
    """The layers a user expects on opening a sample: H&E, DAPI, transcript density."""
    layers = []
    if HE_IMAGE in sdata.images:
        layers.append(he_layer(sdata))
    if MORPHOLOGY in sdata.images:
        layers.append(dapi_layer(sdata))
    if with_density and TRANSCRIPTS in sdata.points and MORPHOLOGY in sdata.images:
        layers.append(density_layer(transcript_density(sdata), sdata))
    return layers
