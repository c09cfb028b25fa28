"""Package faces that import their submodules on first use (no imports of their own).

A package whose submodules are heavy (torch, spatialdata, numba) names its public objects in a
table ``{submodule: (names, ...)}`` and gets its ``__getattr__`` from :func:`lazy_attributes`, so
that importing the package (a command's ``--help``, a napari menu entry) loads nothing else.
"""

import importlib
import sys


def lazy_attributes(package: str, sources: dict[str, tuple[str, ...]]):
    """The module ``__getattr__`` of ``package``: each name of ``sources`` is imported from its
    submodule on first access and then kept in the package's namespace."""
    module_of = {name: module for module, names in sources.items() for name in names}

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
