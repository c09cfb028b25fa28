"""H&E whole-slide images as lazy multiscale SpatialData elements, read from their own pyramid."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr

from napari_morphomol.errors import InputError

_UM_PER_UNIT = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "pm": 1e-6,
}
_TIFF_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # inch, centimetre
_CHUNK_PX = 2048


@dataclass(frozen=True)
class PyramidImage:
    """Lazy pyramid levels of one image, full resolution first, each (y, x[, c]) as stored."""

    levels: list[da.Array]
    pixel_size_um: float | None
    path: Path


def _ome_pixel_size_um(ome_xml: str) -> float | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            factor = _UM_PER_UNIT.get(unit)
            if factor is None:
                return None
            return float(el.attrib["PhysicalSizeX"]) * factor
    return None


def _tiff_tags_pixel_size_um(page: tifffile.TiffPage) -> float | None:
    """Pixel size from an Aperio description (MPP = ...) or from the resolution tags."""
    desc = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if match:
        return float(match.group(1))
    unit_tag = page.tags.get("ResolutionUnit")
    res_tag = page.tags.get("XResolution")
    if unit_tag is None or res_tag is None:
        return None
    unit_um = _TIFF_RESOLUTION_UNIT_UM.get(int(unit_tag.value))
    num, den = res_tag.value
    if unit_um is None or num == 0:
        return None
    return unit_um * den / num


def read_pyramid(path: str | Path) -> PyramidImage:
    """Open a (pyramidal) TIFF / OME-TIFF lazily: dask levels backed by the file's own tiles."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        pixel_size_um = _ome_pixel_size_um(tif.ome_metadata) if tif.is_ome else None
        if pixel_size_um is None:
            pixel_size_um = _tiff_tags_pixel_size_um(series.pages[0])
        store = series.aszarr()
        group = zarr.open(store, mode="r")
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
        raise InputError(
            f"cannot read {path} as a TIFF image ({exc}). Use a (pyramidal) OME-TIFF, SVS or TIFF; "
            "convert other formats first, e.g. `vips tiffsave in.ext out.ome.tif --tile --pyramid`."
        ) from exc
    arrays = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(series.levels))]
    levels = [
        da.from_zarr(arr, chunks=tuple(s if s <= 4 else min(_CHUNK_PX, s) for s in arr.shape))
        for arr in arrays
    ]
    return PyramidImage(levels=levels, pixel_size_um=pixel_size_um, path=path)


def _check_readable(level: da.Array, path: Path) -> None:
    """Decode the first and last chunks so truncated files fail at load, not later in the viewer.

    Local threads: the open file handle cannot travel to a dask.distributed worker."""
    corner = tuple(slice(0, min(64, s)) for s in level.shape)
    try:
        level[corner].compute(scheduler="threads")
        last = tuple(slice(max(0, s - 64), s) for s in level.shape)
        level[last].compute(scheduler="threads")
    except Exception as exc:  # tifffile raises many types on truncated data
        raise InputError(f"{path} is truncated or corrupt: decoding its pixels failed ({exc}).") from exc


def rgb_levels_cyx(image: PyramidImage) -> list[da.Array]:
    """The pyramid as (c, y, x) uint8 RGB levels; anything else is refused with what to do."""
    out = []
    for level in image.levels:
        arr = level
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[..., :3].transpose(2, 0, 1)
        elif arr.ndim == 3 and arr.shape[0] in (3, 4):
            arr = arr[:3]
        else:
            raise InputError(
                f"{image.path} is not an RGB H&E image: its pixels have shape {tuple(level.shape)} "
                "(expected height x width x 3). Open fluorescence images as Xenium morphology instead."
            )
        if arr.dtype != np.uint8:
            raise InputError(
                f"{image.path} has {arr.dtype} pixels; an H&E image must be 8-bit RGB. "
                "Convert it to 8-bit first."
            )
        out.append(arr)
    _check_readable(out[0], image.path)
    return out

