"""npe2 reader: a Xenium folder, a sample folder (``xenium/`` + H&E), or our SpatialData ``.zarr`` (a sample
saved by us, or an export, whose sample it opens from the files the export names)."""

from __future__ import annotations

from pathlib import Path

from napari_morphomol.elements import SAMPLE_ATTRS_KEY
from napari_morphomol.io.sample import find_sample_parts, open_sample
from napari_morphomol.layers.sample import sample_layers


def _is_our_zarr(path: Path) -> bool:
    if path.suffix != ".zarr" or not path.is_dir():
        return False
    return SAMPLE_ATTRS_KEY in (path / "zarr.json").read_text(errors="ignore")


def get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    try:
        recognised = find_sample_parts(path) is not None or (
            (path / "zarr.json").is_file() and _is_our_zarr(path)
        )
    except (OSError, ValueError):
        return None
    return read_sample if recognised else None


def read_sample(path):
    """The sample's H&E and DAPI (the Load sample dock, open or opened later, adopts the sample and
    builds its transcript density in the background: a reader runs on the event loop); a
    SpatialData export of ours shows its sample at full resolution (``export.open_export``
    attaches the sample's files a default export names)."""
    path = Path(path[0] if isinstance(path, list) else path)
    if path.is_dir() and (path / "zarr.json").is_file():
        from napari_morphomol.export.writers import SPATIALDATA_EXPORT

        if SPATIALDATA_EXPORT.is_ours(path):
            from napari_morphomol.export import open_export

            return sample_layers(open_export(path), with_density=False)
    return sample_layers(open_sample(path), with_density=False)
