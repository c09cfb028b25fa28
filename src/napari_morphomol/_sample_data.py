"""File > Open Sample > Synthetic Xenium + H&E: generated once into the user cache, then reused."""

from __future__ import annotations

from pathlib import Path

from napari_morphomol._atomic import cache_dir
from napari_morphomol.io.sample import open_sample
from napari_morphomol.layers.sample import sample_layers
from napari_morphomol.synthetic import GENERATOR_VERSION, write_synthetic_sample

DEMO_SIZE_MM = (1.0, 1.0)
DEMO_SEED = 0


def demo_sample_dir() -> Path:
    """Where the demo sample lives (``MORPHOMOL_CACHE`` or ~/.cache/napari-morphomol)."""
    return cache_dir() / f"synthetic-{DEMO_SIZE_MM[0]:g}x{DEMO_SIZE_MM[1]:g}mm-seed{DEMO_SEED}-v{GENERATOR_VERSION}"


def ensure_demo_sample() -> Path:
    """The demo sample's folder, generating it on first use."""
    folder = demo_sample_dir()
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_sample(folder, size_mm=DEMO_SIZE_MM, seed=DEMO_SEED)
    return folder


def synthetic_sample():
    return sample_layers(open_sample(ensure_demo_sample()))
