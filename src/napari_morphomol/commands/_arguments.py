"""Argument types that refuse out-of-range numbers when the command line is parsed.

Each factory returns an ``argparse`` type: a value outside its range is refused by argparse with
a one-line message that says what to give (exit code 2, before any work), e.g.
``--workers: 0: give a whole number of 1 or more``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """An integer from ``minimum`` to ``maximum`` (inclusive; no upper bound when None)."""
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of {minimum} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number {bounds}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text}: give a whole number {bounds}")
        return value

    return parse


def real_number(minimum: float, maximum: float | None = None, *, open_minimum: bool = False,
                unit: str = "") -> Callable[[str], float]:
    """A finite float in ``[minimum, maximum]`` (``(minimum, ...`` with ``open_minimum``)."""
    low = f"above {minimum:g}" if open_minimum else f"{minimum:g} or more"
    bounds = f"{low} and at most {maximum:g}" if maximum is not None else low
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number {bounds}{suffix}") from None
        too_low = value <= minimum if open_minimum else value < minimum
        if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text}: give a number {bounds}{suffix}")
        return value

    return parse


fraction = real_number(0.0, 1.0)
"""A share from 0 to 1."""
