"""A prediction run as an AnnData: tiles are observations, add-on genes are variables.

Schema (docs/export.md): ``X`` predicted log1p expression; ``layers['measured']`` the measured
log1p counts on the same scale (NaN for add-on genes the sample did not measure); ``obs`` the
tile table; ``obsm['spatial']`` tile centres in ``global`` px; ``obsm['X_embedding']``; with
clusters ``obsm['X_pca']``, ``obsm['X_umap']``, ``obs['leiden_0.5']``, ``obs['leiden_1.0']`` and
their ``uns['leiden_*_colors']``; ``var`` per-gene metrics; ``uns`` the model card, the
registration and its landmarks. Everything is a plain h5ad type, so scanpy uses it as it is.
The tile table and clusters are the analysis package's (the same AnnData the Explore widget
shows); this module adds the provenance.
"""

from __future__ import annotations

import json

import numpy as np
from anndata import AnnData

from napari_morphomol.analysis import add_clusters, tiles_anndata
from napari_morphomol.export.registration import run_registration
from napari_morphomol.inference.store import Results

ANNDATA_FORMAT = "napari-morphomol.anndata/1"


def results_to_anndata(results: Results, *, clusters: bool = True, seed: int = 0) -> AnnData:
    """The run as an AnnData (``analysis.tiles_anndata``) with its provenance in ``uns``;
    ``clusters`` adds PCA, Leiden and UMAP of the tile embeddings (``analysis.add_clusters``)."""
    adata = tiles_anndata(results)
    adata.uns["morphomol"] = _run_summary(results)
    adata.uns["model_card"] = json.dumps(results.metadata["model_card"])
    _add_registration(adata, results.metadata)
    if clusters:
        add_clusters(adata, seed=seed)
    return adata


def _run_summary(results: Results) -> dict:
    meta = results.metadata
    sample = meta.get("sample", {})
    return {
        "format": ANNDATA_FORMAT,
        "results_store": str(results.path),
        "run_id": str(meta.get("run_id", "")),
        "xenium_pixel_size_um": float(sample.get("xenium_pixel_size_um") or np.nan),
        "he_pixel_size_um": float(sample.get("he_pixel_size_um") or np.nan),
        "spatial_units": ("global px (Xenium morphology pixels)" if sample.get("xenium_dir")
                          else "H&E um (an H&E alone: no Xenium frame)"),
        "run_metadata": json.dumps({k: v for k, v in meta.items() if k != "model_card"}),
    }


def _add_registration(adata: AnnData, metadata: dict) -> None:
    registration = run_registration(metadata)
    adata.uns["registration"] = {
        "direction": "he_px -> global_px",
        "model": registration.model,
        "he_to_global": registration.best_affine,
        "record": json.dumps(registration.record),
    }
    pairs = registration.landmarks
    if pairs is not None:
        adata.uns["landmarks"] = {
            "names": np.asarray(pairs.names, dtype=str),
            "active": np.asarray(pairs.active, dtype=bool),
            "he_px": np.asarray(pairs.he_px, dtype=np.float64),
            "global_px": np.asarray(pairs.global_px, dtype=np.float64),
        }
