"""Shared fixtures: small synthetic H&E + Xenium samples written once per test session."""

from __future__ import annotations

import pytest

from napari_morphomol.io.synthetic import SyntheticSample, write_synthetic_sample


@pytest.fixture(scope="session")
def synthetic_sample(tmp_path_factory) -> SyntheticSample:
    """0.6 x 0.6 mm, seed 0, default panels (380 core + 100 add-on), H&E placed by an affine
    only, so he_imagealignment.csv is the exact H&E px -> global px map."""
    return write_synthetic_sample(
        tmp_path_factory.mktemp("synthetic") / "sample", size_mm=(0.6, 0.6), seed=0, deformation=False
    )


@pytest.fixture(scope="session")
def synthetic_sample_deformed(tmp_path_factory) -> SyntheticSample:
    """Like synthetic_sample (seed 1) with a smooth local warp on top of the affine, so one
    affine leaves residuals of a few um; the exact map is true_he_to_global_px."""
    return write_synthetic_sample(
        tmp_path_factory.mktemp("synthetic_deformed") / "sample", size_mm=(0.6, 0.6), seed=1, deformation=True
    )
