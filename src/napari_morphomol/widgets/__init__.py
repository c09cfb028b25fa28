"""The napari docks (the only package that imports Qt and napari): thin views over the core.

Each dock gathers its fields, calls one core function in a worker thread and shows the result:
:class:`LoadSampleWidget` (``io.load_sample``), :class:`RegistrationWidget`
(``registration.manual``), :class:`PredictWidget` (``inference.predict``), :class:`ExploreWidget`
(``analysis.explore_run``, with the :class:`UmapDock`) and :class:`ExportWidget`
(``export.export_results``). Their layers come from :mod:`napari_morphomol.layers`; napari finds
them through ``napari.yaml``. :func:`screenshot_product` draws a run as a user sees it, for the
demo and the docs.
"""

from napari_morphomol._lazy import lazy_attributes

#: Public names and the submodule defining each, loaded on first use (each dock imports Qt).
_SOURCES = {
    "explore": ("ExploreWidget",),
    "export": ("ExportWidget",),
    "load_sample": ("LoadSampleWidget",),
    "predict": ("PredictWidget",),
    "registration": ("RegistrationWidget",),
    "screenshot": ("screenshot_product",),
    "umap_dock": ("UmapDock",),
}
__getattr__ = lazy_attributes("napari_morphomol.widgets", _SOURCES)

__all__ = sorted(name for names in _SOURCES.values() for name in names)
