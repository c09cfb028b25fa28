"""Landmark pairs: the same tissue feature seen in the H&E image and in Xenium ``global`` px."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_morphomol.errors import InputError


def _points_xy(points: object, what: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{what} must be an (N, 2) array of (x, y) points, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} contains NaN or infinite coordinates; remove or fix those landmarks")
    return arr


@dataclass(frozen=True, eq=False)
class LandmarkPairs:
    """N landmark pairs in (x, y): ``he_px`` in H&E px, ``global_px`` in Xenium morphology px.

    ``active`` lets a user switch a pair off (as BigWarp does) without losing it: fits use only
    active pairs, but every pair keeps its residual so a switched-off pair can be judged.
    """

    he_px: np.ndarray
    global_px: np.ndarray
    names: tuple[str, ...]
    active: np.ndarray

    def __post_init__(self) -> None:
        he = _points_xy(self.he_px, "H&E landmark points")
        glob = _points_xy(self.global_px, "Xenium (global) landmark points")
        if len(he) != len(glob):
            raise InputError(
                f"{len(he)} H&E points but {len(glob)} Xenium points: every landmark needs both"
            )
        names = tuple(str(n) for n in self.names)
        if len(names) != len(he):
            raise InputError(f"{len(names)} landmark names for {len(he)} landmark pairs")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise InputError(f"landmark names must be unique; repeated: {', '.join(dupes)}")
        active = np.asarray(self.active, dtype=bool).reshape(-1)
        if len(active) != len(he):
            raise InputError(f"active mask has {len(active)} entries for {len(he)} landmark pairs")
        he.flags.writeable = False
        glob.flags.writeable = False
        active.flags.writeable = False
        object.__setattr__(self, "he_px", he)
        object.__setattr__(self, "global_px", glob)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "active", active)

    @classmethod
    def from_arrays(
        cls,
        he_px: object,
        global_px: object,
        names: object = None,
        active: object = None,
    ) -> LandmarkPairs:
        """Pairs from two point arrays; names default to BigWarp's ``Pt-0, Pt-1, ...``."""
        n = len(np.asarray(he_px).reshape(-1, 2)) if np.asarray(he_px).size else 0
        if names is None:
            names = [f"Pt-{i}" for i in range(n)]
        if active is None:
            active = np.ones(n, dtype=bool)
        return cls(he_px=he_px, global_px=global_px, names=tuple(names), active=active)

    def __len__(self) -> int:
        return len(self.he_px)

    @property
    def n_active(self) -> int:
        return int(self.active.sum())

    def with_active(self, active: object) -> LandmarkPairs:
        return LandmarkPairs(self.he_px, self.global_px, self.names, active)

    def swapped(self) -> LandmarkPairs:
        """The same pairs with the two sides exchanged (to repair a file read the wrong way)."""
        return LandmarkPairs(self.global_px, self.he_px, self.names, self.active)

    def same_as(self, other: LandmarkPairs, atol: float = 0.0) -> bool:
        return (
            self.names == other.names
            and np.array_equal(self.active, other.active)
            and np.allclose(self.he_px, other.he_px, rtol=0.0, atol=atol)
            and np.allclose(self.global_px, other.global_px, rtol=0.0, atol=atol)
        )
