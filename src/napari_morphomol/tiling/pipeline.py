"""From an H&E pyramid and a transcript table to the model's tiles: grid, filters, counts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
import pandas as pd

from napari_morphomol.errors import InputError
from napari_morphomol.registration.transforms import HeGlobalTransform, as_he_global_transform
from napari_morphomol.tiling.geometry import TileGeometry, TileSpec
from napari_morphomol.tiling.panel import GenePanel
from napari_morphomol.tiling.tissue import pick_mask_level, tile_background_fraction, tiles_in_region, tissue_mask
from napari_morphomol.tiling.transcripts import TranscriptBins, bin_transcripts, feature_names

FEW_TRANSCRIPTS_SHARE = 0.25
"""Below this share of the sample's panel transcripts on its tissue tiles, tiling warns that the
registration may not place the H&E on the Xenium run (a registered sample has most of them there,
the synthetic one 92 %; an H&E that covers only part of the Xenium run has fewer)."""
REGISTRATION_HINT = ("check the registration with `morphomol register` (its residuals) and that the alignment maps "
                     "H&E px to Xenium global px like Xenium's he_imagealignment.csv, not global -> H&E (the inverse)")


HE_FRAME_PIXEL_SIZE_UM = 1.0
"""The ``global`` pixel of an H&E alone (no Xenium frame): tiles are placed in H&E um."""


class FewTranscriptsWarning(UserWarning):
    """Few of the sample's transcripts fall on its tissue tiles: the registration may be off."""


@dataclass
class Tiling:
    """Kept tiles (one row each), the counts they are cut from, and what every filter removed."""

    geometry: TileGeometry
    tiles: pd.DataFrame
    bins: TranscriptBins | None
    """The transcript counts; None for an H&E alone (:func:`make_he_tiling`)."""
    transform: HeGlobalTransform
    xenium_pixel_size_um: float
    report: dict = field(default_factory=dict)

    @property
    def panel(self) -> GenePanel:
        return self._bins().panel

    def _bins(self) -> TranscriptBins:
        if self.bins is None:
            raise InputError("these tiles were cut from an H&E alone: they have no transcript counts")
        return self.bins

    def tokens(self, positions: np.ndarray) -> np.ndarray:
        """(B, 14, 14, core genes) uint32 token counts of tiles at table positions."""
        sel = self.tiles.iloc[np.atleast_1d(positions)]
        return self._bins().tokens.tile_tokens(self.geometry, sel["row"].to_numpy(), sel["col"].to_numpy())

    def addon_tokens(self, positions: np.ndarray) -> np.ndarray:
        """(B, 14, 14, add-on genes) uint32 per-token add-on counts of tiles at table positions
        (they sum to the tile's add-on counts)."""
        sel = self.tiles.iloc[np.atleast_1d(positions)]
        return self._bins().addon_tokens.tile_tokens(self.geometry, sel["row"].to_numpy(), sel["col"].to_numpy())

    def targets_log1p(self) -> np.ndarray:
        """(tiles, add-on genes) float32 log1p of add-on counts summed over each tile."""
        counts = self._bins().tile_addon_counts(self.tiles["row"].to_numpy(), self.tiles["col"].to_numpy())
        return np.log1p(counts).astype(np.float32)


def compute_tissue_mask(levels_yxc: Sequence, he_pixel_size_um: float, *, mask_pixel_size_um: float = 8.0
                        ) -> tuple[np.ndarray, tuple[float, float]]:
    """Tissue mask at about ``mask_pixel_size_um`` um/px from the pyramid, and its pixel size in H&E px (x, y)."""
    shapes = [tuple(int(s) for s in lv.shape[:2]) for lv in levels_yxc]
    index = pick_mask_level(shapes, he_pixel_size_um, mask_pixel_size_um)
    level = levels_yxc[index]
    level = level if isinstance(level, da.Array) else da.from_array(level, chunks=(2048, 2048, 3))
    level_pixel_size_um = he_pixel_size_um * shapes[0][1] / shapes[index][1]
    factor = max(1, int(mask_pixel_size_um // level_pixel_size_um))
    h, w = (shapes[index][0] // factor) * factor, (shapes[index][1] // factor) * factor
    if factor > 1:
        level = da.coarsen(np.mean, level[:h, :w].astype(np.float32), {0: factor, 1: factor})
    rgb = np.asarray(level.compute())
    mask = tissue_mask(rgb)
    return mask, (shapes[0][1] / shapes[index][1] * factor, shapes[0][0] / shapes[index][0] * factor)


def grid_tiles(geometry: TileGeometry, he_to_global: HeGlobalTransform, xenium_pixel_size_um: float) -> pd.DataFrame:
    """Every whole tile of the grid: id, row, col, H&E px box, centre in ``global`` px and um."""
    n_rows, n_cols = geometry.grid_shape
    if n_rows == 0 or n_cols == 0:
        raise InputError(
            f"the H&E image ({geometry.he_width_px} x {geometry.he_height_px} px at {geometry.he_pixel_size_um} um/px) "
            f"is smaller than one tile of {geometry.tile_px * geometry.tile_pixel_size_um:g} um; check the pixel size"
        )
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    boxes = geometry.tile_box_he_px(rows, cols)
    centre_he = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    centre_global = he_to_global.apply_xy(centre_he)
    return pd.DataFrame({
        "tile_id": rows * n_cols + cols,
        "row": rows,
        "col": cols,
        "he_x0": boxes[:, 0], "he_y0": boxes[:, 1], "he_x1": boxes[:, 2], "he_y1": boxes[:, 3],
        "global_x": centre_global[:, 0], "global_y": centre_global[:, 1],
        "um_x": centre_global[:, 0] * xenium_pixel_size_um, "um_y": centre_global[:, 1] * xenium_pixel_size_um,
    })


@dataclass(frozen=True)
class TilingOptions:
    """How a sample is tiled: the tile geometry and which tiles and transcripts are kept.

    Checked when made (an out-of-range value is an InputError naming it).
    """

    spec: TileSpec = TileSpec()
    """How tiles and tokens are cut (512 px at 0.5 um/px, stride 256, 224 px, 14 x 14 tokens)."""
    max_background: float = 0.3
    """Largest background fraction of a kept tile, 0 to 1."""
    region_he_px: tuple[tuple[float, float], ...] | None = None
    """A polygon of (x, y) H&E px: only tiles whose centre is inside it are kept (None: all)."""
    min_transcripts: int = 1000
    """Fewest core + add-on transcripts of a kept tile; 0 keeps all."""
    min_qv: float = 20.0
    """Lowest transcript quality value counted."""
    max_dense_bytes: int = 2 * 1024**3
    """Largest dense core-gene token raster; a larger one is held sparse (CSR)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_background <= 1.0:
            raise InputError(f"max_background is a fraction in [0, 1], got {self.max_background}")
        if self.min_transcripts < 0:
            raise InputError(f"min_transcripts must be >= 0, got {self.min_transcripts}")
        if self.region_he_px is not None:
            polygon = np.asarray(self.region_he_px, dtype=float).tolist()
            object.__setattr__(self, "region_he_px", tuple(tuple(point) for point in polygon))


def make_tiling(
    transcripts,
    levels_yxc: Sequence,
    *,
    he_pixel_size_um: float,
    he_to_global: np.ndarray | HeGlobalTransform,
    xenium_pixel_size_um: float,
    panel: GenePanel | None,
    options: TilingOptions = TilingOptions(),
    mask: tuple[np.ndarray, tuple[float, float]] | None = None,
    x_col: str = "x_location",
    y_col: str = "y_location",
    progress: Callable[[int, int], None] | None = None,
) -> Tiling:
    """Tile an H&E image with its transcripts.

    Tiles are kept when their background fraction is at most ``options.max_background``, their
    centre lies in ``options.region_he_px`` (if given) and they hold at least
    ``options.min_transcripts`` core + add-on transcripts.

    Parameters
    ----------
    transcripts
        pandas or dask dataframe of transcripts: ``x_col`` / ``y_col`` in um, ``feature_name``, ``qv``.
    levels_yxc
        H&E pyramid levels ``(H, W, 3)``, full resolution first.
    he_pixel_size_um
        Native H&E pixel size.
    he_to_global
        H&E px -> Xenium ``global`` px: a 3 x 3 matrix or a registration transform.
    xenium_pixel_size_um
        Size of one ``global`` px.
    panel
        Core and add-on genes; None uses every measured gene as core and no add-on.
    options
        Tile geometry and filters (:class:`TilingOptions`).
    mask
        A tissue mask and its pixel size in H&E px (x, y); None computes it from the pyramid.
    x_col, y_col
        Transcript coordinate columns.
    progress
        Called with (partitions done, partitions) while transcripts are binned.

    Returns
    -------
    Tiling
        The kept tiles, their counts and what every filter removed (``report``).

    Raises
    ------
    InputError
        When no tile is kept (saying which filter removed them) or the inputs do not fit.
    """
    transform = as_he_global_transform(he_to_global)
    features = feature_names(transcripts)
    panel = GenePanel.all_genes(features) if panel is None else panel.validated(features)
    geometry, tiles, report, (tissue_rows, tissue_cols) = _tissue_tiles(levels_yxc, he_pixel_size_um, transform,
                                                                        xenium_pixel_size_um, options, mask)
    max_background = options.max_background
    bins = bin_transcripts(transcripts, geometry, panel, transform, xenium_pixel_size_um=xenium_pixel_size_um,
                           min_qv=options.min_qv, x_col=x_col, y_col=y_col, max_dense_bytes=options.max_dense_bytes,
                           progress=progress)
    report["transcripts"] = bins.counts.to_dict()
    report["transcripts_on_tissue_tiles"] = _on_tiles(bins, tissue_rows, tissue_cols)
    _warn_if_few_on_tissue(report)
    rows, cols = tiles["row"].to_numpy(), tiles["col"].to_numpy()
    tiles["n_core"] = bins.tile_core_totals(rows, cols)
    tiles["n_addon"] = bins.tile_addon_counts(rows, cols).sum(axis=1)
    tiles["n_transcripts"] = tiles["n_core"] + tiles["n_addon"]
    enough = tiles["n_transcripts"] >= options.min_transcripts
    report["transcript_filter"] = {"min_transcripts": int(options.min_transcripts), "kept": int(enough.sum()),
                                   "dropped": int((~enough).sum())}
    report["token_raster"] = {"sparse": bins.tokens.is_sparse, "nbytes": int(bins.tokens.nbytes)}
    tiles = tiles[enough].reset_index(drop=True)
    report["kept_tiles"] = len(tiles)
    if len(tiles) == 0:
        raise InputError(f"no tile is kept: {why_no_tiles(report, max_background)}")
    return Tiling(geometry, tiles, bins, transform, xenium_pixel_size_um, report)


def _tissue_tiles(levels_yxc: Sequence, he_pixel_size_um: float, transform: HeGlobalTransform,
                  frame_pixel_size_um: float, options: TilingOptions,
                  mask: tuple[np.ndarray, tuple[float, float]] | None):
    """The grid's tiles on tissue (and in the region): geometry, tile table, report and the rows and
    columns of every tissue tile; InputError when none is left."""
    spec, max_background = options.spec, options.max_background
    region_he_px = None if options.region_he_px is None else np.asarray(options.region_he_px, dtype=float)
    full_h, full_w = (int(s) for s in levels_yxc[0].shape[:2])
    geometry = TileGeometry(**spec.to_dict(), he_pixel_size_um=he_pixel_size_um, he_height_px=full_h,
                            he_width_px=full_w)
    tiles = grid_tiles(geometry, transform, frame_pixel_size_um)
    report: dict = {"grid_tiles": len(tiles)}
    tissue, mask_px = mask if mask is not None else compute_tissue_mask(levels_yxc, he_pixel_size_um)
    boxes = tiles[["he_x0", "he_y0", "he_x1", "he_y1"]].to_numpy()
    tiles["background_fraction"] = tile_background_fraction(tissue, mask_px, boxes)
    tiles = tiles[tiles["background_fraction"] <= max_background]
    report["tissue_tiles"] = len(tiles)
    tissue_rows, tissue_cols = tiles["row"].to_numpy(), tiles["col"].to_numpy()
    if region_he_px is not None and len(tiles):
        tiles = tiles[tiles_in_region(geometry, tissue_rows, tissue_cols, region_he_px)]
        report["region_tiles"] = len(tiles)
    if len(tiles) == 0:  # before any transcript is read
        raise InputError(f"no tile is kept: {why_no_tiles(report, max_background)}")
    return geometry, tiles, report, (tissue_rows, tissue_cols)


def make_he_tiling(levels_yxc: Sequence, *, he_pixel_size_um: float, options: TilingOptions = TilingOptions(),
                   mask: tuple[np.ndarray, tuple[float, float]] | None = None) -> Tiling:
    """Tile an H&E image alone (a slide without a Xenium run) for the model's image-only route.

    The tissue and region filters of :func:`make_tiling`; there are no transcripts, so no
    transcript filter and no counts (``Tiling.bins`` is None). With no Xenium frame the tiles are
    placed in the H&E's own, in um: ``Tiling.transform`` scales H&E px to um and
    ``Tiling.xenium_pixel_size_um`` is 1 (:data:`HE_FRAME_PIXEL_SIZE_UM`), so a tile's ``global``
    and ``um`` centres are both its centre in H&E um.

    Parameters
    ----------
    levels_yxc
        H&E pyramid levels ``(H, W, 3)``, full resolution first.
    he_pixel_size_um
        Native H&E pixel size.
    options
        Tile geometry, background and region filters (``min_transcripts`` and ``min_qv`` do not apply).
    mask
        A tissue mask and its pixel size in H&E px (x, y); None computes it from the pyramid.

    Returns
    -------
    Tiling
        The kept tiles and what every filter removed (``report``, with ``"route": "image"``).
    """
    transform = as_he_global_transform(np.diag([he_pixel_size_um, he_pixel_size_um, 1.0]))
    geometry, tiles, report, _ = _tissue_tiles(levels_yxc, he_pixel_size_um, transform, HE_FRAME_PIXEL_SIZE_UM,
                                               options, mask)
    tiles = tiles.reset_index(drop=True)
    report.update(route="image", kept_tiles=len(tiles))
    return Tiling(geometry, tiles, None, transform, HE_FRAME_PIXEL_SIZE_UM, report)


def _on_tiles(bins: TranscriptBins, rows: np.ndarray, cols: np.ndarray) -> dict:
    """Panel transcripts (qv-passing core + add-on) in the union of the tiles (rows, cols), and
    their share of all the sample's panel transcripts, wherever the registration put them."""
    geometry = bins.geometry
    s, span = geometry.stride_tokens, geometry.tokens_per_side // geometry.stride_tokens
    covered = np.zeros(geometry.stride_raster_shape, dtype=bool)
    for di in range(span):
        for dj in range(span):
            covered[rows + di, cols + dj] = True
    n_rows, n_cols = covered.shape
    core = bins.core_totals[:n_rows * s, :n_cols * s].reshape(n_rows, s, n_cols, s).sum(axis=(1, 3), dtype=np.int64)
    on_tiles = int(core[covered].sum() + bins.addon_stride[covered].sum(dtype=np.int64))
    c = bins.counts
    panel = c.core_binned + c.addon_binned + c.addon_outside_grid + c.outside_image
    return {"count": on_tiles, "panel_transcripts": int(panel), "share": on_tiles / panel if panel else 0.0}


def transcripts_on_tissue_text(report: dict) -> str:
    """How many of the sample's panel transcripts fall on its tissue tiles, from a tiling report."""
    on = report["transcripts_on_tissue_tiles"]
    return (f"{on['count']} of the sample's {on['panel_transcripts']} panel transcripts ({on['share']:.1%}) fall on "
            f"its {report['tissue_tiles']} tissue tiles, "
            f"{report['transcripts']['outside_image']} outside the H&E image")


def _warn_if_few_on_tissue(report: dict) -> None:
    on = report["transcripts_on_tissue_tiles"]
    if report["tissue_tiles"] and on["panel_transcripts"] and on["share"] < FEW_TRANSCRIPTS_SHARE:
        warnings.warn(f"only {transcripts_on_tissue_text(report)}: "
                      "the registration may not place the H&E on the Xenium run; "
                      f"{REGISTRATION_HINT}", FewTranscriptsWarning, stacklevel=3)


def why_no_tiles(report: dict, max_background: float) -> str:
    """Why tiling kept no tile, from its report, with what to check (for an InputError)."""
    grid, tissue = report["grid_tiles"], report["tissue_tiles"]
    counts = f"of {grid} grid tiles, {tissue} are on tissue (background at most {max_background:g})"
    if tissue == 0:
        return (f"{counts}; check that the image is an H&E of the tissue and its pixel size, or allow more background "
                "(--max-background)")
    if report.get("region_tiles") == 0:
        return f"{counts} and none of them has its centre in the region; check that the region polygon is in H&E px"
    if "region_tiles" in report:
        counts += f", {report['region_tiles']} in the region"
    minimum = report["transcript_filter"]["min_transcripts"]
    return (f"{counts} and none holds {minimum} or more transcripts (--min-transcripts): "
            f"{transcripts_on_tissue_text(report)}; "
            f"{REGISTRATION_HINT}, or lower --min-transcripts")


def tile_sample(sdata, *, panel: GenePanel | None, he_to_global: np.ndarray | HeGlobalTransform | None = None,
                options: TilingOptions = TilingOptions(), progress: Callable[[int, int], None] | None = None
                ) -> Tiling:
    """:func:`make_tiling` on a sample opened by :func:`napari_morphomol.io.load_sample`.

    The registration is, in order: ``he_to_global``; the full model recorded on the sample by
    :func:`napari_morphomol.registration.set_he_registration` (per-region fits stay per-region);
    the alignment matrix the sample was loaded with.

    Parameters
    ----------
    sdata
        The sample (H&E image and Xenium transcripts).
    panel, options, progress
        As for :func:`make_tiling`.
    he_to_global
        A registration to use instead of the sample's.

    Returns
    -------
    Tiling
    """
    from napari_morphomol.elements import HE_IMAGE, TRANSCRIPTS, element_levels_cyx, levels_yxc, sample_info
    from napari_morphomol.registration import REGISTRATION_ATTRS_KEY, fitted_from_record

    info = sample_info(sdata)
    if HE_IMAGE not in sdata.images or TRANSCRIPTS not in sdata.points:
        raise InputError("tiling needs a sample with both an H&E image and Xenium transcripts")
    transform = he_to_global
    if transform is None and REGISTRATION_ATTRS_KEY in sdata.attrs:
        transform = fitted_from_record(sdata.attrs[REGISTRATION_ATTRS_KEY])
    if transform is None:
        transform = info.he_to_global
    if transform is None:
        raise InputError(
            "the H&E image is not registered to the Xenium run: give an alignment CSV "
            "(Xenium's he_imagealignment.csv or one exported by the registration widget)"
        )
    he_levels = levels_yxc(element_levels_cyx(sdata.images[HE_IMAGE]))
    return make_tiling(
        sdata.points[TRANSCRIPTS], he_levels, he_pixel_size_um=info.he_pixel_size_um, he_to_global=transform,
        xenium_pixel_size_um=info.xenium_pixel_size_um, panel=panel, options=options, x_col="x", y_col="y",
        progress=progress,
    )


def tile_he_sample(sdata, *, options: TilingOptions = TilingOptions()) -> Tiling:
    """:func:`make_he_tiling` on the H&E image of a sample opened by :func:`napari_morphomol.io.load_sample`
    (any transcripts it holds are not read).

    Parameters
    ----------
    sdata
        The sample (its H&E image).
    options
        As for :func:`make_he_tiling`.

    Returns
    -------
    Tiling
    """
    from napari_morphomol.elements import HE_IMAGE, element_levels_cyx, levels_yxc, sample_info

    if HE_IMAGE not in sdata.images:
        raise InputError("tiling needs a sample with an H&E image")
    he_levels = levels_yxc(element_levels_cyx(sdata.images[HE_IMAGE]))
    return make_he_tiling(he_levels, he_pixel_size_um=sample_info(sdata).he_pixel_size_um, options=options)
