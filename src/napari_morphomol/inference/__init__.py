"""Whole-slide prediction with a trained fusion model as a dask graph, and its results store (no Qt).

Entry points: :func:`predict` (sample + checkpoint -> ``RESULTS.zarr``) and :func:`open_results`
(the store as arrays and a pandas tile table). See docs/inference.md.
"""

from napari_morphomol.inference.devices import DeviceFallbackWarning, resolve_device
from napari_morphomol.inference.engine import default_checkpoint_path, predict
from napari_morphomol.inference.store import Results, open_results, partial_path
from napari_morphomol.inference.worker import InferenceCancelled

__all__ = [
    "DeviceFallbackWarning",
    "InferenceCancelled",
    "Results",
    "default_checkpoint_path",
    "open_results",
    "partial_path",
    "predict",
    "resolve_device",
]
