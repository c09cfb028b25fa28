"""Outputs that never cost the user data: one guard, then a temporary path and a rename.

Every writer of the project goes through :func:`guard_output` (directly, or through
:func:`atomic_output`), which holds the promise of ``--overwrite``:

- an output is never an input of the command, never contains one and never lies inside one
  (bundle, H&E, alignment, landmarks, checkpoint, data);
- an output never goes inside a Xenium bundle (a folder holding ``experiment.xenium``, or any
  folder below one), nor into a sample folder under a name its reader looks for there;
- an existing path is replaced only with ``overwrite`` and only when it is an output of the same
  kind that this project wrote: a store carrying our format marker, or a file in the exact format
  our writer produces (:class:`OutputKind`). A folder or file of anything else is never removed.

The write itself is atomic: a reader never sees a half-written target, and a failed write (full
disk, read-only folder, killed process) leaves any earlier target as it was. Operating-system
failures become an :class:`InputError` that names the path and says what to do.

Reading a store back goes through :func:`open_versioned_group`: a store of ours carries its format
marker and version in its root attributes, and anything else (another store, an older format) is
refused with one error that says what to do.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zarr

from napari_morphomol.errors import InputError


def cache_dir() -> Path:
    """The project's own folder for what it makes for the user and may remake (the demo sample, the
    transcript index's scratch): ``MORPHOMOL_CACHE``, else ~/.cache/napari-morphomol (on disk,
    where the system's temporary folder is often held in memory)."""
    return Path(os.environ.get("MORPHOMOL_CACHE", Path.home() / ".cache" / "napari-morphomol"))

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_REMOVE_ATTEMPTS = 100
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR}
XENIUM_BUNDLE_MARKER = "experiment.xenium"
# names the sample-folder reader (io.sample.find_sample_parts) looks for beside a Xenium bundle
_SAMPLE_FOLDER_NAMES = ("xenium", "*he_image.ome.tif", "*he_imagealignment.csv", "panel.json")
_RECOGNISE_BYTES = 1 << 20  # a text output of ours is recognised from at most its first MiB


@dataclass(frozen=True)
class OutputKind:
    """One kind of output this project writes, and how to tell one of ours from anything else.

    ``what`` names it for messages ("tiles store"); ``is_ours(path)`` says whether an existing
    ``path`` is an output of this kind that napari-morphomol wrote, and so may be replaced.
    """

    what: str
    is_ours: Callable[[Path], bool]


def zarr_store_kind(what: str, attrs_key: str) -> OutputKind:
    """A zarr store whose root attributes carry our format marker ``attrs_key``."""

    def is_ours(path: Path) -> bool:
        return path.is_dir() and attrs_key in _zarr_root_attrs(path)

    return OutputKind(what, is_ours)


def small_file_kind(what: str, reads_back: Callable[[Path], object]) -> OutputKind:
    """A file of at most a MiB that ``reads_back`` (a reader of our format) reads without an error.

    For formats with no room for a marker of our own (Xenium's alignment CSV, landmark CSVs):
    a file that reads back as the very format is one ``--overwrite`` may replace; an image, a
    bundle file or a folder never does.
    """

    def is_ours(path: Path) -> bool:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _RECOGNISE_BYTES:
            return False
        try:
            reads_back(path)
        except (InputError, OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
            return False
        return True

    return OutputKind(what, is_ours)


def text_file_kind(what: str, recognise: Callable[[str], bool]) -> OutputKind:
    """A small text file whose content ``recognise`` accepts as what our writer writes."""

    def reads_back(path: Path) -> None:
        if not recognise(path.read_text()):
            raise ValueError(f"{path} is not a {what}")

    return small_file_kind(what, reads_back)


def json_file_kind(what: str, marker_key: str, marker_value: object = None) -> OutputKind:
    """A small JSON object whose top level carries our marker ``marker_key`` (equal to
    ``marker_value`` when one is given)."""

    def recognise(text: str) -> bool:
        document = json.loads(text)
        return isinstance(document, dict) and marker_key in document and (
            marker_value is None or document[marker_key] == marker_value)

    return text_file_kind(what, recognise)


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


def _zarr_root_attrs(path: Path) -> dict:
    for name in ("zarr.json", ".zattrs"):
        try:
            document = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict):
            return document.get("attributes", document) if name == "zarr.json" else document
    return {}


def enclosing_xenium_bundle(path: str | Path) -> Path | None:
    """The Xenium bundle ``path`` is or lies inside (a folder holding ``experiment.xenium``), or None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / XENIUM_BUNDLE_MARKER).is_file():
            return folder
    return None


def guard_output(path: str | Path, kind: OutputKind, *, inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False, inputs_of: str = "the command") -> Path:
    """Refuse an output path that could cost the user data; returns ``path`` when it is safe.

    Parameters
    ----------
    path
        Where the output will be written (a file or a store folder).
    kind
        What the output is; an existing ``path`` is replaced only when ``kind.is_ours(path)``.
    inputs
        Every input path of the command (None entries are skipped): the output may not be one,
        contain one or lie inside one.
    overwrite
        Whether an existing output of ours may be replaced.
    inputs_of
        Whose inputs they are, for the message ("the command", "the run").

    Returns
    -------
    Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    InputError
        Naming the path, the rule it breaks and what to do instead.
    """
    path = Path(path)
    refuse_among_inputs(path, inputs, inputs_of=inputs_of)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise InputError(f"{path} already exists; choose another name, or allow overwriting (--overwrite) "
                             f"to replace a {kind.what} that napari-morphomol wrote")
        if not kind.is_ours(path):
            raise InputError(f"{path} exists and is not a {kind.what} written by napari-morphomol, so it is not "
                             "replaced even with --overwrite; move it away or choose another name")
    if not path.parent.exists():
        raise InputError(f"folder {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} is a file, not a folder; choose a folder to write {path.name} into")
    _check_writable(path.parent, path)
    return path


def guard_output_folder(folder: str | Path, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a folder that outputs are to be written into (made when missing, kept when there,
    never removed) if it is or lies inside a Xenium bundle, or is or lies inside one of ``inputs``
    (it may hold inputs: every file written into it is guarded by :func:`guard_output`)."""
    folder = Path(folder)
    refuse_among_inputs(folder, inputs, may_hold_inputs=True)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder; give a folder to write the outputs into")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    first_new = existing / folder.relative_to(existing).parts[0] if existing != folder else folder / "(new files)"
    _check_writable(existing, first_new)
    return folder


def _check_writable(folder: Path, path: Path) -> None:
    """Refuse a folder that cannot be written, before any work (a probe file, made and removed)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".morphomol-probe-"):
            pass
    except OSError as exc:
        raise InputError(os_error_message(path, exc)) from exc


def refuse_among_inputs(path: Path, inputs: Iterable[str | Path | None], *, may_hold_inputs: bool = False,
                        inputs_of: str = "the command") -> None:
    """Refuse ``path`` if it is or lies inside a Xenium bundle, is a sample file's name in a sample
    folder, or is, holds (unless ``may_hold_inputs``) or lies inside one of ``inputs``."""
    target = path.resolve()
    bundle = enclosing_xenium_bundle(target)
    if bundle is not None:
        where = "is the Xenium bundle" if bundle == target else f"lies inside the Xenium bundle {bundle}"
        raise InputError(f"{path} {where}; napari-morphomol never writes into a Xenium bundle: "
                         "choose a path outside it")
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if source == target:
            relation = "is"
        elif source.is_relative_to(target) and not may_hold_inputs:
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise InputError(f"{path} {relation} the input {given}; outputs never replace, hold or go inside an "
                         f"input of {inputs_of}: choose a path outside your inputs")
    folder = target.parent
    if (folder / "xenium" / XENIUM_BUNDLE_MARKER).is_file() and any(
            fnmatch.fnmatch(path.name, pattern) for pattern in _SAMPLE_FOLDER_NAMES):
        raise InputError(f"{path} would be read as part of the sample in {folder} (a file of that name is one of "
                         "the sample's own); choose another name or folder")


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


def os_fault_message(exc: OSError) -> str:
    """An operating-system failure anywhere (read or write) in one sentence that says what to do."""
    if exc.filename is not None and exc.errno in _FULL:
        return os_error_message(Path(exc.filename), exc)
    where = f" ({exc.filename})" if exc.filename is not None else ""
    return (f"{exc.strerror or exc}{where}; check that the path exists and can be read and written, "
            "and that the disk has space")


@contextmanager
def atomic_output(path: str | Path, kind: OutputKind, *, inputs: Iterable[str | Path | None] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    ``path`` is checked by :func:`guard_output` first. The temporary path does not exist yet when
    yielded: the writer creates it (a file, or a folder for zarr stores) with the usual
    permissions. A folder target being replaced is first renamed aside, so the swap is two
    renames and the old copy is deleted only once the new one is in place.
    """
    path = guard_output(path, kind, inputs=inputs, overwrite=overwrite)
    try:
        with replaced_atomically(path) as tmp:
            yield tmp
    except OSError as exc:
        raise InputError(os_error_message(path, exc)) from exc


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (not created yet); on success it takes ``path``'s
    place (:func:`replace_path`), on any error it is deleted. No guard: callers check ``path``
    first (:func:`atomic_output` does both)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def replace_path(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing folder there is renamed aside first and deleted only
    once the new one is in place (two renames, never a moment without a complete copy)."""
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _remove(tmp: Path) -> None:
    """Delete a failed temporary output. A folder is retried for a while: writer threads (dask,
    zarr's event loop) still finishing their chunks after the first error may add files to it.
    Never raises: the error that made the write fail is the one to report."""
    if not tmp.is_dir():
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return
    for _ in range(_REMOVE_ATTEMPTS):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.1)


def write_text_atomic(path: str | Path, text: str, kind: OutputKind, *, inputs: Iterable[str | Path | None] = (),
                      overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (guarded as ``kind``)."""
    path = Path(path)
    with atomic_output(path, kind, inputs=inputs, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    return path
