"""What a sample holds: the names of its SpatialData elements and its provenance record, one
place for every package (it imports only ``errors``, so ``io``, ``registration`` and ``tiling``
all read it without importing each other).

A sample opened by :func:`napari_morphomol.io.load_sample` holds at most these elements; code
that reads a sample names them through these constants, never as bare strings. The keys follow
spatialdata-io's Xenium reader, so a sample written by either is read by both. What the sample
was made of (:class:`SampleInfo`) is kept in ``sdata.attrs[SAMPLE_ATTRS_KEY]``; an image element's
levels are read, finest first, by :func:`element_levels_cyx` (one reader for every package).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from napari_morphomol.errors import InputError

HE_IMAGE = "he_image"
"""The registered H&E pyramid (RGB), in ``he_px`` and, once aligned, in ``global``."""
MORPHOLOGY = "morphology_focus"
"""Xenium's DAPI (morphology focus) pyramid, in ``global``."""
TRANSCRIPTS = "transcripts"
"""Xenium's transcripts as dask points (um columns), scaled to ``global``."""
CELL_TABLE = "table"
"""The cell table (AnnData: one row per segmented cell)."""
SAMPLE_ATTRS_KEY = "morphomol"
"""Where a sample keeps its :class:`SampleInfo` (``sdata.attrs``; also the mark of a saved sample)."""
SAMPLE_PATH_KEYS = ("xenium_dir", "he_path", "alignment_csv")
"""The :class:`SampleInfo` fields (and keys of its record) naming the files and folders the sample was read from."""


@dataclass(frozen=True)
class SampleInfo:
    """What a sample was made of; kept in ``sdata.attrs['morphomol']`` (plain JSON types)."""

    xenium_dir: str | None
    he_path: str | None
    alignment_csv: str | None
    xenium_pixel_size_um: float | None
    he_pixel_size_um: float | None
    analysis_sw_version: str | None
    he_to_global: list[list[float]] | None
    warnings: list[str] = field(default_factory=list)
    """What loading warned about (unfamiliar software versions), for the metadata of runs on it;
    absent from the attrs of samples opened before it existed."""

    @property
    def input_paths(self) -> tuple[str, ...]:
        """The files and folders the sample was read from: no output may touch them."""
        return tuple(p for p in (getattr(self, key) for key in SAMPLE_PATH_KEYS) if p is not None)


def sample_info(sdata) -> SampleInfo:
    """The provenance and pixel sizes of a sample opened by :func:`napari_morphomol.io.open_sample`."""
    attrs = sdata.attrs.get(SAMPLE_ATTRS_KEY)
    if attrs is None:
        raise InputError("this SpatialData object was not opened by napari-morphomol (no attrs['morphomol']).")
    return SampleInfo(**attrs)


def element_levels_cyx(element) -> list:
    """The (c, y, x) dask levels of a SpatialData image element, finest first (multiscale or not)."""
    if getattr(element, "children", None):
        names = sorted(element.children, key=lambda name: int(name.removeprefix("scale")))
        return [element[name]["image"].data for name in names]
    return [element.data]


def levels_yxc(levels_cyx: list) -> list:
    """(c, y, x) levels as (y, x, c): how napari shows RGB and how tiles are cut."""
    return [level.transpose(1, 2, 0) for level in levels_cyx]
