"""Whole-slide prediction with a trained fusion model as a dask graph, and its results store (no Qt).

Entry points: :func:`predict` (sample + :class:`PredictOptions` -> ``RESULTS.zarr``) and
:func:`open_results` (the store as one array per model output and a pandas tile table);
:func:`run_route` says which inputs a model will be given on a sample (an H&E alone: the image). Modules:
``prediction`` (predict and its steps), ``checks`` (everything checked before work), ``scheduling``
(where the chunk tasks run), ``worker`` (what a task runs), ``store`` (the results store's layout
and reader), ``devices``. See docs/inference.md.
"""

from napari_morphomol.inference.checks import run_route
from napari_morphomol.inference.devices import DeviceFallbackWarning, resolve_device
from napari_morphomol.inference.prediction import PredictOptions, default_checkpoint_path, predict
from napari_morphomol.inference.store import Results, open_results, partial_path
from napari_morphomol.inference.worker import InferenceCancelled

__all__ = [
    "DeviceFallbackWarning",
    "InferenceCancelled",
    "PredictOptions",
    "Results",
    "default_checkpoint_path",
    "open_results",
    "partial_path",
    "predict",
    "resolve_device",
    "run_route",
]
