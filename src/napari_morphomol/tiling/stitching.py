"""Token maps stitched from per-tile token values: one raster over the whole H&E image.

Definitions (see :mod:`.geometry`): token ``(r, c)`` of the raster is the square ``[c, c + 1) x
[r, r + 1)`` in token coordinates; tile ``(i, j)`` covers ``raster[s*i : s*i + t, s*j : s*j + t]``
(``t`` tokens a side, stride ``s``); a tile's own tokens ``(a, b)`` are row-major, as the model
gives them. At the paper's stride (``s = t / 2``) a raster token is covered by up to four tiles.

Invariant: the stitched value of a raster token is the mean of the values of the tile tokens lying
on it, NaN where no tile covers it. :meth:`TokenGrid.token_map` computes it for a whole raster in
memory; :meth:`TokenGrid.stitch_block` for one block of it, reading only the tiles that cover the
block, a group of them at a time, so a slide's map x genes is written block by block in bounded
memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from napari_morphomol.errors import InputError
from napari_morphomol.tiling.geometry import TileGeometry


@dataclass(frozen=True)
class TokenGrid:
    """Where tiles lie on the token raster, and the averaging that turns per-token outputs
    (tiles, tokens) into one map at token resolution (18.3 um for the paper's model)."""

    n_tiles: int
    shape: tuple[int, int]
    """(rows, cols) of the token raster."""
    token_he_px: float
    """Side of one token in native H&E px."""
    he_to_global: np.ndarray
    token_mean: sp.csr_matrix
    """(raster tokens, tiles x tokens per tile): row k averages the tile tokens lying on raster token k."""
    covered: np.ndarray
    """(rows, cols) bool: raster tokens that some tile covers."""

    @classmethod
    def from_tiles(cls, rows, cols, geometry: TileGeometry, he_to_global: np.ndarray) -> TokenGrid:
        """The grid of tiles ``(rows[k], cols[k])`` of ``geometry``, placed by ``he_to_global`` (3 x 3,
        H&E px -> ``global`` px)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        n_rows, n_cols = geometry.raster_shape
        s, t = geometry.stride_tokens, geometry.tokens_per_side
        if len(rows) and (rows.min() < 0 or cols.min() < 0 or s * rows.max() + t > n_rows
                          or s * cols.max() + t > n_cols):
            raise InputError(f"tiles reach outside the token raster {(n_rows, n_cols)}; the results and the "
                             "geometry disagree")
        a, b = np.divmod(np.arange(t * t), t)  # token (a, b) of a tile, row-major like the model's tokens
        raster_rows = (s * rows[:, None] + a[None, :]).ravel()
        raster_cols = (s * cols[:, None] + b[None, :]).ravel()
        cover = sp.csr_matrix((np.ones(len(raster_rows)), (raster_rows * n_cols + raster_cols,
                                                          np.arange(len(raster_rows)))),
                              shape=(n_rows * n_cols, len(rows) * t * t))
        counts = np.asarray(cover.sum(axis=1)).ravel()
        with np.errstate(divide="ignore"):
            weights = np.where(counts > 0, 1.0 / counts, 0.0)
        token_mean = (sp.diags(weights) @ cover).tocsr().astype(np.float32)
        return cls(len(rows), (n_rows, n_cols), 1.0 / geometry.tokens_per_he_px,
                   np.asarray(he_to_global, np.float64), token_mean, (counts > 0).reshape(n_rows, n_cols))

    @property
    def tokens_per_tile(self) -> int:
        return self.token_mean.shape[1] // max(self.n_tiles, 1)

    def token_map(self, token_values: np.ndarray) -> np.ndarray:
        """(tiles, tokens) values -> (rows, cols) float32 raster of their means, NaN where no tile is.

        Parameters
        ----------
        token_values
            One value per token of each tile, tokens row-major (one gene of a token-level output).

        Returns
        -------
        numpy.ndarray
            The token-resolution map; place it with :meth:`token_pixel_to_global`.
        """
        values = np.asarray(token_values, dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != self.n_tiles or values.shape[0] * values.shape[1] != \
                self.token_mean.shape[1]:
            raise InputError(f"expected (tiles, tokens) = ({self.n_tiles}, {self.tokens_per_tile}) values, got "
                             f"shape {values.shape}")
        raster = (self.token_mean @ values.ravel()).reshape(self.shape)
        raster[~self.covered] = np.nan
        return raster

    def token_stack(self, token_values: np.ndarray) -> np.ndarray:
        """(tiles, tokens, width) values -> (rows, cols, width) float32 maps, one per column, as
        :meth:`token_map` makes each (NaN where no tile is)."""
        values = np.asarray(token_values, dtype=np.float32)
        if values.ndim != 3 or values.shape[0] * values.shape[1] != self.token_mean.shape[1]:
            raise InputError(f"expected (tiles, tokens, width) with {self.n_tiles} tiles, got shape {values.shape}")
        stack = np.asarray(self.token_mean @ values.reshape(-1, values.shape[2]), dtype=np.float32)
        stack = stack.reshape(*self.shape, values.shape[2])
        stack[~self.covered] = np.nan
        return stack

    def stitch_block(self, rows: slice, cols: slice, read_tiles: Callable[[np.ndarray], np.ndarray],
                     tiles_per_read: int) -> np.ndarray | None:
        """The stitched maps of the raster block ``[rows, cols]``, reading only the tiles covering it.

        Parameters
        ----------
        rows, cols
            The block (steps of 1, within :attr:`shape`).
        read_tiles
            Sorted results rows -> their (n, tokens, width) values (e.g. a zarr output's ``oindex``).
        tiles_per_read
            Tiles are read in groups of one ``tile // tiles_per_read`` each (a zarr output's chunk
            length), and summed into the block group by group, so one group is in memory at a time.

        Returns
        -------
        numpy.ndarray or None
            (width, block rows, block cols) float32, NaN where no tile is; None when no tile covers
            the block (nothing is read).
        """
        r = np.arange(*rows.indices(self.shape[0]))
        c = np.arange(*cols.indices(self.shape[1]))
        block = self.token_mean[(r[:, None] * self.shape[1] + c[None, :]).ravel()]
        if block.nnz == 0:
            return None
        t = self.tokens_per_tile
        tiles = np.unique(block.indices // t)
        local = np.searchsorted(tiles, block.indices // t) * t + block.indices % t
        block = sp.csr_matrix((block.data, local, block.indptr), shape=(block.shape[0], len(tiles) * t))
        stack = None
        for group in np.split(np.arange(len(tiles)), np.flatnonzero(np.diff(tiles // tiles_per_read)) + 1):
            values = np.asarray(read_tiles(tiles[group]), dtype=np.float32)
            part = block[:, group[0] * t:(group[-1] + 1) * t] @ values.reshape(len(group) * t, -1)
            stack = part if stack is None else stack + part
        stack = np.asarray(stack, dtype=np.float32)
        stack[~self.covered[r[:, None], c[None, :]].ravel()] = np.nan
        return np.ascontiguousarray(stack.T).reshape(-1, len(r), len(c))

    def token_pixel_to_global(self) -> np.ndarray:
        """Token raster pixel (x, y) -> ``global``: the pixel's centre is its token's centre."""
        s = self.token_he_px
        return self.he_to_global @ np.array([[s, 0.0, s / 2], [0.0, s, s / 2], [0.0, 0.0, 1.0]])
