"""What docks share: a status line that wraps, reading a path field, and reporting a failure
(the user's to fix as a message, a bug with its traceback)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import FileEdit, Label
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QSizePolicy

from napari_morphomol.errors import InputError


def status_label(value: str = "") -> Label:
    """A dock's status line: it wraps, so a long message grows the dock down, never the window wide."""
    label = Label(value=value)
    label.native.setWordWrap(True)
    # a wrapping QLabel still asks for a width that grows with its text; Ignored takes the dock's
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label


def report_error(exc: BaseException, set_status: Callable[[str], None]) -> None:
    """Show ``exc`` in the dock's status line and as a napari error message. An InputError says
    what to do and ends there; anything else is a bug and is re-raised, so that napari shows its
    traceback.

    Workers get this through ``create_worker(..., _connect={"errored": ...})``: a handler connected
    only afterwards lets superqt also re-raise every error, InputErrors included.
    """
    set_status(f"error: {exc}")
    show_error(str(exc))
    if not isinstance(exc, InputError):
        raise exc


def chosen_path(edit: FileEdit) -> Path | None:
    """The path in a file field, or None while it is empty."""
    value = edit.value
    return Path(value) if value is not None and str(value) not in ("", ".") else None
