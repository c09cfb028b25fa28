"""Tile and token geometry: one grid of *tokens* in H&E space that tiles, tokens and image pixels share.

Positions are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``, the image corner is
0. A :class:`TileSpec` says how tiles are cut whatever the slide: tiles of ``tile_px`` px at
``tile_pixel_size_um`` um/px (512 px at 0.5 um/px), every ``stride_px``, resized to ``image_px``
(224) and split into ``tokens_per_side`` x ``tokens_per_side`` tokens (14 x 14, the ViT-S/16
patches of the resized tile). A model card keeps the spec its model was trained on. A
:class:`TileGeometry` is a spec laid over one H&E image (its pixel size and shape). A *token* is
``tile_px / tokens_per_side`` tile px (36.571 px = 18.29 um) square.

Everything is anchored at the H&E image corner in *token coordinates*
``q = u * tokens_per_he_px`` (``u`` in native H&E px). Token ``(r, c)`` of the raster is the
half-open square ``q_y in [r, r + 1)``, ``q_x in [c, c + 1)``; a point exactly on an edge belongs
to the token below/right of it. The stride is a whole number of tokens (256 px = 7 tokens), so
tile ``(i, j)`` is tokens ``[s*i, s*i + 14) x [s*j, s*j + 14)``, i.e. ``raster[s*i:s*i+14,
s*j:s*j+14]`` of one global token raster. A *stride square* is ``s x s`` tokens (one stride on a
side); tile ``(i, j)`` is stride squares ``[i, i + 2) x [j, j + 2)``. Resized tile pixels are a
grid too: ``image_px / tokens_per_side`` (16) pixels per token, so tile ``(i, j)`` is
``resized[16*s*i : 16*s*i + 224, ...]`` of one global resampled image, and token ``(a, b)`` is
its pixels ``[16a, 16a + 16) x [16b, 16b + 16)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from napari_morphomol.errors import InputError

_BYTES_PER_TOKEN = 36
"""What tiling holds per token of the raster whatever the slide: core totals (uint32), their
summed-area table and its cumulative sums (int64 x 3), the sparse raster's row pointers (int64)."""
_BYTES_PER_GRID_TILE = 256
"""What tiling holds per tile of the grid: the table (11 columns of 8 bytes), boxes, centres, indices."""
_MEMORY_SHARE = 0.5
"""Share of this machine's physical memory one size-like option may imply (the rest: the OS, the model)."""


@dataclass(frozen=True)
class TileSpec:
    """How tiles and tokens are cut, whatever the slide (the paper's defaults)."""

    tile_px: int = 512
    """Tile side in px at ``tile_pixel_size_um``."""
    stride_px: int = 256
    """Tile stride in px at ``tile_pixel_size_um``; a whole number of tokens."""
    tile_pixel_size_um: float = 0.5
    image_px: int = 224
    """Side of the resized tile the model sees."""
    tokens_per_side: int = 14

    def __post_init__(self) -> None:
        if not (self.tile_pixel_size_um > 0 and math.isfinite(self.tile_pixel_size_um)):
            raise InputError(f"tile pixel size must be a positive number of um/px, got {self.tile_pixel_size_um}")
        if self.tile_px <= 0 or self.stride_px <= 0 or self.tokens_per_side <= 0 or self.image_px <= 0:
            raise InputError(f"tile ({self.tile_px} px), stride ({self.stride_px} px), resized tile "
                             f"({self.image_px} px) and tokens per side ({self.tokens_per_side}) must be positive")
        if (self.stride_px * self.tokens_per_side) % self.tile_px:
            raise InputError(
                f"stride {self.stride_px} px is not a whole number of tokens of {self.tile_px}/"
                f"{self.tokens_per_side} px; tiles would not share one token raster. Use a stride of "
                f"k * {self.tile_px}/{math.gcd(self.tile_px, self.tokens_per_side)} "
                f"(e.g. {self.tile_px // 2} for the paper's half-tile stride)."
            )
        if self.image_px % self.tokens_per_side:
            raise InputError(
                f"resized tile size {self.image_px} px is not a multiple of {self.tokens_per_side} tokens"
            )

    @property
    def spec(self) -> TileSpec:
        """The spec alone (for a :class:`TileGeometry`: without its slide)."""
        return TileSpec(**{f.name: getattr(self, f.name) for f in fields(TileSpec)})

    @property
    def stride_tokens(self) -> int:
        return self.stride_px * self.tokens_per_side // self.tile_px

    @property
    def token_tile_px(self) -> float:
        """Token size in tile px (512 / 14 = 36.571)."""
        return self.tile_px / self.tokens_per_side

    @property
    def token_um(self) -> float:
        """Token size in um (18.29 for the paper's model)."""
        return self.token_tile_px * self.tile_pixel_size_um

    @property
    def image_px_per_token(self) -> int:
        return self.image_px // self.tokens_per_side

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(TileSpec)}


@dataclass(frozen=True, kw_only=True)
class TileGeometry(TileSpec):
    """A :class:`TileSpec` over one H&E image: the shared token grid; see the module docstring."""

    he_pixel_size_um: float
    """Native H&E pixel size (um/px)."""
    he_height_px: int
    he_width_px: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.he_pixel_size_um > 0 and math.isfinite(self.he_pixel_size_um)):
            raise InputError(f"H&E pixel size must be a positive number of um/px, got {self.he_pixel_size_um}")
        if self.he_height_px <= 0 or self.he_width_px <= 0:
            raise InputError(f"H&E image size must be positive, got {self.he_height_px} x {self.he_width_px}")
        self._check_working_set()

    def _check_working_set(self) -> None:
        """Refuse, before any work, a geometry whose token raster or tile grid cannot be held."""
        rows, cols = self.raster_shape
        grid_rows, grid_cols = self.grid_shape
        tokens, tiles = rows * cols, grid_rows * grid_cols
        raster_bytes, grid_bytes = tokens * _BYTES_PER_TOKEN, tiles * _BYTES_PER_GRID_TILE
        width_um, height_um = self.he_width_px * self.he_pixel_size_um, self.he_height_px * self.he_pixel_size_um
        image = f"this {width_um:g} x {height_um:g} um H&E image ({self.he_pixel_size_um:g} um/px)"
        if raster_bytes >= grid_bytes:
            what = (f"tiles of {self.tile_px} px (--tile-px) at {self.tile_pixel_size_um:g} um/px "
                    f"(--tile-pixel-size-um) make tokens of {self.token_um:.3g} um (18.3 um for the paper's model): "
                    f"a {count_text(tokens)}-token raster over {image}")
        else:
            what = (f"a stride of {self.stride_px} px (--stride-px) at {self.tile_pixel_size_um:g} um/px makes a "
                    f"grid of {count_text(tiles)} tiles over {image}")
        check_fits_in_memory(raster_bytes + grid_bytes, what,
                             "check --tile-px, --stride-px and --tile-pixel-size-um (or the model card's tile "
                             "geometry) and the H&E pixel size (--he-pixel-size-um)")

    # -- scale factors -----------------------------------------------------------------------
    @property
    def he_px_per_tile_px(self) -> float:
        return self.tile_pixel_size_um / self.he_pixel_size_um

    @property
    def tokens_per_he_px(self) -> float:
        return self.he_pixel_size_um * self.tokens_per_side / (self.tile_pixel_size_um * self.tile_px)

    # -- extents -------------------------------------------------------------------------------
    @property
    def extent_tokens_xy(self) -> tuple[float, float]:
        """Image width and height in token coordinates (where transcripts stop being inside)."""
        return self.he_width_px * self.tokens_per_he_px, self.he_height_px * self.tokens_per_he_px

    @property
    def raster_shape(self) -> tuple[int, int]:
        """(rows, cols) of the token raster: every token that touches the image."""
        wx, wy = self.extent_tokens_xy
        return math.ceil(wy), math.ceil(wx)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles lying wholly inside the image."""
        wx, wy = self.extent_tokens_xy
        t, s = self.tokens_per_side, self.stride_tokens

        def count(extent: float) -> int:
            return 0 if extent < t else int((extent - t) // s) + 1

        return count(wy), count(wx)

    @property
    def stride_raster_shape(self) -> tuple[int, int]:
        """(rows, cols) of stride squares (s x s tokens); tile (i, j) is stride squares [i, i+2) x [j, j+2)."""
        rows, cols = self.grid_shape
        t_in_s = self.tokens_per_side // self.stride_tokens if self.tokens_per_side % self.stride_tokens == 0 else None
        if t_in_s is None:
            raise InputError("stride squares need a tile made of whole strides (tile_px a multiple of stride_px)")
        return rows + t_in_s - 1, cols + t_in_s - 1

    # -- mappings -------------------------------------------------------------------------------
    def he_px_to_tokens(self, points_he_px: np.ndarray) -> np.ndarray:
        """(x, y) native H&E px -> (x, y) token coordinates (floats; floor gives the token)."""
        return np.asarray(points_he_px, dtype=np.float64) * self.tokens_per_he_px

    def tokens_to_he_px(self, points_tokens: np.ndarray) -> np.ndarray:
        return np.asarray(points_tokens, dtype=np.float64) / self.tokens_per_he_px

    def he_px_to_tile_px(self, points_he_px: np.ndarray) -> np.ndarray:
        """Native H&E px -> px of the 0.5 um/px tile grid (same origin)."""
        return np.asarray(points_he_px, dtype=np.float64) / self.he_px_per_tile_px

    def tile_box_he_px(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(N, 4) boxes [x0, y0, x1, y1] of tiles in native H&E px (half-open)."""
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        s, t = self.stride_tokens, self.tokens_per_side
        box_tokens = np.stack([s * cols, s * rows, s * cols + t, s * rows + t], axis=1)
        return box_tokens / self.tokens_per_he_px

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "stride_tokens": self.stride_tokens,
            "token_tile_px": self.token_tile_px,
            "tokens_per_he_px": self.tokens_per_he_px,
            "image_px_per_token": self.image_px_per_token,
            "raster_shape": list(self.raster_shape),
            "grid_shape": list(self.grid_shape),
            "origin": "H&E image corner; pixel i covers [i, i+1); tokens half-open [k, k+1)",
        }


def memory_limit_bytes() -> int:
    """The most memory one size-like option may imply: half of this machine's physical memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 16 GiB
        physical = 16 * 1024**3
    return int(physical * _MEMORY_SHARE)


def bytes_text(n_bytes: float) -> str:
    """``n_bytes`` in decimal units: '16 TB', '3.2 GB', '512 B' (beyond PB: '1.2e3 PB')."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{count_text(n_bytes / size)} {unit}"
    return f"{n_bytes:.0f} B"


def count_text(value: float) -> str:
    """A count in at most three digits, or two significant digits and a power of ten: 360, 5.5e8."""
    return f"{value:.3g}" if value < 1000 else f"{value:.2g}".replace("e+", "e")


def check_fits_in_memory(n_bytes: float, what: str, advice: str) -> None:
    """Raise an InputError when ``n_bytes`` exceed :func:`memory_limit_bytes`.

    Parameters
    ----------
    n_bytes
        Memory the options imply.
    what
        What implies it, naming the options and their values ("a batch of 10000 tiles (--batch-size)").
    advice
        What to check or change.

    Raises
    ------
    InputError
        "``what``: about N to hold, more than the limit of M (half of this machine's memory); ``advice``".
    """
    limit = memory_limit_bytes()
    if n_bytes > limit:
        raise InputError(f"{what}: about {bytes_text(n_bytes)} to hold, more than the limit of {bytes_text(limit)} "
                         f"(half of this machine's memory); {advice}")


def check_batch_memory(geometry: TileGeometry, batch_size: int, n_core_genes: int, *, held_batches: int,
                       option: str = "--batch-size") -> None:
    """Refuse a batch size whose image and token tensors cannot be held, before any work.

    Parameters
    ----------
    geometry
        The tiles' geometry (resized tile size, tokens per side).
    batch_size
        Tiles per batch, as it will run (already capped at the tiles there can be).
    n_core_genes
        Genes per token.
    held_batches
        Batches held at once (the running one and the prefetched ones).
    option
        The option that sets ``batch_size``, for the message.

    Raises
    ------
    InputError
        When the batches imply more than :func:`memory_limit_bytes`.
    """
    pixels = 3 * geometry.image_px**2
    per_tile = pixels * (1 + 4) + geometry.tokens_per_side**2 * max(n_core_genes, 0) * 4  # uint8 + its float32 copy
    check_fits_in_memory(
        float(batch_size) * per_tile * held_batches,
        f"a batch of {batch_size} tiles ({option}) is a {count_text(batch_size * pixels)}-value image tensor "
        f"({held_batches} batches held at once)",
        f"give a smaller {option} (32 is a good start; on a GPU that runs out of memory it is halved by itself)",
    )


def pick_pyramid_level(level_shapes_yx: list[tuple[int, int]], he_pixel_size_um: float,
                       tile_pixel_size_um: float = 0.5) -> int:
    """Coarsest level still at least as fine as ``tile_pixel_size_um`` (so tiles are never upsampled).

    Falls back to level 0 when even the full resolution is coarser than ``tile_pixel_size_um``.
    """
    full_h, full_w = level_shapes_yx[0]
    best = 0
    for index, (h, w) in enumerate(level_shapes_yx):
        level_pixel_size_um = he_pixel_size_um * max(full_w / w, full_h / h)
        if level_pixel_size_um <= tile_pixel_size_um * (1 + 1e-6):
            best = index
    return best
