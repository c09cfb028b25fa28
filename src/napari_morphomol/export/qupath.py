"""QuPath GeoJSON: a run's tiles as objects QuPath imports over the H&E it opens.

Definitions (QuPath's GeoJSON, File > Object data... > Import objects, or drag and drop):

- the file is one ``FeatureCollection``; each tile is a ``Feature`` whose ``geometry`` is a
  ``Polygon`` of its box in **H&E level-0 px** (the full-resolution image QuPath opens, origin at
  its top-left corner: the tile table's ``he_x0..he_y1``, no registration involved), ring closed;
- ``properties.objectType`` is ``"tile"`` (QuPath's tile objects are detections, so its
  measurement maps colour them); ``properties.name`` the tile's id;
- ``properties.measurements`` maps a name to a number: ``GENE predicted (log1p)`` for every
  add-on gene, ``GENE measured (log1p)`` where the sample measured it, ``GENE 90% lower`` /
  ``upper`` for a calibrated run, ``outlier score`` and ``out of distribution`` (1 or 0);
- ``properties.classification`` is the tile's Leiden cluster of the embeddings,
  ``{"name": "Leiden 3", "color": [r, g, b]}``, the colours of the tiles AnnData's clusters.

The collection carries a foreign member ``morphomol`` (allowed by RFC 7946: QuPath ignores it)
that marks the file as ours, so ``overwrite`` may replace it; features are written one at a time,
so a slide's worth never sits in memory as one string.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from napari_morphomol._atomic import OutputKind, atomic_output
from napari_morphomol.inference.store import Results

QUPATH_FORMAT = "napari-morphomol.qupath/1"
_MARKER = f'"morphomol": {{"format": "{QUPATH_FORMAT}"'
_HEAD_BYTES = 4096


def _is_our_geojson(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with open(path, "rb") as handle:
            return _MARKER.encode() in handle.read(_HEAD_BYTES)
    except OSError:
        return False


QUPATH_GEOJSON = OutputKind("QuPath GeoJSON export", _is_our_geojson)


def _rgb(colour: str) -> list[int]:
    from matplotlib.colors import to_rgb

    return [int(round(255 * c)) for c in to_rgb(colour)]


def tile_measurements(results: Results) -> tuple[list[str], np.ndarray]:
    """The measurement names of every tile and their (tiles, names) float64 values (NaN: none)."""
    genes = results.addon_genes
    names = [f"{gene} predicted (log1p)" for gene in genes]
    columns = [np.asarray(results.predictions, dtype=np.float64)]
    if results.measured_counts is not None:
        names += [f"{gene} measured (log1p)" for gene in results.measured_genes]
        columns.append(np.asarray(results.measured_log1p, dtype=np.float64))
    trust = results.trust
    if trust.has_intervals:
        level = f"{trust.level:.0%}"
        names += [f"{gene} {level} {bound}" for bound in ("lower", "upper") for gene in genes]
        columns += [np.asarray(trust.lower, dtype=np.float64), np.asarray(trust.upper, dtype=np.float64)]
    if trust.has_flags:
        names += ["outlier score", "out of distribution"]
        columns += [np.asarray(trust.outlier_score, dtype=np.float64)[:, None],
                    np.asarray(trust.outlier_flag, dtype=np.float64)[:, None]]
    return names, np.concatenate(columns, axis=1)


def write_qupath_geojson(results: Results, path: str | Path, *, adata=None, cluster_key: str | None = None,
                         overwrite: bool = False, inputs=()) -> Path:
    """Write the run's tiles as QuPath GeoJSON tile objects (see the module docstring).

    Parameters
    ----------
    results
        The run (``open_results``).
    path
        The ``.geojson`` file to write.
    adata
        The tiles AnnData with clusters (``results_to_anndata(..., clusters=True)``); None: no
        classification.
    cluster_key
        Which of its obs columns classifies the tiles (default: the finest Leiden clustering).
    overwrite, inputs
        As for every writer (``_atomic.atomic_output``).

    Returns
    -------
    Path
        ``path``.
    """
    tiles = results.tiles
    names, values = tile_measurements(results)
    classes = colours = None
    if adata is not None:
        keys = sorted(k for k in adata.obs if k.startswith("leiden_")) if cluster_key is None else [cluster_key]
        if keys:
            key = keys[-1]
            labels = adata.obs[key].astype(str).to_numpy()
            palette = dict(zip(adata.obs[key].cat.categories.astype(str),
                               adata.uns.get(f"{key}_colors", []), strict=False))
            classes, colours = labels, {label: _rgb(colour) for label, colour in palette.items()}
    boxes = tiles[["he_x0", "he_y0", "he_x1", "he_y1"]].to_numpy(dtype=np.float64)
    header = {"run_id": str(results.metadata.get("run_id", "")), "results": str(Path(results.path).absolute()),
              "coordinates": "H&E level-0 px (x right, y down), as QuPath opens the H&E",
              "he_path": (results.metadata.get("sample") or {}).get("he_path")}
    with atomic_output(path, QUPATH_GEOJSON, inputs=inputs, overwrite=overwrite) as tmp, \
            open(tmp, "w", encoding="utf-8") as out:
        out.write('{"type": "FeatureCollection", ' + _MARKER + ", " + json.dumps(header)[1:] + ', "features": [\n')
        tile_ids = tiles["tile_id"].to_numpy()
        for i, ((x0, y0, x1, y1), row) in enumerate(zip(boxes.tolist(), values.tolist(), strict=True)):
            measurements = {name: v for name, v in zip(names, row, strict=True) if math.isfinite(v)}
            properties = {"objectType": "tile", "name": f"tile {int(tile_ids[i])}", "measurements": measurements}
            if classes is not None:
                properties["classification"] = {"name": f"Leiden {classes[i]}",
                                                "color": colours.get(classes[i], [128, 128, 128])}
            feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
                [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}, "properties": properties}
            out.write(("," if i else "") + json.dumps(feature) + "\n")
        out.write("]}\n")
    return Path(path)
