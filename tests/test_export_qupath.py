"""QuPath GeoJSON: tiles as QuPath tile objects over the H&E, checked against the format QuPath imports."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from napari_morphomol.cli import main
from napari_morphomol.errors import InputError
from napari_morphomol.export import export_results
from napari_morphomol.inference import open_results


def check_qupath_feature_collection(document: dict) -> None:
    """What QuPath's GeoJSON import reads (docs/export.md): a FeatureCollection of Polygon features
    with closed rings of numbers, an objectType, numeric measurements and r, g, b classifications."""
    assert document["type"] == "FeatureCollection" and isinstance(document["features"], list)
    for feature in document["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert all(isinstance(v, float) for point in ring for v in point)
        properties = feature["properties"]
        assert properties["objectType"] in ("tile", "detection", "cell", "annotation")
        assert all(isinstance(k, str) and isinstance(v, float) and np.isfinite(v)
                   for k, v in properties["measurements"].items())
        if "classification" in properties:
            colour = properties["classification"]["color"]
            assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)


def test_tiles_go_to_qupath_in_he_pixels_with_predictions_measurements_bounds_and_clusters(trusted_results_store,
                                                                                          tmp_path, capsys):
    path, h5ad = tmp_path / "tiles.geojson", tmp_path / "tiles.h5ad"
    assert main(["export", str(trusted_results_store), "--qupath", str(path), "--h5ad", str(h5ad)]) == 0
    assert str(path.resolve()) in capsys.readouterr().out
    document = json.loads(path.read_text())
    check_qupath_feature_collection(document)
    results = open_results(trusted_results_store)
    features = document["features"]
    assert len(features) == len(results.tiles) and document["morphomol"]["format"] == "napari-morphomol.qupath/1"
    tiles = results.tiles
    for feature, (_, tile) in zip(features[:5], tiles.head(5).iterrows(), strict=True):
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == [tile["he_x0"], tile["he_y0"]] and ring[2] == [tile["he_x1"], tile["he_y1"]]
    first = features[0]["properties"]["measurements"]
    gene = results.measured_genes[0]
    column = results.addon_genes.index(gene)
    assert first[f"{gene} predicted (log1p)"] == pytest.approx(float(results.predictions[0, column]))
    assert first[f"{gene} measured (log1p)"] == pytest.approx(float(results.measured_log1p[0, 0]))
    assert first[f"{gene} 90% lower"] <= first[f"{gene} 90% upper"]
    assert first["out of distribution"] in (0.0, 1.0) and "outlier score" in first
    assert sum(name.endswith("predicted (log1p)") for name in first) == len(results.addon_genes)
    # the classification is the AnnData's finest Leiden clustering, in its colours
    adata = ad.read_h5ad(h5ad)
    labels = adata.obs["leiden_1.0"].astype(str).to_numpy()
    palette = dict(zip(adata.obs["leiden_1.0"].cat.categories, adata.uns["leiden_1.0_colors"], strict=True))
    for feature, label in zip(features, labels, strict=True):
        assert feature["properties"]["classification"]["name"] == f"Leiden {label}"
    hex_colour = "#" + "".join(f"{c:02x}" for c in features[0]["properties"]["classification"]["color"])
    assert hex_colour.lower() == palette[labels[0]].lower()


def test_an_he_alone_run_goes_to_qupath_with_predictions_only(tmp_path, synthetic_sample, dropout_checkpoint):
    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io.sample import load_sample

    store = predict(load_sample(he_path=synthetic_sample.he_path),
                    PredictOptions(checkpoint=dropout_checkpoint, store=tmp_path / "R.zarr", device="cpu",
                                   batch_size=8))
    written = export_results(store, qupath=tmp_path / "tiles.geojson", clusters=False)
    document = json.loads(written["qupath"].read_text())
    check_qupath_feature_collection(document)
    names = set(document["features"][0]["properties"]["measurements"])
    assert names and all(name.endswith("predicted (log1p)") for name in names)
    assert "classification" not in document["features"][0]["properties"]


def test_a_foreign_geojson_is_never_replaced_and_ours_only_with_overwrite(results_store, tmp_path):
    foreign = tmp_path / "annotations.geojson"
    foreign.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(InputError, match="exists"):
        export_results(results_store, qupath=foreign)
    with pytest.raises(InputError):
        export_results(results_store, qupath=foreign, overwrite=True)
    assert foreign.read_text() == '{"type": "FeatureCollection", "features": []}'
    ours = tmp_path / "tiles.geojson"
    export_results(results_store, qupath=ours, clusters=False)
    with pytest.raises(InputError, match="exists"):
        export_results(results_store, qupath=ours, clusters=False)
    export_results(results_store, qupath=ours, clusters=False, overwrite=True)
    check_qupath_feature_collection(json.loads(ours.read_text()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
