"""Loading a synthetic sample as one lazy SpatialData object, and opening it again from .zarr."""

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pytest
from spatialdata.transformations import get_transformation

from napari_morphomol.cli import main
from napari_morphomol.coords import GLOBAL, HE_PX
from napari_morphomol.elements import CELL_TABLE, HE_IMAGE, MORPHOLOGY, TRANSCRIPTS, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.io.sample import find_sample_parts, load_sample, open_sample, summarize_sample
from napari_morphomol.registration.formats import read_alignment_csv


@pytest.fixture(scope="module")
def sdata(synthetic_sample):
    return load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path, synthetic_sample.alignment_csv)


def test_sample_is_lazy_and_complete(sdata, synthetic_sample):
    assert isinstance(sdata.points[TRANSCRIPTS], dd.DataFrame)
    for name in (HE_IMAGE, MORPHOLOGY):
        levels = [sdata.images[name][k]["image"].data for k in sdata.images[name].children]
        assert len(levels) >= 2 and all(isinstance(level, da.Array) for level in levels)
    he = sdata.images[HE_IMAGE]["scale0"]["image"]
    assert he.dtype == np.uint8 and list(he.coords["c"].values) == ["r", "g", "b"]
    info = sample_info(sdata)
    assert info.xenium_pixel_size_um == pytest.approx(0.2125)
    assert info.he_pixel_size_um == pytest.approx(0.2737)
    matrix = get_transformation(sdata.images[HE_IMAGE], GLOBAL).to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(matrix, read_alignment_csv(synthetic_sample.alignment_csv))
    assert get_transformation(sdata.images[HE_IMAGE], HE_PX).to_affine_matrix(("x", "y"), ("x", "y")).tolist() == (
        np.eye(3).tolist()
    )


def test_nothing_is_written_into_the_bundle(synthetic_sample):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in synthetic_sample.xenium_dir.rglob("*"))
    s = load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path, synthetic_sample.alignment_csv)
    summarize_sample(s)
    after = sorted((p.name, p.stat().st_mtime_ns) for p in synthetic_sample.xenium_dir.rglob("*"))
    assert before == after


def test_summary_counts_every_transcript(sdata, synthetic_sample):
    import pyarrow.parquet as pq

    summary = summarize_sample(sdata)
    n = pq.ParquetFile(synthetic_sample.xenium_dir / "transcripts.parquet").metadata.num_rows
    assert summary["transcripts"]["count"] == n
    assert summary["morphology"]["width_um"] == pytest.approx(600, abs=1)
    assert summary["he"]["aligned"] is True


def test_open_sample_recognises_folders_and_h_and_e_alone(synthetic_sample):
    parts = find_sample_parts(synthetic_sample.root)
    assert parts.xenium_dir == synthetic_sample.xenium_dir and parts.he_path == synthetic_sample.he_path
    assert find_sample_parts(synthetic_sample.xenium_dir).he_path is None
    he_only = open_sample(synthetic_sample.he_path)
    assert list(he_only.images) == [HE_IMAGE] and not he_only.points
    assert sample_info(he_only).he_to_global is None


def test_cells_on_request(synthetic_sample):
    with_cells = load_sample(synthetic_sample.xenium_dir, cells=True)
    table = with_cells.tables[CELL_TABLE]
    assert table.n_obs > 100 and "cell_boundaries" in with_cells.shapes


def test_written_zarr_opens_again(sdata, tmp_path):
    target = tmp_path / "sample.zarr"
    small = sdata.subset([HE_IMAGE, MORPHOLOGY])
    small.attrs.update(sdata.attrs)
    small.write(target)
    again = open_sample(target)
    assert set(again.images) == {HE_IMAGE, MORPHOLOGY}
    assert sample_info(again).he_pixel_size_um == pytest.approx(0.2737)
    np.testing.assert_array_equal(
        again.images[HE_IMAGE]["scale0"]["image"][:, :50, :50].values,
        sdata.images[HE_IMAGE]["scale0"]["image"][:, :50, :50].values,
    )


def test_broken_zarr_is_explained(tmp_path):
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{nonsense")
    with pytest.raises(InputError, match="not a readable SpatialData"):
        open_sample(broken)


def test_inverted_alignment_warns(synthetic_sample, tmp_path):
    inverted = tmp_path / "inverted_he_imagealignment.csv"
    np.savetxt(inverted, np.linalg.inv(read_alignment_csv(synthetic_sample.alignment_csv)), delimiter=",")
    with pytest.warns(UserWarning, match="inverted"):
        load_sample(synthetic_sample.xenium_dir, synthetic_sample.he_path, inverted)


def test_cli_info(synthetic_sample, capsys):
    assert main(["info", str(synthetic_sample.root)]) == 0
    out = capsys.readouterr().out
    assert '"aligned": true' in out and '"features"' in out
    assert main(["info", str(synthetic_sample.root / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_transcripts_match_spatialdata_io(sdata, synthetic_sample):
    """Our lazy transcript reader lays the points out exactly as spatialdata-io's reader does."""
    from spatialdata_io import xenium

    reference = xenium(
        synthetic_sample.xenium_dir, cells_boundaries=False, nucleus_boundaries=False, cells_labels=False,
        nucleus_labels=False, cells_table=False, morphology_focus=False, aligned_images=False,
    )[TRANSCRIPTS]
    ours = sdata.points[TRANSCRIPTS]
    assert list(ours.columns) == list(reference.columns)
    assert ours.attrs == reference.attrs
    a, b = ours.compute(), reference.compute()
    np.testing.assert_array_equal(a[["x", "y", "z"]].to_numpy(), b[["x", "y", "z"]].to_numpy())
    assert (a["feature_name"].astype(str).to_numpy() == b["feature_name"].astype(str).to_numpy()).all()
    assert set(a["feature_name"].cat.categories) == set(b["feature_name"].cat.categories)
