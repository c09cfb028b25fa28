"""Which device and number format a run uses, decided the same way on the caller and on workers."""

from __future__ import annotations

import torch

from napari_morphomol.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


class DeviceFallbackWarning(UserWarning):
    """``device="auto"`` found no accelerator and runs on the CPU."""


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """The torch device for ``auto``/``cpu``/``cuda[:N]``/``mps``, and a note when ``auto`` fell back.

    An explicitly requested device that is not there is an InputError (never a silent fallback).
    """
    name = str(requested).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        if torch.backends.mps.is_available():
            return torch.device("mps"), None
        return torch.device("cpu"), "no CUDA or MPS device is available; running on the CPU"
    if name == "cpu":
        return torch.device("cpu"), None
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device {requested!r} was requested but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). "
                "Choose device auto (the GPU if there is one, else the CPU) or cpu, "
                "or check the driver / CUDA_VISIBLE_DEVICES."
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {requested!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return device, None
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device 'mps' was requested but this machine has no Apple GPU; choose device auto or cpu")
        return torch.device("mps"), None
    raise InputError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return dtype


def auto_dtype(device: torch.device | str) -> tuple[str, str]:
    """What ``dtype="auto"`` runs on a device, and why: fixed per device kind, never timed, so two
    runs of a sample on the same kind of device give the same predictions.

    Parameters
    ----------
    device
        The device the chunks run on (``cuda:0``, ``cpu``, ``mps``).

    Returns
    -------
    tuple of str
        ``("bfloat16", reason)`` on CUDA, ``("float32", reason)`` elsewhere.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16", "auto on CUDA: bf16 autocast (the model's matrix products in bf16)"
    return "float32", (f"auto on {kind.upper()}: fp32 (bf16 autocast is chosen on CUDA only: on a {kind.upper()} it "
                       "is not faster everywhere, and the choice is fixed per device kind so that runs repeat)")


def autocast(device: torch.device, dtype: str):
    """bf16 autocast when ``dtype == 'bfloat16'``, else a no-op context (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError MPS and older CUDA builds raise."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
