"""`morphomol tiles` on a synthetic sample: the store agrees with tiling the raw files directly."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from napari_morphomol.cli import main
from napari_morphomol.errors import InputError
from napari_morphomol.io.he_image import read_pyramid
from napari_morphomol.registration.formats import read_alignment_csv
from napari_morphomol.tiling import GenePanel, LevelSampler, make_tiling, read_tiles_zarr


@pytest.fixture(scope="module")
def tiles_store(synthetic_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "tiles.zarr"
    code = main(["tiles", str(synthetic_sample.xenium_dir), "--he", str(synthetic_sample.he_path),
                 "--alignment", str(synthetic_sample.alignment_csv), "--panel", str(synthetic_sample.panel_json),
                 "--out", str(out)])
    assert code == 0
    return out


def test_store_matches_direct_tiling_of_the_files(synthetic_sample, tiles_store):
    store = read_tiles_zarr(tiles_store)
    panel = GenePanel.from_json(synthetic_sample.panel_json)
    assert store.core_genes == list(panel.core) and store.addon_genes == list(panel.addon)
    pyramid = read_pyramid(synthetic_sample.he_path)
    transcripts = pd.read_parquet(synthetic_sample.xenium_dir / "transcripts.parquet")
    direct = make_tiling(transcripts, pyramid.levels, he_pixel_size_um=pyramid.pixel_size_um,
                         he_to_global=read_alignment_csv(synthetic_sample.alignment_csv),
                         xenium_pixel_size_um=json.loads(
                             (synthetic_sample.xenium_dir / "experiment.xenium").read_text()
                         )["pixel_size"],
                         panel=panel)
    assert len(store.tiles) == len(direct.tiles) > 0
    pd.testing.assert_frame_equal(store.tiles, direct.tiles, check_dtype=False)
    for position in range(len(store.tiles)):
        tokens = store.tile_tokens(position)
        np.testing.assert_array_equal(tokens, direct.tokens([position])[0])
        assert tokens.sum() == store.tiles["n_core"].iloc[position]
    np.testing.assert_allclose(store.targets_log1p[:], direct.targets_log1p())
    np.testing.assert_array_equal(store.addon_counts[:].sum(axis=1), store.tiles["n_addon"])
    report = store.report
    assert report["transcripts"]["total"] == len(transcripts)
    assert report["transcripts"]["low_qv"] == int((transcripts["qv"] < 20).sum())
    # tile images cut from the same geometry read back
    sampler = LevelSampler(store.geometry, pyramid.levels)
    positions, images = next(sampler.iter_tiles(store.tiles["row"].to_numpy()[:2], store.tiles["col"].to_numpy()[:2]))
    assert images.shape == (2, 224, 224, 3) and images.dtype == np.uint8


def test_existing_output_and_unknown_genes_are_refused(synthetic_sample, tiles_store, tmp_path, capsys):
    base = ["tiles", str(synthetic_sample.xenium_dir), "--he", str(synthetic_sample.he_path),
            "--alignment", str(synthetic_sample.alignment_csv)]
    assert main([*base, "--out", str(tiles_store)]) == 2
    assert "already exists" in capsys.readouterr().err
    panel = tmp_path / "panel.json"
    panel.write_text(json.dumps({"core": ["EPCAM", "NOTAGENE1"], "addon": ["NOTAGENE2"]}))
    out = tmp_path / "t.zarr"
    assert main([*base, "--panel", str(panel), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NOTAGENE1, NOTAGENE2" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [panel]


def test_per_region_registration_is_used_as_fitted(synthetic_sample_deformed, tmp_path):
    from napari_morphomol.registration import FitOptions, fit_transform, read_keypoints_csv, write_registration_json

    sample = synthetic_sample_deformed
    fitted = fit_transform(read_keypoints_csv(sample.keypoints_csv), FitOptions("per-region", n_regions=2))
    record = write_registration_json(tmp_path / "registration.json", fitted)
    out = tmp_path / "tiles.zarr"
    assert main(["tiles", str(sample.xenium_dir), "--he", str(sample.he_path), "--registration", str(record),
                 "--panel", str(sample.panel_json), "--out", str(out)]) == 0
    store = read_tiles_zarr(out)
    pyramid = read_pyramid(sample.he_path)
    direct = make_tiling(pd.read_parquet(sample.xenium_dir / "transcripts.parquet"), pyramid.levels,
                         he_pixel_size_um=pyramid.pixel_size_um, he_to_global=fitted.transform,
                         xenium_pixel_size_um=0.2125, panel=GenePanel.from_json(sample.panel_json))
    affine = make_tiling(pd.read_parquet(sample.xenium_dir / "transcripts.parquet"), pyramid.levels,
                         he_pixel_size_um=pyramid.pixel_size_um, he_to_global=fitted.best_affine,
                         xenium_pixel_size_um=0.2125, panel=GenePanel.from_json(sample.panel_json))
    pd.testing.assert_frame_equal(store.tiles, direct.tiles, check_dtype=False)
    tokens = np.stack([store.tile_tokens(p) for p in range(len(store.tiles))])
    np.testing.assert_array_equal(tokens, direct.tokens(np.arange(len(direct.tiles))))
    # the per-region model moves transcripts across token edges compared with its best single affine
    assert not np.array_equal(tokens, affine.tokens(np.arange(len(affine.tiles))))
    # a registration recorded on the sample is used as is by tile_sample
    from napari_morphomol.io.sample import load_sample
    from napari_morphomol.registration import set_he_registration
    from napari_morphomol.tiling import tile_sample

    sdata = load_sample(sample.xenium_dir, sample.he_path, sample.alignment_csv)
    set_he_registration(sdata, fitted)
    on_sample = tile_sample(sdata, panel=GenePanel.from_json(sample.panel_json))
    pd.testing.assert_frame_equal(on_sample.tiles, direct.tiles)


@pytest.mark.parametrize("kind", ["tiles", "results", "images"])
def test_stores_of_another_kind_or_format_are_refused_with_what_to_do(tmp_path, kind):
    import zarr

    from napari_morphomol.inference import store as results_store
    from napari_morphomol.inference.store import open_results
    from napari_morphomol.models import data as tile_images
    from napari_morphomol.tiling import store as tiles_store

    key, version, read, remedy = {
        "tiles": (tiles_store.ATTRS_KEY, tiles_store.FORMAT_VERSION, tiles_store.read_tiles_zarr,
                  "tile the sample again"),
        "results": (results_store.ATTRS_KEY, results_store.FORMAT_VERSION, open_results,
                    "run `morphomol predict` again"),
        "images": (tile_images.IMAGES_ATTRS_KEY, tile_images.IMAGES_FORMAT_VERSION,
                   lambda path: tile_images.open_tile_images(None, path), "delete it and let it be rebuilt"),
    }[kind]
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w")
    with pytest.raises(InputError, match=f"is not a .*{re.escape(remedy)}"):
        read(plain)
    for other in (version - 1, version + 1):  # written by an older (cell-named geometry) or a newer version
        store = tmp_path / f"format{other}.zarr"
        zarr.open_group(store, mode="w").attrs[key] = {"format_version": other}
        with pytest.raises(InputError, match=f"of format {other}, and this version reads format {version}; .*"
                                             f"{re.escape(remedy)}"):
            read(store)


def test_tiles_of_a_sample_folder_are_those_of_its_files_given_explicitly(synthetic_sample, tiles_store, tmp_path):
    """Issue 18, one rule for inputs: `tiles SAMPLE_DIR` finds the H&E and the alignment as the reader does."""
    out = tmp_path / "found.zarr"
    assert main(["tiles", str(synthetic_sample.root), "--panel", str(synthetic_sample.panel_json),
                 "--out", str(out)]) == 0
    found, given = read_tiles_zarr(out), read_tiles_zarr(tiles_store)
    pd.testing.assert_frame_equal(found.tiles, given.tiles)
    assert found.attrs["provenance"]["he"] == str(synthetic_sample.he_path)
