"""npe2 writers: File > Save Selected Layers... as ``.h5ad`` (AnnData) or ``.zarr`` (SpatialData).

Layers shown from a prediction run carry the run's results store in their metadata
(``RESULTS_LAYER_KEY``); whatever layers are selected, the export is of that run, exactly as
``morphomol export`` writes it. An existing file is not replaced (napari's save dialog does
not say that it would be); use the Export widget's overwrite option for that.
"""

from __future__ import annotations

from napari_morphomol.errors import InputError
from napari_morphomol.export import RESULTS_LAYER_KEY, export_results


def _results_of(layer_data: list[tuple]) -> str:
    stores = {str(attrs.get("metadata", {}).get(RESULTS_LAYER_KEY)) for _, attrs, _ in layer_data
              if attrs.get("metadata", {}).get(RESULTS_LAYER_KEY) is not None}
    if not stores:
        raise InputError("none of the selected layers comes from a prediction run; select a layer shown from a "
                         "results store (or use the Export widget, which asks for the store)")
    if len(stores) > 1:
        raise InputError(f"the selected layers come from {len(stores)} different runs ({', '.join(sorted(stores))}); "
                         "select layers of one run")
    return stores.pop()


def write_h5ad(path: str, layer_data: list[tuple]) -> list[str]:
    return [str(export_results(_results_of(layer_data), h5ad=path)["h5ad"])]


def write_spatialdata(path: str, layer_data: list[tuple]) -> list[str]:
    return [str(export_results(_results_of(layer_data), spatialdata=path)["spatialdata"])]
