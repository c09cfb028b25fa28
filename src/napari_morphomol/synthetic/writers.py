"""Streaming writers for the files of a synthetic sample: pyramidal OME-TIFF, 10x HDF5.

Both take their data piece by piece, so memory stays at one strip (OME-TIFF) or one block
(HDF5) whatever the slide size. :func:`write_repeated_ome_tiff` writes an image made of one cell
repeated (the scale sample's): each distinct tile is encoded once and its bytes written wherever
it repeats, so the time goes into writing bytes, not encoding them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import tifffile

from napari_morphomol.errors import InputError

TILE_PX = 512
_MIN_LEVEL_PX = 1024
LOSSLESS = ("zlib", 1)
"""Fluorescence: deflate at its fastest level."""
JPEG = ("jpeg", 90)
"""Brightfield H&E, as slide scanners store it."""
JPEG2000_LOSSLESS = ("jpeg2000", 0)
"""Fluorescence as Xenium ships it: lossless JPEG 2000 (slow to encode, about 0.7 x deflate's size)."""
_ENCODE_THREADS = 2


def _ome_xml(
    name: str, width: int, height: int, samples: int, dtype: np.dtype, pixel_size_um: float, channel: str
) -> str:
    """Minimal OME-XML (ASCII; the micrometre unit spelled &#181;m as Xenium does)."""
    pixel_type = {np.dtype("uint8"): "uint8", np.dtype("uint16"): "uint16"}[np.dtype(dtype)]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" Creator="napari-morphomol synthetic">'
        f'<Image ID="Image:0" Name="{name}">'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="{pixel_type}" SizeX="{width}" SizeY="{height}" '
        f'SizeC="{samples}" SizeZ="1" SizeT="1" Interleaved="{"true" if samples > 1 else "false"}" '
        f'PhysicalSizeX="{pixel_size_um}" PhysicalSizeXUnit="&#181;m" '
        f'PhysicalSizeY="{pixel_size_um}" PhysicalSizeYUnit="&#181;m">'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="{samples}" Name="{channel}"/>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        "</Pixels></Image></OME>"
    )


def _halve(strip: np.ndarray) -> np.ndarray:
    """2 x 2 mean, edge rows/columns repeated when odd."""
    if strip.shape[0] % 2:
        strip = np.concatenate([strip, strip[-1:]], axis=0)
    if strip.shape[1] % 2:
        strip = np.concatenate([strip, strip[:, -1:]], axis=1)
    s = strip.astype(np.float32)
    mean = (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]) * 0.25
    return np.rint(mean).astype(strip.dtype)


def write_pyramidal_ome_tiff(
    path: Path,
    render_strip: Callable[[int, int], np.ndarray],
    height: int,
    width: int,
    samples: int,
    dtype: np.dtype,
    pixel_size_um: float,
    channel: str,
    scratch_dir: Path,
    compression: tuple[str, int] = LOSSLESS,
) -> list[tuple[int, int]]:
    """Tiled pyramidal OME-TIFF (levels halve down to about 1024 px, in SubIFDs).

    ``render_strip(row0, n_rows)`` returns full-width rows of level 0, called in order.
    Lower levels are downsampled on the fly into raw scratch files and read back strip by strip.
    Returns the (height, width) of each level.
    """
    pyramid = _Pyramid(_pyramid_levels(height, width), samples, np.dtype(dtype), scratch_dir, path.name)
    options = _tiff_options(samples, dtype, pixel_size_um, compression)
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            tif.write(
                pyramid.tiles(0, render_strip),
                shape=pyramid.shape(0),
                subifds=len(pyramid.levels) - 1,
                description=_ome_xml(path.name, width, height, samples, dtype, pixel_size_um, channel),
                **options,
            )
            for level in range(1, len(pyramid.levels)):
                tif.write(pyramid.tiles(level, render_strip), shape=pyramid.shape(level), subfiletype=1, **options)
    finally:
        for raw in pyramid.raw:
            raw.unlink(missing_ok=True)
    return pyramid.levels


def _tiff_options(samples: int, dtype: np.dtype, pixel_size_um: float, compression: tuple[str, int]) -> dict:
    """tifffile's arguments for every level of a pyramid."""
    return {
        "dtype": dtype,
        "tile": (TILE_PX, TILE_PX),
        "photometric": "rgb" if samples == 3 else "minisblack",
        "compression": compression[0],
        "compressionargs": {"level": compression[1]},
        "resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um),
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }


def write_repeated_ome_tiff(
    path: Path,
    cell: np.ndarray,
    repeats: tuple[int, int],
    pixel_size_um: float,
    channel: str,
    compression: tuple[str, int] = LOSSLESS,
) -> list[tuple[int, int]]:
    """Tiled pyramidal OME-TIFF of ``cell`` repeated ``repeats`` = (rows, columns) times, as ``np.tile``.

    The file is the one :func:`write_pyramidal_ome_tiff` writes for the whole repeated image (level
    k holds ``cell`` halved k times, repeated), but a tile is encoded once per distinct content (its
    place in the cell and how much of it the image's edge cuts) and its bytes are written wherever
    it repeats: ``cell`` sides that are multiples of 512 px give one encoding per tile of the cell.
    Memory: the cell, its halvings and one level's distinct encoded tiles.

    Parameters
    ----------
    path
        The file to write.
    cell
        (height, width) or (height, width, 3) uint8/uint16; each side a multiple of
        :func:`repeat_step_px` (2 ** (levels - 1)), so that every level repeats a whole halved
        cell (else an InputError).
    repeats
        How many cells down and across.
    pixel_size_um
        Pixel size of level 0.
    channel
        The OME channel name.
    compression
        (codec, level): ``LOSSLESS``, ``JPEG`` or ``JPEG2000_LOSSLESS``.

    Returns
    -------
    list of (int, int)
        The (height, width) of each level.
    """
    samples = cell.shape[2] if cell.ndim == 3 else 1
    height, width = cell.shape[0] * repeats[0], cell.shape[1] * repeats[1]
    levels = _pyramid_levels(height, width)
    step = repeat_step_px(cell.shape[:2], repeats)
    if cell.shape[0] % step or cell.shape[1] % step:
        raise InputError(f"a {cell.shape[0]} x {cell.shape[1]} px cell repeated {repeats[0]} x {repeats[1]} times "
                         f"makes {len(levels)} pyramid levels, and each repeats a whole halved cell only if the "
                         f"cell's sides are multiples of {step} px: give fewer repeats or such a cell")
    encode = _tile_encoder(compression, samples)
    options = _tiff_options(samples, cell.dtype, pixel_size_um, compression)
    extra = ((samples,) if samples > 1 else ())
    with ThreadPoolExecutor(max_workers=_ENCODE_THREADS) as pool, tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, shape in enumerate(levels):
            cell = _halve(cell) if level else np.ascontiguousarray(cell)
            where = ({"subifds": len(levels) - 1,
                      "description": _ome_xml(path.name, width, height, samples, cell.dtype, pixel_size_um, channel)}
                     if level == 0 else {"subfiletype": 1})
            tif.write(_repeated_tiles(cell, shape, encode, pool), shape=shape + extra, **options, **where)
    return levels


def _tile_encoder(compression: tuple[str, int], samples: int) -> Callable[[np.ndarray], bytes]:
    """The bytes tifffile writes for one tile with ``compression``: its own codec and arguments."""
    name, level = compression
    tag = 8 if name == "zlib" else tifffile.enumarg(tifffile.COMPRESSION, name).value  # tifffile's alias
    kwargs = {"level": level}
    if tag == 7 and samples == 3:  # tifffile stores RGB JPEG tiles as YCbCr, subsampled 2 x 2
        kwargs |= {"subsampling": (2, 2), "colorspace": "RGB", "outcolorspace": "YCBCR"}
    compressor = tifffile.TIFF.COMPRESSORS[tag]
    return lambda tile: compressor(tile, **kwargs)


def _repeated_tiles(cell: np.ndarray, shape: tuple[int, int], encode: Callable[[np.ndarray], bytes],
                    pool: ThreadPoolExecutor) -> Iterator[bytes]:
    """Encoded tiles, row-major, of ``cell`` repeated over ``shape`` (edge tiles zero-padded)."""
    height, width = shape
    cell_h, cell_w = cell.shape[:2]
    keys = [(row0 % cell_h, col0 % cell_w, min(TILE_PX, height - row0), min(TILE_PX, width - col0))
            for row0 in range(0, height, TILE_PX) for col0 in range(0, width, TILE_PX)]

    def tile(key: tuple[int, int, int, int]) -> bytes:
        row0, col0, n_rows, n_cols = key
        out = np.zeros((TILE_PX, TILE_PX) + cell.shape[2:], cell.dtype)
        out[:n_rows, :n_cols] = cell[np.ix_((row0 + np.arange(n_rows)) % cell_h, (col0 + np.arange(n_cols)) % cell_w)]
        return encode(out)

    distinct = list(dict.fromkeys(keys))
    encoded = dict(zip(distinct, pool.map(tile, distinct)))
    return (encoded[key] for key in keys)


def repeat_step_px(cell_shape_px: tuple[int, int], repeats: tuple[int, int]) -> int:
    """What each side of a cell repeated by :func:`write_repeated_ome_tiff` must be a multiple of.

    Parameters
    ----------
    cell_shape_px
        The cell's (height, width).
    repeats
        How many cells down and across.

    Returns
    -------
    int
        ``2 ** (levels - 1)`` for the levels of the repeated image's pyramid, so that every level
        repeats a whole halved cell.
    """
    levels = _pyramid_levels(cell_shape_px[0] * repeats[0], cell_shape_px[1] * repeats[1])
    return 2 ** (len(levels) - 1)


def _pyramid_levels(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of each level: halved (rounding up) until at most _MIN_LEVEL_PX."""
    levels = [(height, width)]
    while max(levels[-1]) > _MIN_LEVEL_PX:
        h, w = levels[-1]
        levels.append(((h + 1) // 2, (w + 1) // 2))
    return levels


class _Pyramid:
    """The levels of one pyramid and the raw scratch file of each level below the first."""

    def __init__(self, levels: list[tuple[int, int]], samples: int, dtype: np.dtype, scratch_dir: Path, name: str):
        self.levels = levels
        self.raw = [scratch_dir / f"{name}.level{k}.raw" for k in range(len(levels))]
        self._samples = samples
        self._dtype = dtype
        self._item = dtype.itemsize * samples

    def shape(self, level: int) -> tuple[int, ...]:
        return self.levels[level] + ((self._samples,) if self._samples > 1 else ())

    def _read(self, level: int, row0: int, n_rows: int) -> np.ndarray:
        w = self.levels[level][1]
        count = n_rows * w * self._samples
        data = np.fromfile(self.raw[level], dtype=self._dtype, count=count, offset=row0 * w * self._item)
        return data.reshape((n_rows, w, self._samples) if self._samples > 1 else (n_rows, w))

    def tiles(self, level: int, render_strip: Callable[[int, int], np.ndarray]) -> Iterator[np.ndarray]:
        """Tiles of ``level`` in row-major order (edge tiles zero-padded); its halved strips go
        to the next level's scratch file as they pass."""
        h, w = self.levels[level]
        n_tile_cols = -(-w // TILE_PX)
        sink = open(self.raw[level + 1], "wb") if level + 1 < len(self.levels) else None
        try:
            for row0 in range(0, h, TILE_PX):
                n_rows = min(TILE_PX, h - row0)
                strip = render_strip(row0, n_rows) if level == 0 else self._read(level, row0, n_rows)
                if sink is not None:
                    sink.write(np.ascontiguousarray(_halve(strip)).tobytes())
                    sink.flush()
                pad = [(0, TILE_PX - n_rows), (0, n_tile_cols * TILE_PX - w)] + ([(0, 0)] if self._samples > 1 else [])
                padded = np.pad(strip, pad, mode="constant")
                for c in range(n_tile_cols):
                    yield padded[:, c * TILE_PX : (c + 1) * TILE_PX]
        finally:
            if sink is not None:
                sink.close()


class TenXMatrixWriter:
    """10x Genomics v3 feature-barcode HDF5, appended cell by cell in barcode order."""

    def __init__(self, path: Path, feature_names: list[str], feature_types: list[str], n_cells: int):
        self._file = h5py.File(path, "w")
        self._file.attrs["filetype"] = "matrix"
        self._file.attrs["version"] = 2
        self._file.attrs["software_version"] = "napari-morphomol synthetic"
        g = self._file.create_group("matrix")
        self._group = g
        self._data = g.create_dataset(
            "data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,), compression="gzip",
            compression_opts=1,
        )
        self._indices = g.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,), compression="gzip",
            compression_opts=1,
        )
        self._indptr = [np.zeros(1, dtype=np.int64)]
        self._nnz = 0
        self._n_cells = n_cells
        self._n_features = len(feature_names)
        f = g.create_group("features")
        f.create_dataset("id", data=np.array(feature_names, dtype="S"))
        f.create_dataset("name", data=np.array(feature_names, dtype="S"))
        f.create_dataset("feature_type", data=np.array(feature_types, dtype="S"))
        f.create_dataset("genome", data=np.array(["Unknown"] * len(feature_names), dtype="S"))
        f.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))

    def append(self, counts: np.ndarray) -> None:
        """Counts of the next cells, (cells, features)."""
        rows, cols = np.nonzero(counts)
        values = counts[rows, cols].astype(np.int32)
        n = len(values)
        self._data.resize((self._nnz + n,))
        self._indices.resize((self._nnz + n,))
        self._data[self._nnz :] = values
        self._indices[self._nnz :] = cols.astype(np.int32)
        per_cell = np.bincount(rows, minlength=counts.shape[0])
        self._indptr.append(self._nnz + np.cumsum(per_cell))
        self._nnz += n

    def close(self, barcodes: np.ndarray) -> None:
        indptr = np.concatenate(self._indptr)
        if len(indptr) != self._n_cells + 1 or len(barcodes) != self._n_cells:
            raise RuntimeError(f"matrix has {len(indptr) - 1} cells written, {self._n_cells} expected")
        self._group.create_dataset("indptr", data=indptr)
        self._group.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
        self._group.create_dataset("shape", data=np.array([self._n_features, self._n_cells], dtype=np.int32))
        self._file.close()


def write_in_background(items: Iterable[tuple], write: Callable[..., object], close: Callable[[], object]) -> None:
    """``write(*item)`` for each item, in order, in one background thread while the next item is made
    (at most two waiting), then ``close()``, also after an error (the first error is raised).

    Parameters
    ----------
    items
        The argument tuples, made lazily (a generator) in the calling thread.
    write
        Writes one item (encoding overlaps with making the next).
    close
        Finishes the files.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: list = []
        try:
            for item in items:
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(pool.submit(write, *item))
            for future in pending:
                future.result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            close()
