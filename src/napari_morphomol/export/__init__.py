"""Export a prediction run (headless): AnnData ``.h5ad``, SpatialData ``.zarr``, landmark CSV,
QuPath GeoJSON.

One call writes whatever is asked for, atomically::

    from napari_morphomol.export import export_results
    export_results("RESULTS.zarr", h5ad="run.h5ad", spatialdata="run.zarr", overwrite=False, clusters=True,
                   cells_h5ad=None, qupath="tiles.geojson")

The pieces (``results_to_anndata``, ``results_to_spatialdata``, the ``write_*`` functions) are
public for callers that already hold the objects. Schemas: docs/export.md.
"""

from napari_morphomol.export.anndata import results_to_anndata
from napari_morphomol.export.qupath import QUPATH_GEOJSON, write_qupath_geojson
from napari_morphomol.export.spatialdata import (
    CELL_LABELS,
    CELL_TABLE,
    MEASURED_IMAGE,
    MEASURED_TOKEN_IMAGE,
    PREDICTED_IMAGE,
    PREDICTED_TOKEN_IMAGE,
    TILE_TABLE,
    TILES,
    gene_map_image,
    results_to_spatialdata,
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
    "LANDMARK_FORMATS",
    "MEASURED_IMAGE",
    "MEASURED_TOKEN_IMAGE",
    "PREDICTED_IMAGE",
    "PREDICTED_TOKEN_IMAGE",
    "QUPATH_GEOJSON",
    "CELL_LABELS",
    "CELL_TABLE",
    "RESULTS_LAYER_KEY",
    "TILES",
    "TILE_TABLE",
    "export_results",
    "results_to_anndata",
    "results_to_spatialdata",
    "gene_map_image",
    "tile_shapes",
    "token_map_element",
    "write_h5ad",
    "write_landmarks_csv",
    "write_qupath_geojson",
    "write_spatialdata_zarr",
]
