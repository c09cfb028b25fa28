"""Every package has a face: a docstring naming its entry points and an ``__all__`` whose every
name resolves (the lazy faces import their submodules on first use, so a typo would hide)."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ("analysis", "export", "inference", "io", "layers", "models", "registration", "synthetic", "tiling",
            "widgets")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_face_names_resolve(name):
    package = importlib.import_module(f"napari_morphomol.{name}")
    assert package.__doc__ and package.__doc__.strip(), f"napari_morphomol.{name} has no docstring"
    assert package.__all__, f"napari_morphomol.{name} has no __all__"
    missing = [attr for attr in package.__all__ if not hasattr(package, attr)]
    assert not missing, f"napari_morphomol.{name}.__all__ names what it does not have: {missing}"
