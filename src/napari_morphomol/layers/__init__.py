"""napari layer data as plain tuples (no Qt, no napari import), every layer placed in um.

Entry points: :func:`sample_layers` (H&E, DAPI, transcript density of a sample) and the per-run
builders :func:`gene_map_layer`, :func:`clusters_layer`, :func:`pca_layer` and
:func:`selection_layer`; :mod:`.view` holds the view maths the docks need
(:func:`percentile_limits`, :func:`camera_box_xy_um`, :func:`event_xy_um`, :func:`is_click`) and
:func:`um_to_he_px` maps a region drawn in the viewer back to H&E px. The reader, the sample-data
entry and the docks all build their layers here; a new map kind is one builder in :mod:`.run`.
"""

from napari_morphomol._lazy import lazy_attributes

#: Public names and the submodule defining each; they load on first use, so that napari's reader
#: and sample-data entries import only what they build.
_SOURCES = {
    "sample": ("DAPI_LAYER", "DENSITY_LAYER", "HE_LAYER", "UNITS_UM", "dapi_layer", "density_layer",
               "display_pixel_size_um", "he_layer", "he_pixel_to_global", "sample_layers", "transcript_density",
               "um_to_he_px"),
    "run": ("CLUSTERS_LAYER", "MAP_UNITS", "MEASURED_LAYER", "PCA_LAYER", "PREDICTED_LAYER", "RESIDUAL_LAYER",
            "RESOLUTIONS", "SELECTION_LAYER", "cluster_label_colors", "cluster_labels", "clusters_layer",
            "gene_map_layer", "map_affine_um", "map_contrast_limits", "map_limits", "map_raster", "pca_layer",
            "selection_layer", "selection_mask"),
    "view": ("camera_box_xy_um", "event_xy_um", "is_click", "percentile_limits", "rgba_image"),
}
__getattr__ = lazy_attributes("napari_morphomol.layers", _SOURCES)

__all__ = sorted(name for names in _SOURCES.values() for name in names)
