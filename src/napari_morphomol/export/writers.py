"""Write a prediction run to files: AnnData ``.h5ad``, SpatialData ``.zarr``, landmark CSV,
QuPath GeoJSON (:mod:`.qupath`).

Every writer goes through :func:`napari_morphomol._atomic.atomic_output`: the file or store is
written beside the target under a hidden temporary name and renamed into place only once
complete, and failures leave any earlier target intact. No target may be, hold or lie inside
the run's results store or its sample's files, nor lie inside a Xenium bundle; an existing target
is replaced only with ``overwrite=True`` and only when it is an export of ours: an ``.h5ad`` whose
``uns`` carries ``morphomol``, a SpatialData store whose attrs carry ``EXPORT_ATTRS_KEY``, a
landmark CSV that reads back as one.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from anndata import AnnData
from spatialdata import SpatialData

from napari_morphomol._atomic import OutputKind, atomic_output, guard_output, zarr_store_kind
from napari_morphomol.elements import SAMPLE_PATH_KEYS
from napari_morphomol.errors import InputError
from napari_morphomol.export.anndata import results_to_anndata
from napari_morphomol.export.qupath import QUPATH_GEOJSON, write_qupath_geojson
from napari_morphomol.export.registration import run_registration
from napari_morphomol.export.spatialdata import (
    EXPORT_ATTRS_KEY,
    open_run_sample,
    results_to_spatialdata,
    sample_reference,
)
from napari_morphomol.inference.store import Results, open_results
from napari_morphomol.registration import write_bigwarp_csv, write_keypoints_csv
from napari_morphomol.registration.formats import BIGWARP_CSV, KEYPOINTS_CSV, LANDMARK_FORMATS


def _is_our_h5ad(path: Path) -> bool:
    import h5py

    try:
        if not path.is_file() or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as h5:
            return "uns/morphomol" in h5
    except OSError:
        return False


H5AD_EXPORT = OutputKind("AnnData export (.h5ad)", _is_our_h5ad)
SPATIALDATA_EXPORT = zarr_store_kind("SpatialData export", EXPORT_ATTRS_KEY)


def write_h5ad(adata: AnnData, path: str | Path, *, overwrite: bool = False, inputs=()) -> Path:
    """Build the HDF5 file in memory, then copy it to disk with plain file writes.

    HDF5 does not survive a failed write to disk (a full disk leaves its library state broken and
    the process crashes at exit), so HDF5 never touches the disk here; a full disk is then an
    ordinary ``OSError`` from the copy. Costs one in-memory copy of the file (the outputs' size).
    """
    import h5py
    from anndata.io import write_elem

    path = Path(path)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        write_elem(h5, "/", adata)
    with atomic_output(path, H5AD_EXPORT, inputs=inputs, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())
    return path


def write_spatialdata_zarr(sdata: SpatialData, path: str | Path, *, overwrite: bool = False, inputs=()) -> Path:
    """Write the store element by element; lazy (dask) images and points stream from their sources."""
    path = Path(path)
    with atomic_output(path, SPATIALDATA_EXPORT, inputs=inputs, overwrite=overwrite) as tmp, \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        sdata.write(tmp, update_sdata_path=False)
    return path


def write_landmarks_csv(results: Results, path: str | Path, *, landmark_format: str = "xenium",
                        overwrite: bool = False, inputs=()) -> Path:
    """The run's landmark pairs as Xenium Explorer keypoints (default) or BigWarp CSV."""
    if landmark_format not in LANDMARK_FORMATS:
        raise InputError(f"landmark format must be one of {LANDMARK_FORMATS}, got {landmark_format!r}")
    pairs = run_registration(results.metadata).landmarks
    if pairs is None:
        raise InputError(f"the run in {results.path} used an alignment matrix, not landmarks, so there are no "
                         "landmarks to export; its matrix is in the .h5ad (uns['registration'])")
    writer = write_keypoints_csv if landmark_format == "xenium" else write_bigwarp_csv
    return writer(path, pairs, overwrite=overwrite, inputs=inputs)


def _run_inputs(results: Results) -> list[Path]:
    """The run's results store and its sample's files: no export target may touch them."""
    sample = results.metadata.get("sample", {})
    return [Path(results.path)] + [Path(sample[k]) for k in SAMPLE_PATH_KEYS if sample.get(k)]


def export_results(results_path: str | Path, *, h5ad: str | Path | None = None,
                   spatialdata: str | Path | None = None, landmarks: str | Path | None = None,
                   landmark_format: str = "xenium", overwrite: bool = False, clusters: bool = True,
                   sample: SpatialData | None = None, cells_h5ad: str | Path | None = None,
                   qupath: str | Path | None = None, self_contained: bool = False) -> dict[str, Path]:
    """Write the requested files for the run in ``results_path``.

    All targets are checked before any work, so a refused target never leaves the others half
    done; each is written under a temporary name and renamed (see ``_atomic``).

    Parameters
    ----------
    results_path
        A results store written by ``morphomol predict`` (``RESULTS.zarr``).
    h5ad
        Where to write the tiles AnnData (``.h5ad``), or None.
    spatialdata
        Where to write the SpatialData store (``.zarr``: the prediction maps, the tiles and their
        table, an H&E overview, and where the sample's files are; see ``self_contained``), or None.
    landmarks
        Where to write the run's landmark pairs as a CSV, or None.
    landmark_format
        ``"xenium"`` (Xenium Explorer keypoints) or ``"bigwarp"`` (BigWarp landmarks).
    overwrite
        Replace an earlier export of the same kind at a target (never anything else).
    clusters
        Compute PCA, Leiden and UMAP on the embeddings for the AnnData (scanpy).
    sample
        The sample to export with, replacing the one the run recorded (e.g. when it was moved).
    cells_h5ad
        Where to write the cells AnnData (``.h5ad``: predictions per Xenium cell from the token
        map, ``analysis.cells_anndata``), or None; needs a run of a model with the token head.
    qupath
        Where to write the tiles as QuPath GeoJSON (``.geojson``: tile objects in H&E level-0 px
        with the predictions as measurements and the clusters as classifications,
        :func:`~napari_morphomol.export.qupath.write_qupath_geojson`), or None.
    self_contained
        Copy the sample's H&E, DAPI and transcripts into the SpatialData store (the whole sample,
        re-encoded: about the bundle's size). By default the store refers to the sample's files
        instead (``export.open_export`` attaches them) and holds a coarse H&E overview.

    Returns
    -------
    dict of str to Path
        ``{kind: path}`` for each file written (``"h5ad"``, ``"spatialdata"``, ``"landmarks"``,
        ``"cells_h5ad"``, ``"qupath"``).

    Raises
    ------
    InputError
        When nothing is asked for, two targets are the same path, a target is refused by the
        output guard, or the SpatialData export's sample is not where the run found it (or, without
        ``self_contained``, records no files to refer to); nothing is written then.
    """
    targets = {kind: Path(p) for kind, p in (("h5ad", h5ad), ("spatialdata", spatialdata), ("landmarks", landmarks),
                                            ("cells_h5ad", cells_h5ad), ("qupath", qupath)) if p is not None}
    if not targets:
        raise InputError("nothing to export: give an .h5ad path, a SpatialData .zarr path, a landmarks CSV path, "
                         "a cells .h5ad path and/or a QuPath .geojson path")
    results = open_results(results_path)
    inputs = _run_inputs(results)
    kinds = {"h5ad": H5AD_EXPORT, "spatialdata": SPATIALDATA_EXPORT, "cells_h5ad": H5AD_EXPORT,
             "qupath": QUPATH_GEOJSON, "landmarks": KEYPOINTS_CSV if landmark_format == "xenium" else BIGWARP_CSV}
    if len(set(t.resolve() for t in targets.values())) < len(targets):
        raise InputError(f"two exports name the same path ({', '.join(map(str, targets.values()))}); give each its own")
    for kind, target in targets.items():
        guard_output(target, kinds[kind], inputs=inputs, overwrite=overwrite, inputs_of="the run")
    if "spatialdata" in targets:  # a moved sample, or one that records no files, is refused before any writing
        sample = open_run_sample(results) if sample is None else sample
        if not self_contained:
            sample_reference(sample)
    written: dict[str, Path] = {}
    explorer = None
    if "cells_h5ad" in targets:  # first: its refusals (a tile-only model, no segmentation) cost no other work
        from napari_morphomol.analysis import explore_results

        explorer = explore_results(results)
        cells = explorer.cells.copy()  # the SpatialData export's cell table is the same, built once
        cells.uns["morphomol"] = {"export": "cells", "results": str(results.path)}
        written["cells_h5ad"] = write_h5ad(cells, targets["cells_h5ad"], overwrite=overwrite, inputs=inputs)
    if "landmarks" in targets:
        written["landmarks"] = write_landmarks_csv(results, targets["landmarks"], landmark_format=landmark_format,
                                                   overwrite=overwrite, inputs=inputs)
    if {"h5ad", "spatialdata", "qupath"} & set(targets):
        adata = results_to_anndata(results, clusters=clusters)
        if "qupath" in targets:
            written["qupath"] = write_qupath_geojson(results, targets["qupath"], adata=adata if clusters else None,
                                                     overwrite=overwrite, inputs=inputs)
        if "h5ad" in targets:
            written["h5ad"] = write_h5ad(adata, targets["h5ad"], overwrite=overwrite, inputs=inputs)
        if "spatialdata" in targets:
            sdata = results_to_spatialdata(results, adata, sample=sample, explorer=explorer,
                                           self_contained=self_contained)
            written["spatialdata"] = write_spatialdata_zarr(sdata, targets["spatialdata"], overwrite=overwrite,
                                                           inputs=inputs)
    return written
