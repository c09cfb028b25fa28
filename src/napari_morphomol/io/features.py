"""Xenium transcripts: which features are genes and which are controls (XENIUM_FORMAT.md), and
the warning for data that is read but looks damaged or unfamiliar."""

from __future__ import annotations

import re
import warnings

_CONTROL_PREFIXES = re.compile(
    r"^(NegControlProbe_|NegControlCodeword_|UnassignedCodeword_|DeprecatedCodeword_|BLANK_|Intergenic_Region_)"
)


class XeniumDataWarning(UserWarning):
    """A Xenium bundle that is read, but whose results may be wrong or incomplete."""


def is_control_feature(name: str) -> bool:
    """Xenium control probes and codewords (never genes; dropped from every count)."""
    return bool(_CONTROL_PREFIXES.match(str(name)))


def warn_non_finite_xy(count: int) -> None:
    """Say, once per pass over the transcripts, how many have no usable position.

    Parameters
    ----------
    count
        Transcripts whose ``x_location`` or ``y_location`` is NaN, infinite or missing; no
        warning when 0.
    """
    if count:
        warnings.warn(
            f"{count:,} transcripts have NaN or infinite x/y locations; they are left out of tiles, "
            "density maps and predictions (counted as non_finite_xy, not as outside). "
            "transcripts.parquet may be damaged: re-export it from the instrument or Xenium Ranger.",
            XeniumDataWarning,
            stacklevel=3,
        )
