"""Automatic landmarks: refusals (scored against ground truth in test_registration_truth.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from napari_morphomol.errors import InputError
from napari_morphomol.registration.auto import propose_landmarks


def blobs(shape, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros(shape)
    img[tuple(rng.integers(0, s, 400) for s in shape)] = 1.0
    return ndimage.gaussian_filter(img, 3.0)


def test_unrelated_images_are_refused_with_what_to_do():
    dapi = (blobs((600, 600), 0) * 4000 + 100).astype(np.uint16)[None]
    hema = blobs((500, 500), 1)
    rgb = np.clip(255 * np.exp(-hema[None] * np.array([0.65, 0.70, 0.29])[:, None, None] * 40), 0, 255).astype(np.uint8)
    with pytest.raises(InputError, match="by hand"):
        propose_landmarks([rgb], 2.0, [dapi], 2.0, coarse_um=8.0, angle_step_deg=10.0)


def test_image_without_pyramid_is_refused_before_reading_it():
    huge = da.zeros((3, 9000, 9000), dtype=np.uint8, chunks=(3, 1000, 1000))
    dapi = da.zeros((1, 9000, 9000), dtype=np.uint16, chunks=(1, 1000, 1000))
    with pytest.raises(InputError, match="pyramid"):
        propose_landmarks([huge], 0.01, [dapi], 0.01)
