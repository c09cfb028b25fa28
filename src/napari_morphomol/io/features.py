"""Xenium feature names: which are genes and which are controls (XENIUM_FORMAT.md)."""

from __future__ import annotations

import re

_CONTROL_PREFIXES = re.compile(
    r"^(NegControlProbe_|NegControlCodeword_|UnassignedCodeword_|DeprecatedCodeword_|BLANK_|Intergenic_Region_)"
)


def is_control_feature(name: str) -> bool:
    """Xenium control probes and codewords (never genes; dropped from every count)."""
    return bool(_CONTROL_PREFIXES.match(str(name)))
