"""The model that ships with the package: a small early-fusion model trained on synthetic data.

It lets the plugin, the CLI and the tests predict without downloading anything. It was trained
on synthetic samples (``napari_morphomol.synthetic``) with their 380 core + 100 add-on gene
panel and a small ViT (depth 2, width 64, 2 heads, 16 px patches on 224 px tiles), so it is for demos
and tests on synthetic data, not for real tissue. Its card records the command that retrains
it and its held-out metrics.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from napari_morphomol.errors import InputError

SHIPPED_MODEL_FILE = "morphomol-synthetic-early-fusion.safetensors"


def shipped_model_path() -> Path:
    """Path of the shipped checkpoint (package data ``napari_morphomol/data/``)."""
    path = Path(str(resources.files("napari_morphomol") / "data" / SHIPPED_MODEL_FILE))
    if not path.is_file():
        raise InputError(
            f"the shipped model {SHIPPED_MODEL_FILE} is missing from this installation ({path}); reinstall "
            "napari-morphomol or give a checkpoint (MODEL.safetensors from `morphomol train`)"
        )
    return path
