"""A Xenium run and an H&E image as one lazy SpatialData sample.

spatialdata-io reads the cells (table, boundaries, labels) when asked for; transcripts are laid
out as spatialdata-io does but read lazily without its whole-table passes; the morphology and
H&E images are read from their own TIFF pyramids so that no level is computed from full
resolution. Nothing is ever written into the bundle.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask.base import tokenize
from spatialdata import SpatialData, read_zarr
from spatialdata.models import Image2DModel, PointsModel
from spatialdata.models.pyramids_utils import dask_arrays_to_datatree
from spatialdata.transformations import Affine, Identity, Scale, set_transformation

from napari_morphomol.coords import GLOBAL, HE_PX
from napari_morphomol.elements import (
    CELL_TABLE,
    HE_IMAGE,
    MORPHOLOGY,
    SAMPLE_ATTRS_KEY,
    TRANSCRIPTS,
    SampleInfo,
    sample_info,
)
from napari_morphomol.errors import InputError
from napari_morphomol.io.features import XeniumDataWarning, warn_non_finite_xy
from napari_morphomol.io.he_image import read_pyramid, rgb_levels_cyx
from napari_morphomol.registration.formats import read_alignment_csv

_VERSION_RE = re.compile(r"^xenium-(\d+)\.(\d+)\.(\d+)(\.\d+)*")
KNOWN_XENIUM_MAJOR_VERSIONS = range(1, 5)
"""Xenium Onboard Analysis / Xenium Ranger 1.x to 4.x: the layouts spatialdata-io 0.7 reads
(< 1.3, 1.3 to 2.0, >= 2.0) and this package was checked against."""
_REQUIRED_TRANSCRIPT_COLUMNS = ("feature_name", "x_location", "y_location", "z_location", "cell_id")


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


_TRANSCRIPT_COLUMN_TYPES = {  # column: (accepts the arrow type, what it should be); qv only when present
    "x_location": (_is_number, "numbers, um"),
    "y_location": (_is_number, "numbers, um"),
    "z_location": (_is_number, "numbers, um"),
    "qv": (_is_number, "numbers, Phred quality"),
    "feature_name": (_is_text, "gene names, strings"),
    "cell_id": (lambda t: _is_text(t) or pa.types.is_integer(t), "cell ids, strings or integers"),
}
_ROWS_PER_PARTITION = 2_000_000
_MORPHOLOGY_CHANNELS_4 = ["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"]


def read_experiment(xenium_dir: str | Path) -> dict:
    """Validate a Xenium output folder and return its ``experiment.xenium`` specs."""
    path = Path(xenium_dir)
    if not path.is_dir():
        raise InputError(f"Xenium folder not found: {path}")
    spec_file = path / "experiment.xenium"
    if not spec_file.is_file():
        nested = sorted(p.parent for p in path.glob("*/experiment.xenium"))
        hint = f" Did you mean {nested[0]}?" if nested else ""
        raise InputError(
            f"{path} is not a Xenium output folder: it has no experiment.xenium. "
            f"Point to the folder the instrument wrote (it holds experiment.xenium and transcripts.parquet).{hint}"
        )
    try:
        specs = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{spec_file} is not valid JSON ({exc}); the bundle may be damaged.") from exc
    version = str(specs.get("analysis_sw_version", ""))
    if not _VERSION_RE.match(version):
        raise InputError(
            f"{spec_file}: analysis_sw_version {version!r} is not of the form 'xenium-X.Y.Z'; "
            "spatialdata-io would then read the bundle with the pre-2.0 layout and fail. "
            "Fix the field (e.g. \"xenium-3.0.0.15\") in a copy of the bundle."
        )
    pixel_size = specs.get("pixel_size")
    if not isinstance(pixel_size, (int, float)) or not 0.01 < pixel_size < 10:
        raise InputError(f"{spec_file}: pixel_size {pixel_size!r} is missing or not a size in um.")
    return specs


def _version_warnings(specs: dict, spec_file: Path) -> list[str]:
    """One line per software version in ``specs`` whose major version this package has not seen."""
    versions = [("analysis_sw_version", specs.get("analysis_sw_version"))]
    ranger = specs.get("xenium_ranger")
    if isinstance(ranger, dict) and ranger.get("version"):  # resegmented: spatialdata-io reads by this one
        versions.append(("xenium_ranger version", ranger["version"]))
    found = []
    for name, version in versions:
        match = _VERSION_RE.match(str(version))
        major = int(match.group(1)) if match else None
        if major is not None and major not in KNOWN_XENIUM_MAJOR_VERSIONS:
            side = "newer" if major > KNOWN_XENIUM_MAJOR_VERSIONS[-1] else "older"
            found.append(
                f"{spec_file}: {name} {version!r} is {side} than the Xenium versions this package knows "
                f"(xenium-{KNOWN_XENIUM_MAJOR_VERSIONS[0]}.x to {KNOWN_XENIUM_MAJOR_VERSIONS[-1]}.x); the bundle "
                "is read as the nearest known layout, so results may be wrong. Please report it (with the version) "
                "to the napari-morphomol issue tracker."
            )
    return found


def _feature_codes(table: pa.Table, dtype: pd.CategoricalDtype) -> np.ndarray:
    """The ``feature_name`` column as codes of ``dtype``'s categories, straight from the file's
    dictionary pages (no per-row gene strings): each chunk's dictionary is mapped onto the
    categories by one lookup table; binary names (older runs) are decoded, as spatialdata-io does."""
    code_type = np.int16 if len(dtype.categories) < np.iinfo(np.int16).max else np.int32
    codes = [np.zeros(0, code_type)]
    for chunk in table.column("feature_name").chunks:
        if not pa.types.is_dictionary(chunk.type):  # no rows: pandas wrote the column as nulls
            chunk = chunk.dictionary_encode()
        names = [c.decode() if isinstance(c, bytes) else c for c in chunk.dictionary.to_pylist()]
        lookup = np.append(dtype.categories.get_indexer(names), -1).astype(code_type)
        indices = chunk.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)
        codes.append(lookup[indices])
    return np.concatenate(codes)


def _read_transcript_row_groups(
    row_groups: list[int], file: Path, categories: list[str], columns: list[str] | None = None
) -> pd.DataFrame:
    """One partition: row groups with ``feature_name`` as categories (:func:`_feature_codes`);
    dask passes the projected ``columns``."""
    parquet = pq.ParquetFile(file, read_dictionary=["feature_name"])
    table = parquet.read_row_groups(row_groups, columns=columns)
    if "feature_name" not in table.column_names:
        return table.to_pandas()
    dtype = pd.CategoricalDtype(categories)
    df = table.drop_columns(["feature_name"]).to_pandas()
    df.insert(table.column_names.index("feature_name"), "feature_name",
              pd.Categorical.from_codes(_feature_codes(table, dtype), dtype=dtype))
    return df


@dataclass(frozen=True)
class TranscriptsFile:
    """Where the rows of a transcripts element :func:`load_sample` made come from: its parquet
    file, the row groups of each partition and the gene categories. A pass over every
    transcript (the density index) reads them straight from the file, without dask's frames."""

    path: Path
    partitions: tuple[tuple[int, ...], ...]
    categories: tuple[str, ...]

    def read_columns(self, partition: int) -> dict[str, np.ndarray]:
        """x and y (um, as stored), qv (when the file has it) and gene codes of one partition.

        Parameters
        ----------
        partition
            The partition's number in the element (an index into ``partitions``).

        Returns
        -------
        dict of str to numpy.ndarray
            ``x``, ``y``, ``codes`` (into ``categories``; -1 where the name is missing) and, when
            the file has it, ``qv``.
        """
        parquet = pq.ParquetFile(self.path, read_dictionary=["feature_name"])
        columns = ["x_location", "y_location", "feature_name"] + (["qv"] if "qv" in parquet.schema_arrow.names else [])
        table = parquet.read_row_groups(list(self.partitions[partition]), columns=columns)
        arrays = {"x": table.column("x_location").to_numpy(), "y": table.column("y_location").to_numpy(),
                  "codes": _feature_codes(table, pd.CategoricalDtype(list(self.categories)))}
        if "qv" in columns:
            arrays["qv"] = table.column("qv").to_numpy()
        return arrays


_TRANSCRIPTS_FILES: dict[str, TranscriptsFile] = {}
"""The dask token of each transcripts element :func:`load_sample` made -> its file (a few hundred
bytes a sample); an element derived from it (a query, a filter) has another token."""


def transcripts_file(points: dd.DataFrame) -> TranscriptsFile | None:
    """The file a transcripts element was read from, if :func:`load_sample` made it as it is.

    Parameters
    ----------
    points
        A transcripts element (dask points).

    Returns
    -------
    TranscriptsFile or None
        Its parquet file and partitions; None for an element :func:`load_sample` did not make as
        it is (a query or filter of one, or one read by another reader).
    """
    return _TRANSCRIPTS_FILES.get(tokenize(points))


def _feature_names(file: Path) -> list[str]:
    """The gene names of a transcripts table from its dictionaries, one row group at a time (the
    column of 300 M codes would take 1.2 GB), sorted."""
    parquet = pq.ParquetFile(file, read_dictionary=["feature_name"])
    names: set = set()
    for i in range(parquet.metadata.num_row_groups):
        column = parquet.read_row_group(i, columns=["feature_name"]).column(0)
        for chunk in column.chunks:
            names.update(chunk.dictionary.to_pylist() if pa.types.is_dictionary(chunk.type) else
                         pc.unique(chunk).to_pylist())
    names.discard(None)
    return sorted(c.decode() if isinstance(c, bytes) else c for c in names)


def _read_transcripts(xenium_dir: Path, xenium_pixel_size_um: float) -> dd.DataFrame:
    """Transcripts as lazy dask points (x, y, z in um; Scale to ``global``), laid out exactly as
    spatialdata-io lays them out, but without its passes over the whole table: the gene names
    come from the parquet dictionaries, so the first frame does not wait for a scan of 100 M rows."""
    file = _check_transcripts(xenium_dir)
    metadata = pq.ParquetFile(file).metadata
    categories = _feature_names(file) if metadata.num_rows else []
    batches, batch, rows = [], [], 0
    for i in range(metadata.num_row_groups):
        batch.append(i)
        rows += metadata.row_group(i).num_rows
        if rows >= _ROWS_PER_PARTITION:
            batches.append(batch)
            batch, rows = [], 0
    if batch or not batches:
        batches.append(batch)
    meta = _read_transcript_row_groups(batches[0][:1], file, categories).iloc[:0]
    table = dd.from_map(
        _read_transcript_row_groups, batches, file=file, categories=categories, meta=meta, enforce_metadata=False
    )
    scale = Scale([1.0 / xenium_pixel_size_um] * 2, axes=("x", "y"))
    points = PointsModel.parse(
        table,
        coordinates={"x": "x_location", "y": "y_location", "z": "z_location"},
        feature_key="feature_name",
        instance_key="cell_id",
        transformations={GLOBAL: scale},
        sort=True,
    )
    _TRANSCRIPTS_FILES[tokenize(points)] = TranscriptsFile(
        file, tuple(tuple(batch) for batch in batches), tuple(categories))
    return points


def _check_transcripts(xenium_dir: Path) -> Path:
    """transcripts.parquet of the bundle, refused unless its footer reads and its columns have
    Xenium's types (a table of no rows may hold nulls only: pandas writes empty strings so)."""
    file = xenium_dir / "transcripts.parquet"
    if not file.is_file():
        raise InputError(
            f"{xenium_dir} has no transcripts.parquet. Older runs (XOA < 1.3) only have transcripts.csv.gz: "
            "re-export with Xenium Ranger, or convert the CSV to parquet."
        )
    try:
        schema = pq.read_schema(file)
        n_rows = pq.ParquetFile(file).metadata.num_rows  # reads the footer: catches truncation
    except Exception as exc:
        raise InputError(f"{file} is unreadable, truncated or not parquet ({exc}).") from exc
    missing = [c for c in _REQUIRED_TRANSCRIPT_COLUMNS if c not in schema.names]
    if missing:
        raise InputError(f"{file} lacks the columns {missing}; is it a Xenium transcripts table?")
    wrong = []
    for name, (accepts, expected) in _TRANSCRIPT_COLUMN_TYPES.items():
        kind = schema.field(name).type if name in schema.names else None
        kind = kind.value_type if kind is not None and pa.types.is_dictionary(kind) else kind
        if kind is not None and not (accepts(kind) or (pa.types.is_null(kind) and n_rows == 0)):
            wrong.append((name, kind, expected))
    if wrong:
        described = "; ".join(f"column {name!r} is {kind} (should be {expected})" for name, kind, expected in wrong)
        numeric = [name for name, _, expected in wrong if expected.startswith("numbers")]
        fix = (f"or convert it in a copy (pandas: df[{numeric[0]!r}] = pd.to_numeric(df[{numeric[0]!r}])) "
               "and load the copy") if numeric else "written by the instrument or Xenium Ranger"
        raise InputError(
            f"{file}: {described}, so this is not a Xenium transcripts table as the instrument writes it. "
            f"Use the bundle's own transcripts.parquet, {fix}."
        )
    return file


def _multiscale_element(levels, transformations: dict, channels: list[str]):
    tree = dask_arrays_to_datatree(levels, dims=("c", "y", "x"), channels=channels)
    set_transformation(tree, transformations, set_all=True)
    Image2DModel().validate(tree)
    return tree


def open_he_image(
    he_path: str | Path, *, he_pixel_size_um: float | None = None, he_to_global: np.ndarray | None = None
):
    """The H&E pyramid as a multiscale image element (``he_px``, and ``global`` when aligned)."""
    pyramid = read_pyramid(he_path)
    pixel_size = he_pixel_size_um if he_pixel_size_um is not None else pyramid.pixel_size_um
    if pixel_size is None:
        raise InputError(
            f"{he_path} does not record its pixel size. Pass it: --he-pixel-size-um "
            "(he_pixel_size_um=...), e.g. 0.2737 for a 40x scan; it is in the scanner's metadata."
        )
    if not 0.05 < pixel_size < 50:
        raise InputError(f"H&E pixel size {pixel_size} um is implausible; give it in micrometres per pixel.")
    transformations = {HE_PX: Identity()}
    if he_to_global is not None:
        transformations[GLOBAL] = Affine(he_to_global, input_axes=("x", "y"), output_axes=("x", "y"))
    element = _multiscale_element(rgb_levels_cyx(pyramid), transformations, ["r", "g", "b"])
    return element, float(pixel_size)


def _open_morphology(xenium_dir: Path):
    focus = xenium_dir / "morphology_focus"
    files = sorted(focus.glob("*.ome.tif")) if focus.is_dir() else []
    files = [f for f in files if not f.name.startswith("._")]
    if not files:
        legacy = xenium_dir / "morphology_focus.ome.tif"
        if not legacy.is_file():
            raise InputError(f"{xenium_dir} has no morphology_focus image (morphology_focus/*.ome.tif).")
        files = [legacy]
    pyramid = read_pyramid(files[0])
    levels = []
    for level in pyramid.levels:
        if level.ndim == 2:
            level = level[None]
        if level.ndim != 3:
            raise InputError(f"{files[0]}: unexpected morphology image shape {level.shape}.")
        levels.append(level)
    n = levels[0].shape[0]
    channels = _MORPHOLOGY_CHANNELS_4[:n] if n <= 4 else [f"channel_{i}" for i in range(n)]
    return _multiscale_element(levels, {GLOBAL: Identity()}, channels)


def load_sample(
    xenium_dir: str | Path | None = None,
    he_path: str | Path | None = None,
    alignment_csv: str | Path | None = None,
    *,
    he_pixel_size_um: float | None = None,
    cells: bool = False,
    cell_labels: bool = False,
) -> SpatialData:
    """One lazy SpatialData sample from a Xenium bundle and/or an H&E image.

    Elements: ``morphology_focus`` (multiscale, ``global``), ``transcripts`` (dask points, um
    columns, Scale to ``global``), ``he_image`` (multiscale RGB in ``he_px``, and in ``global``
    when an alignment is given), and with ``cells`` the cell table and boundaries. Nothing is
    written into the bundle.

    Parameters
    ----------
    xenium_dir
        A Xenium output bundle (the folder holding ``experiment.xenium``).
    he_path
        An H&E pyramid (OME-TIFF, SVS or a tiled TIFF).
    alignment_csv
        H&E px -> Xenium ``global`` px, as Xenium's ``he_imagealignment.csv`` (needs both inputs).
    he_pixel_size_um
        The H&E pixel size when the file does not say it (or says it wrongly).
    cells
        Also read the cell table and the cell and nucleus boundaries.
    cell_labels
        Also read the cell label mask.

    Returns
    -------
    spatialdata.SpatialData
        Lazy elements ``HE_IMAGE``, ``MORPHOLOGY`` and ``TRANSCRIPTS`` (those the inputs give);
        :func:`sample_info` describes it.

    Raises
    ------
    InputError
        Missing or unreadable inputs, an alignment without both images, or a bundle that is not
        Xenium's, each saying what to give.
    """
    if xenium_dir is None and he_path is None:
        raise InputError("give a Xenium folder, an H&E image, or both.")
    if alignment_csv is not None and (xenium_dir is None or he_path is None):
        raise InputError("an alignment maps H&E onto a Xenium run: give both the Xenium folder and the H&E image.")
    he_to_global = read_alignment_csv(alignment_csv) if alignment_csv is not None else None
    specs: dict = {}
    notes: list[str] = []
    if xenium_dir is not None:
        xenium_dir = Path(xenium_dir)
        specs = read_experiment(xenium_dir)
        notes = _version_warnings(specs, xenium_dir / "experiment.xenium")
        for note in notes:
            warnings.warn(note, XeniumDataWarning, stacklevel=2)
        sdata = _read_cells(xenium_dir, cell_labels=cell_labels) if cells or cell_labels else SpatialData()
        sdata.points[TRANSCRIPTS] = _read_transcripts(xenium_dir, float(specs["pixel_size"]))
        sdata.images[MORPHOLOGY] = _open_morphology(xenium_dir)
    else:
        sdata = SpatialData()
    he_size = None
    if he_path is not None:
        sdata.images[HE_IMAGE], he_size = open_he_image(
            he_path, he_pixel_size_um=he_pixel_size_um, he_to_global=he_to_global
        )
    info = SampleInfo(
        xenium_dir=str(xenium_dir) if xenium_dir is not None else None,
        he_path=str(he_path) if he_path is not None else None,
        alignment_csv=str(alignment_csv) if alignment_csv is not None else None,
        xenium_pixel_size_um=float(specs["pixel_size"]) if specs else None,
        he_pixel_size_um=he_size,
        analysis_sw_version=specs.get("analysis_sw_version"),
        he_to_global=he_to_global.tolist() if he_to_global is not None else None,
        warnings=notes,
    )
    if he_to_global is not None:
        _warn_if_scale_disagrees(info)
    sdata.attrs[SAMPLE_ATTRS_KEY] = asdict(info)
    return sdata


def _warn_if_scale_disagrees(info: SampleInfo) -> None:
    """An alignment whose scale contradicts the two pixel sizes is usually the inverse matrix."""
    matrix = np.asarray(info.he_to_global)
    scale = np.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    expected = info.he_pixel_size_um / info.xenium_pixel_size_um
    if not 0.8 < scale / expected < 1.25:
        warnings.warn(
            f"the alignment scales H&E px by {scale:.3f} but the pixel sizes imply {expected:.3f} "
            f"({info.he_pixel_size_um} / {info.xenium_pixel_size_um} um/px). If it is about "
            f"{1 / expected:.3f}, the matrix is inverted (global -> H&E): invert it before loading.",
            UserWarning,
            stacklevel=3,
        )


def _read_cells(xenium_dir: Path, *, cell_labels: bool) -> SpatialData:
    """Cell table and boundaries (and label images) by spatialdata-io's Xenium reader."""
    from spatialdata_io import xenium

    try:
        return xenium(
            xenium_dir,
            cells_boundaries=True,
            nucleus_boundaries=True,
            cells_as_circles=False,
            cells_labels=cell_labels,
            nucleus_labels=cell_labels,
            transcripts=False,
            morphology_mip=False,
            morphology_focus=False,
            aligned_images=False,
            cells_table=True,
        )
    except (OSError, ValueError, KeyError, AssertionError) as exc:
        raise InputError(f"spatialdata-io could not read {xenium_dir}: {type(exc).__name__}: {exc}") from exc


def open_sample(path: str | Path, **kwargs) -> SpatialData:
    """Open what a user points at: a sample or Xenium folder, a SpatialData ``.zarr``, or an H&E image."""
    path = Path(path)
    parts = find_sample_parts(path)
    if parts is not None:
        return load_sample(parts.xenium_dir, parts.he_path, parts.alignment_csv, **kwargs)
    if path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
        try:
            return read_zarr(path)
        except Exception as exc:
            raise InputError(f"{path} is a zarr store but not a readable SpatialData object ({exc}).") from exc
    if path.is_file():
        return load_sample(he_path=path, **kwargs)
    return load_sample(xenium_dir=path, **kwargs)  # raises the Xenium folder error with a hint


@dataclass(frozen=True)
class SampleParts:
    """The files of one sample found in a folder."""

    xenium_dir: Path | None
    he_path: Path | None
    alignment_csv: Path | None


def _single(paths: list[Path], what: str, folder: Path) -> Path | None:
    if len(paths) > 1:
        raise InputError(
            f"{folder} holds several {what} ({', '.join(p.name for p in paths)}); open the files explicitly."
        )
    return paths[0] if paths else None


def find_sample_parts(folder: str | Path) -> SampleParts | None:
    """Recognise a sample folder: a Xenium bundle (with 10x's aligned ``*he_image.ome.tif`` and
    ``*he_imagealignment.csv`` beside it, if present), or a folder holding ``xenium/`` plus those
    H&E files (the layout ``morphomol synth`` writes). None when the folder is neither."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "experiment.xenium").is_file():
        xenium_dir = folder
    elif (folder / "xenium" / "experiment.xenium").is_file():
        xenium_dir = folder / "xenium"
    else:
        return None
    he = _single(sorted(folder.glob("*he_image.ome.tif")), "H&E images", folder)
    alignment = _single(sorted(folder.glob("*he_imagealignment.csv")), "alignment files", folder)
    return SampleParts(xenium_dir=xenium_dir, he_path=he, alignment_csv=alignment if he else None)


def summarize_sample(sdata: SpatialData) -> dict:
    """Plain facts about a sample for people and logs: sizes in px and um, counts, genes; the
    transcripts with NaN or infinite x/y are counted (``non_finite_xy``) and warned about."""
    info = sample_info(sdata)
    summary: dict = {"xenium_dir": info.xenium_dir, "he_path": info.he_path, "alignment_csv": info.alignment_csv}
    if MORPHOLOGY in sdata.images:
        channels, height, width = sdata.images[MORPHOLOGY]["scale0"]["image"].shape
        px = info.xenium_pixel_size_um
        summary["morphology"] = {
            "channels": channels, "width_px": width, "height_px": height, "pixel_size_um": px,
            "width_um": round(width * px, 1), "height_um": round(height * px, 1),
            "levels": len(sdata.images[MORPHOLOGY].children),
        }
    if HE_IMAGE in sdata.images:
        _, height, width = sdata.images[HE_IMAGE]["scale0"]["image"].shape
        summary["he"] = {
            "width_px": width, "height_px": height, "pixel_size_um": info.he_pixel_size_um,
            "levels": len(sdata.images[HE_IMAGE].children), "aligned": info.he_to_global is not None,
        }
    if TRANSCRIPTS in sdata.points:
        points = sdata.points[TRANSCRIPTS]
        names = points["feature_name"].dtype.categories
        finite = np.isfinite(points["x"]) & np.isfinite(points["y"])
        count, n_finite = dask.compute(points.shape[0], finite.sum())  # one read, as for the count alone
        non_finite = int(count - n_finite)
        warn_non_finite_xy(non_finite)
        summary["transcripts"] = {
            "count": int(count),
            "non_finite_xy": non_finite,
            "partitions": points.npartitions,
            "features": len(names),
        }
    if "table" in sdata.tables:
        summary["cells"] = int(sdata.tables[CELL_TABLE].n_obs)
    return summary
