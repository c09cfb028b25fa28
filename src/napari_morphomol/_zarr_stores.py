"""Opening the zarr stores our commands write: the format check and its error, in one place."""

from __future__ import annotations

from pathlib import Path

import zarr

from napari_morphomol.errors import InputError


def open_versioned_group(path: str | Path, attrs_key: str, format_version: int, what: str,
                         remedy: str) -> tuple[zarr.Group, dict]:
    """The group at ``path`` and its ``attrs_key`` attributes, refused with an :class:`InputError`
    (``what`` it should have been, then ``remedy``) when it is not one or has another format."""
    path = Path(path)
    try:
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs[attrs_key])
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise InputError(f"{path} is not a {what} ({exc}); {remedy}") from exc
    if attrs.get("format_version") != format_version:
        raise InputError(f"{path} is a {what} of format {attrs.get('format_version')}, and this version reads "
                         f"format {format_version}; {remedy}")
    return root, attrs
