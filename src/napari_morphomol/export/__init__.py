"""Export a prediction run (headless): AnnData ``.h5ad``, SpatialData ``.zarr``, landmark CSV,
QuPath GeoJSON.

One call writes whatever is asked for, atomically::

    from napari_morphomol.export import export_results
    export_results("RESULTS.zarr", h5ad="run.h5ad", spatialdata="run.zarr", overwrite=False, clusters=True,
                   cells_h5ad=None, qupath="tiles.geojson", self_contained=False)

The SpatialData store refers to the sample's files by default (it holds the run's elements and
an H&E overview, ``HE_OVERVIEW``); ``open_export("run.zarr")`` reads it back with the sample's
full H&E, DAPI and transcripts attached; ``self_contained=True`` copies the sample in instead.

The pieces (``results_to_anndata``, ``results_to_spatialdata``, ``he_overview``, ``sample_reference``
(the record by which an export refers to its sample), the ``write_*`` functions) are public for
callers that already hold the objects. Schemas: docs/export.md.
"""

from napari_morphomol.export.anndata import results_to_anndata
from napari_morphomol.export.qupath import QUPATH_GEOJSON, write_qupath_geojson
from napari_morphomol.export.spatialdata import (
    CELL_LABELS,
    CELL_TABLE,
    HE_OVERVIEW,
    MEASURED_IMAGE,
    MEASURED_TOKEN_IMAGE,
    OVERVIEW_PIXEL_SIZE_UM,
    PREDICTED_IMAGE,
    PREDICTED_TOKEN_IMAGE,
    SAMPLE_ELEMENTS,
    TILE_TABLE,
    TILES,
    gene_map_image,
    he_overview,
    open_export,
    results_to_spatialdata,
    sample_reference,
    tile_shapes,
    token_map_element,
)
from napari_morphomol.export.writers import (
    LANDMARK_FORMATS,
    export_results,
    write_h5ad,
    write_landmarks_csv,
    write_spatialdata_zarr,
)
from napari_morphomol.inference.store import RESULTS_LAYER_KEY

__all__ = [
    "HE_OVERVIEW",
    "LANDMARK_FORMATS",
    "MEASURED_IMAGE",
    "MEASURED_TOKEN_IMAGE",
    "OVERVIEW_PIXEL_SIZE_UM",
    "PREDICTED_IMAGE",
    "PREDICTED_TOKEN_IMAGE",
    "QUPATH_GEOJSON",
    "CELL_LABELS",
    "CELL_TABLE",
    "RESULTS_LAYER_KEY",
    "SAMPLE_ELEMENTS",
    "TILES",
    "TILE_TABLE",
    "export_results",
    "results_to_anndata",
    "results_to_spatialdata",
    "sample_reference",
    "gene_map_image",
    "he_overview",
    "open_export",
    "tile_shapes",
    "token_map_element",
    "write_h5ad",
    "write_landmarks_csv",
    "write_qupath_geojson",
    "write_spatialdata_zarr",
]
