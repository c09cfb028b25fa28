"""Which device and number format a run uses, decided the same way on the caller and on workers."""

from __future__ import annotations

import torch

from napari_morphomol.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
#: On the CPU, bf16 autocast is used only when it is at least this much faster than fp32 on the
#: run's own reference batch (it is not on every CPU: without AMX/AVX512-BF16 it can be slower).
CPU_BF16_MIN_SPEEDUP = 1.1


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
                "Use --device auto (GPU if present, else CPU) or --device cpu, "
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
            raise InputError("device 'mps' was requested but this machine has no Apple GPU; use --device auto or cpu")
        return torch.device("mps"), None
    raise InputError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return dtype


def autocast(device: torch.device, dtype: str):
    """bf16 autocast when ``dtype == 'bfloat16'``, else a no-op context (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError MPS and older CUDA builds raise."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
