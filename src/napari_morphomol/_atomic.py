"""Atomic outputs: write into a temporary file or folder beside the target, then rename.

A reader never sees a half-written target, an existing target is replaced only when the caller
says so, and a failed write (full disk, read-only folder, killed process) leaves any earlier
target as it was. Operating-system failures become an :class:`InputError` that names the path
and says what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from napari_morphomol.errors import InputError

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_REMOVE_ATTEMPTS = 100
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR}


def check_target(path: str | Path, *, overwrite: bool) -> Path:
    """Refuse a target that exists (unless ``overwrite``) or whose folder is missing."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another name or allow overwriting")
    if not path.parent.exists():
        raise InputError(f"folder {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} is a file, not a folder; choose a folder to write {path.name} into")
    return path


def os_error_message(path: Path, exc: OSError) -> str:
    """What went wrong writing ``path`` and what to do, in one sentence."""
    code = exc.errno
    text = str(exc)
    kept = f" ({path} was left as it was)" if path.exists() else ""
    if code in _FULL or "No space left" in text or "File too large" in text:
        return f"could not write {path}: the disk is full or the file exceeds the allowed size ({exc}); " \
               f"free some space or choose another folder{kept}"
    if code in _NOT_WRITABLE or "Permission denied" in text or "Read-only" in text:
        return f"could not write {path}: the folder {path.parent} cannot be written ({exc}); " \
               f"choose a folder you can write to{kept}"
    return f"could not write {path} ({exc}){kept}"


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The temporary path does not exist yet when yielded: the writer creates it (a file, or a
    folder for zarr stores) with the usual permissions. A folder target being replaced is first
    renamed aside, so the swap is two renames and the old copy is deleted only once the new one
    is in place.
    """
    path = check_target(path, overwrite=overwrite)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise InputError(os_error_message(path, exc)) from exc
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _remove(tmp: Path) -> None:
    """Delete a failed temporary output. A folder is retried for a while: writer threads (dask,
    zarr's event loop) still finishing their chunks after the first error may add files to it."""
    if not tmp.is_dir():
        tmp.unlink(missing_ok=True)
        return
    for _ in range(_REMOVE_ATTEMPTS):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.1)


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    return path
