"""Bad Xenium inputs are refused with what to do, or reported; none is silently miscounted.

Each test copies the shared synthetic sample, damages the copy's transcripts.parquet or
experiment.xenium the way a real export can be damaged, and checks that the input files are
byte for byte the same after the run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from napari_morphomol.elements import MORPHOLOGY, SAMPLE_ATTRS_KEY, TRANSCRIPTS, sample_info
from napari_morphomol.errors import InputError
from napari_morphomol.io.features import XeniumDataWarning
from napari_morphomol.io.sample import load_sample, summarize_sample
from napari_morphomol.io.transcript_density import build_transcript_density

N_NAN_X, N_INF_Y = 100, 50


def _copy_sample(synthetic_sample, tmp_path: Path) -> Path:
    root = tmp_path / "sample"
    shutil.copytree(synthetic_sample.root, root)
    return root


def _rewrite_transcripts(root: Path, change) -> pd.DataFrame:
    """Read the copy's transcripts with pandas, change them, write them back (as pandas writes)."""
    path = root / "xenium" / "transcripts.parquet"
    table = change(pd.read_parquet(path))
    table.to_parquet(path)
    return table


def _non_finite_locations(table: pd.DataFrame) -> pd.DataFrame:
    table.loc[: N_NAN_X - 1, "x_location"] = np.nan
    table.loc[N_NAN_X : N_NAN_X + N_INF_Y - 1, "y_location"] = np.inf
    return table


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _morphomol(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_morphomol.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=600)


def _tiles_args(root: Path, out: Path) -> list:
    return ["tiles", root / "xenium", "--he", root / "he_image.ome.tif",
            "--alignment", root / "he_imagealignment.csv", "--out", out]


def _our_warnings(stderr: str) -> list[str]:
    """The CLI's one-line warnings (a progress line may still be open before one)."""
    return re.findall(r"warning: [^\n]*", stderr)


def _assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_non_finite_locations_are_counted_apart_and_warned_by_tiles(synthetic_sample, tmp_path):
    root = _copy_sample(synthetic_sample, tmp_path)
    table = _rewrite_transcripts(root, _non_finite_locations)
    before = _checksums(root)
    out = tmp_path / "tiles.zarr"
    result = _morphomol(*_tiles_args(root, out))
    assert result.returncode == 0, result.stderr
    assert _checksums(root) == before
    ours = _our_warnings(result.stderr)
    assert len(ours) == 1, result.stderr
    assert f"{N_NAN_X + N_INF_Y} transcripts" in ours[0] and "NaN or infinite" in ours[0]
    report_line = next(line for line in result.stdout.splitlines() if line.startswith("transcripts: "))
    report = json.loads(report_line.removeprefix("transcripts: "))
    assert report["non_finite_xy"] == N_NAN_X + N_INF_Y
    assert report["outside_image"] == 0  # the synthetic H&E covers every finite transcript
    assert report["total"] == len(table)


def test_non_finite_locations_in_the_summary_and_the_density_index(synthetic_sample, tmp_path):
    root = _copy_sample(synthetic_sample, tmp_path)
    _rewrite_transcripts(root, _non_finite_locations)
    sdata = load_sample(root / "xenium")
    with pytest.warns(XeniumDataWarning, match=f"{N_NAN_X + N_INF_Y} transcripts have NaN or infinite"):
        summary = summarize_sample(sdata)
    assert summary["transcripts"]["non_finite_xy"] == N_NAN_X + N_INF_Y
    height_px, width_px = sdata.images[MORPHOLOGY]["scale0"]["image"].shape[1:]
    extent_um = (width_px * 0.2125, height_px * 0.2125)
    with pytest.warns(XeniumDataWarning, match="NaN or infinite"):
        density = build_transcript_density(sdata.points[TRANSCRIPTS], extent_um=extent_um)
    assert density.n_non_finite == N_NAN_X + N_INF_Y
    counted = density.n_binned + density.n_outside + density.n_low_qv + density.n_non_finite + density.n_unnamed
    assert counted == summary["transcripts"]["count"]
    original_points = load_sample(synthetic_sample.xenium_dir).points[TRANSCRIPTS]
    original = build_transcript_density(original_points, extent_um=extent_um)
    assert density.n_outside <= original.n_outside  # the damaged rows are not called outside


def test_qv_of_strings_is_refused_at_load(synthetic_sample, tmp_path):
    root = _copy_sample(synthetic_sample, tmp_path)
    _rewrite_transcripts(root, lambda t: t.assign(qv=t["qv"].astype(str)))
    before = _checksums(root)
    error = _assert_one_line_error(_morphomol("info", root), "'qv'", "string", "not a Xenium transcripts table")
    assert "pd.to_numeric" in error
    assert _checksums(root) == before


@pytest.mark.parametrize("column, change, kind", [
    ("x_location", lambda t: t.assign(x_location=t["x_location"].astype(str)), "string"),
    ("z_location", lambda t: t.assign(z_location=t["z_location"].astype(str)), "string"),
    ("feature_name", lambda t: t.assign(feature_name=t["codeword_index"]), "int32"),
    ("feature_name", lambda t: t.assign(feature_name=None), "null"),
])
def test_columns_of_the_wrong_type_are_refused_at_load(synthetic_sample, tmp_path, column, change, kind):
    root = _copy_sample(synthetic_sample, tmp_path)
    _rewrite_transcripts(root, change)
    with pytest.raises(InputError, match=rf"'{column}' is {kind}.*not a Xenium transcripts table"):
        load_sample(root / "xenium")


def test_binary_gene_names_of_older_runs_are_read_as_names(synthetic_sample, tmp_path):
    root = _copy_sample(synthetic_sample, tmp_path)
    path = root / "xenium" / "transcripts.parquet"
    table = pq.read_table(path)
    index = table.schema.get_field_index("feature_name")
    pq.write_table(table.set_column(index, "feature_name", table["feature_name"].cast(pa.binary())), path)
    names = load_sample(root / "xenium").points[TRANSCRIPTS]["feature_name"].compute()
    expected = table["feature_name"].to_pylist()
    assert names.isna().sum() == 0
    assert sorted(names.astype(str).tolist()) == sorted(expected)


def _known_version_sample(synthetic_sample, tmp_path, version: str) -> Path:
    root = _copy_sample(synthetic_sample, tmp_path)
    spec_file = root / "xenium" / "experiment.xenium"
    specs = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**specs, "analysis_sw_version": version}))
    return root


def test_unknown_major_version_warns_and_is_recorded(synthetic_sample, tmp_path):
    root = _known_version_sample(synthetic_sample, tmp_path, "xenium-9.0.0")
    before = _checksums(root)
    result = _morphomol("info", root)
    assert result.returncode == 0, result.stderr
    assert _checksums(root) == before
    ours = _our_warnings(result.stderr)
    assert len(ours) == 1, result.stderr
    assert "xenium-9.0.0" in ours[0] and "may be wrong" in ours[0] and "report" in ours[0]
    with pytest.warns(XeniumDataWarning, match="xenium-9.0.0"):
        info = sample_info(load_sample(root / "xenium"))
    assert len(info.warnings) == 1 and "xenium-9.0.0" in info.warnings[0]


def test_known_versions_do_not_warn_and_old_attrs_still_load(synthetic_sample, tmp_path):
    root = _known_version_sample(synthetic_sample, tmp_path, "xenium-1.9.0.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", XeniumDataWarning)
        sdata = load_sample(root / "xenium")
    assert sample_info(sdata).warnings == []
    old = {k: v for k, v in sdata.attrs[SAMPLE_ATTRS_KEY].items() if k != "warnings"}  # attrs written before the field
    sdata.attrs[SAMPLE_ATTRS_KEY] = old
    assert sample_info(sdata).warnings == []


def _empty_like_pandas(table: pd.DataFrame) -> pd.DataFrame:
    """The 0-row table a script writes: numeric columns typed, strings as plain (empty) objects."""
    return pd.DataFrame({c: pd.Series(dtype=object if table[c].dtype == object else table[c].dtype)
                         for c in table.columns})


def _write_empty_without_row_groups(root: Path) -> None:
    path = root / "xenium" / "transcripts.parquet"
    schema = pa.Table.from_pandas(_empty_like_pandas(pd.read_parquet(path)), preserve_index=False).schema
    pq.ParquetWriter(path, schema).close()


@pytest.mark.parametrize("row_groups", [1, 0])
def test_empty_transcripts_are_summarised_by_info_and_refused_by_tiles(synthetic_sample, tmp_path, row_groups):
    root = _copy_sample(synthetic_sample, tmp_path)
    if row_groups:
        _rewrite_transcripts(root, _empty_like_pandas)
    else:
        _write_empty_without_row_groups(root)
    assert pq.ParquetFile(root / "xenium" / "transcripts.parquet").metadata.num_row_groups == row_groups
    before = _checksums(root)
    info = _morphomol("info", root)
    assert info.returncode == 0, info.stderr
    assert "Traceback" not in info.stderr
    summary = json.loads(info.stdout)
    assert summary["transcripts"]["count"] == 0 and summary["transcripts"]["features"] == 0
    out = tmp_path / "tiles.zarr"
    _assert_one_line_error(_morphomol(*_tiles_args(root, out)), "holds no transcripts")
    assert not out.exists()
    assert _checksums(root) == before


def test_non_finite_locations_under_a_per_region_registration_are_counted_not_fatal():
    from napari_morphomol.registration.transforms import PerRegionAffine, SoftVoronoiWeights
    from napari_morphomol.tiling import GenePanel, TileGeometry, bin_transcripts

    xenium_pixel_size_um, he_pixel_size_um = 0.2125, 0.2737
    base = np.diag([he_pixel_size_um / xenium_pixel_size_um, he_pixel_size_um / xenium_pixel_size_um, 1.0])
    shifted = base.copy()
    shifted[:2, 2] = (3.0, -2.0)
    weights = SoftVoronoiWeights([[500.0, 1000.0], [1500.0, 1000.0]], 300.0)
    transform = PerRegionAffine(np.stack([base, shifted]), weights, best_affine=base)
    geometry = TileGeometry(he_pixel_size_um=he_pixel_size_um, he_height_px=2000, he_width_px=2000)
    rng = np.random.default_rng(0)
    um = transform.apply_xy(rng.uniform(100, 1900, size=(5000, 2))) * xenium_pixel_size_um
    table = pd.DataFrame({"feature_name": pd.Categorical(rng.choice(["A", "B"], len(um))), "x_location": um[:, 0],
                          "y_location": um[:, 1], "qv": np.full(len(um), 30.0, np.float32)})
    damaged = table.copy()
    damaged.loc[:9, "x_location"] = np.nan
    damaged.loc[10:14, "y_location"] = -np.inf
    panel = GenePanel(core=("A", "B"))
    with pytest.warns(XeniumDataWarning, match="15 transcripts have NaN or infinite"):
        bins = bin_transcripts(damaged, geometry, panel, transform, xenium_pixel_size_um=xenium_pixel_size_um)
    finite = bin_transcripts(table.iloc[15:], geometry, panel, transform, xenium_pixel_size_um=xenium_pixel_size_um)
    assert bins.counts.non_finite_xy == 15 and bins.counts.total == len(table)
    np.testing.assert_array_equal(bins.core_totals, finite.core_totals)
