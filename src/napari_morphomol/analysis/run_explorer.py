"""Everything the Explore view shows for one prediction run, computed headless (no Qt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.path import Path as PolygonPath

from napari_morphomol.analysis.clusters import PAPER_N_PCS, PAPER_RESOLUTIONS, add_clusters, leiden_key
from napari_morphomol.analysis.gene_maps import (
    StrideGrid,
    TokenGrid,
    require_token_head,
    run_token_grid,
    token_head_log1p,
    token_map_image,
)
from napari_morphomol.analysis.tiles_anndata import gene_metrics, tiles_anndata
from napari_morphomol.errors import InputError
from napari_morphomol.inference import Results, open_results
from napari_morphomol.inference.token_maps import TOKEN_MAP_UNITS
from napari_morphomol.models.trust import token_interval

MAP_KINDS = ("predicted", "measured", "residual", "interval")
"""What a map shows: the prediction, the measurement, their difference, or the width of the
prediction's calibrated interval (upper - lower bound, log1p units)."""
MEASURED_KINDS = ("measured", "residual")
"""The map kinds that need the gene to be measured."""
IMAGE_ROUTE_NOTE = ("predicted from the H&E alone (no Xenium run): predicted maps only. Nothing was measured on "
                    "this slide, so there are no measured or residual maps, metrics or cells")
"""What Explore says of a run of the image-only route."""
EXPRESSION_UNITS = "log1p counts per tile"
TOKEN_EXPRESSION_UNITS = TOKEN_MAP_UNITS


@dataclass
class RunExplorer:
    """A prediction run as maps, metrics, clusters and tile look-ups; the widgets only display it."""

    results: Results
    adata: ad.AnnData
    grid: StrideGrid
    metrics: pd.DataFrame
    """Per measured gene: spearman, pearson, mse (empty when nothing was measured)."""
    xenium_pixel_size_um: float
    _maps: dict = field(default_factory=dict, repr=False)
    _token_grid: TokenGrid | None = field(default=None, repr=False)
    _cells: ad.AnnData | None = field(default=None, repr=False)
    _cell_labels: list | None = field(default=None, repr=False)

    @property
    def has_token_maps(self) -> bool:
        """Whether the run's model predicted the add-on panel per token (``addon_tokens``)."""
        from napari_morphomol.models.config import ADDON_TOKEN_HEAD

        return ADDON_TOKEN_HEAD in self.results.outputs

    @property
    def token_grid(self) -> TokenGrid:
        """Where the run's tiles lie on the token raster (built on first use)."""
        if self._token_grid is None:
            self._token_grid = run_token_grid(self.results)
        return self._token_grid

    def token_map(self, gene: str, kind: str = "predicted") -> np.ndarray:
        """(token rows, token cols) float32 map of ``gene`` at token resolution, log1p counts per
        token (NaN where no tile is): predicted (the mean over the up to four tiles covering each
        token of ``softplus`` of the token head), measured, or residual, read from the stitched
        maps predict wrote (one gene's plane); cached per gene and kind.

        Parameters
        ----------
        gene
            An add-on gene of the run's model.
        kind
            One of :data:`MAP_KINDS`.

        Returns
        -------
        numpy.ndarray
            Placed in ``global`` by ``token_grid.token_pixel_to_global()``.
        """
        if kind not in MAP_KINDS:
            raise InputError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")
        self._column(gene)
        key = ("token", gene, kind)
        if key not in self._maps:
            if kind == "residual":
                self._maps[key] = self.token_map(gene, "measured") - self.token_map(gene, "predicted")
            elif kind == "interval":
                self._require_intervals("token")
                lower, upper = token_interval(self.token_map(gene, "predicted"),
                                              self.trust.token_quantile[self._column(gene)])
                self._maps[key] = upper - lower
            elif kind == "measured" and not self.is_measured(gene):
                raise InputError(f"{gene} was not measured in this sample: only its predicted map exists")
            else:
                self._maps[key] = token_map_image(self.results, kind).plane(gene)
        return self._maps[key]

    @property
    def cells(self) -> ad.AnnData:
        """The run's predictions per Xenium cell (``analysis.cells_anndata``), built on first use."""
        if self._cells is None:
            from napari_morphomol.analysis.cells import cells_anndata

            self._cells = cells_anndata(self)
        return self._cells

    def cell_view_refusal(self) -> str | None:
        """Why this run has no cell view (the core's refusal, saying what to do), or None when it has one."""
        from napari_morphomol.analysis.cells import cell_label_levels, read_xenium_cells

        if "cell_view_refusal" not in self._maps:
            try:
                require_token_head(self.results, "cell view")
                xenium_dir = (self.results.metadata.get("sample") or {}).get("xenium_dir")
                if xenium_dir is None:
                    raise InputError(f"the run in {self.results.path} records no Xenium folder, so it has no cells")
                read_xenium_cells(xenium_dir)
                self._cell_labels = cell_label_levels(xenium_dir) if self._cell_labels is None else self._cell_labels
                self._maps["cell_view_refusal"] = None
            except InputError as exc:
                self._maps["cell_view_refusal"] = str(exc)
        return self._maps["cell_view_refusal"]

    @property
    def cell_labels(self) -> list:
        """The run's cell label mask as lazy dask levels in ``global`` px, finest first
        (``analysis.cells.cell_label_levels``); InputError saying why when there is no cell view."""
        refusal = self.cell_view_refusal()
        if refusal is not None:
            raise InputError(refusal)
        return self._cell_labels

    def cell_label_values(self, gene: str, kind: str = "predicted") -> np.ndarray:
        """(largest label + 2,) float32: the value of ``gene`` per cell label, log1p counts per cell
        (predicted, measured or residual), NaN for the background (0), for cells off the run's
        tiles and at the last index (any label the table does not know); cached per gene and kind."""
        if kind not in MAP_KINDS:
            raise InputError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")
        column = self._column(gene)
        key = ("cell", gene, kind)
        if key not in self._maps:
            cells = self.cells
            if "label_id" not in cells.obs:
                raise InputError(f"the cells of {self.results.path} carry no label ids (the Xenium folder is not "
                                 "there); the cell view needs the run's bundle where predict found it")
            if kind in MEASURED_KINDS and not self.is_measured(gene):
                raise InputError(f"{gene} was not measured in this sample: only its predicted map exists")
            values = np.asarray(cells.X[:, column], dtype=np.float32)
            if kind == "interval":
                self._require_intervals("cell")
                values = cells.layers["predicted_upper"][:, column] - cells.layers["predicted_lower"][:, column]
            elif kind != "predicted":
                measured = np.asarray(cells.layers["measured"][:, column], dtype=np.float32)
                values = measured if kind == "measured" else measured - values
            labels = cells.obs["label_id"].to_numpy()
            lut = np.full(int(labels.max(initial=0)) + 2, np.nan, dtype=np.float32)
            lut[labels] = values
            self._maps[key] = lut
        return self._maps[key]

    def cell_map(self, gene: str, kind: str = "predicted") -> list:
        """Every cell of the sample coloured by ``gene``: the cell label mask mapped through
        :meth:`cell_label_values`, as lazy float32 dask levels in ``global`` px (finest first)."""
        levels = self.cell_labels
        lut = self.cell_label_values(gene, kind)
        last = lut.size - 1
        return [level.map_blocks(lambda block: lut[np.minimum(block, last)], dtype=np.float32) for level in levels]

    @property
    def trust(self):
        """The run's ``inference.trust.RunTrust``: interval bounds and out-of-distribution flags."""
        return self.results.trust

    def interval_refusal(self, resolution: str = "tile") -> str | None:
        """Why this run has no intervals at ``resolution`` ("tile", "token" or "cell"), or None."""
        trust = self.trust
        if trust.unavailable:
            return trust.unavailable
        if resolution == "tile" and not trust.has_intervals:
            return ("the run's model has no variance head, so its tile predictions have no intervals (token and "
                    "cell maps may); retrain with a variance head (morphomol train --variance-head)")
        if resolution != "tile" and trust.token_quantile is None:
            return "the run's model is not calibrated at the token scale, so token and cell maps have no intervals"
        return None

    @property
    def route_note(self) -> str:
        """What the run's inputs mean for what it shows: :data:`IMAGE_ROUTE_NOTE` for an H&E alone
        (no Xenium run), else ""."""
        return "" if (self.results.metadata.get("sample") or {}).get("xenium_dir") else IMAGE_ROUTE_NOTE

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """The maps this run has (of :data:`MAP_KINDS`): predicted; measured and residual when the
        sample measured add-on genes; the interval width when it has intervals at some resolution."""
        kinds = ("predicted",) + (MEASURED_KINDS if self.results.measured_genes else ())
        if self.interval_refusal("tile") is None or self.interval_refusal("token") is None:
            kinds += ("interval",)
        return kinds

    def _require_intervals(self, resolution: str) -> None:
        refusal = self.interval_refusal(resolution)
        if refusal is not None:
            raise InputError(refusal)

    def tile_token_map(self, tile: int, gene: str) -> np.ndarray:
        """(14, 14) float32: the token head's expected log1p count of ``gene`` in each token of one
        tile (results row ``tile``), rows of tokens top to bottom as in the H&E tile."""
        if not 0 <= tile < self.adata.n_obs:
            raise InputError(f"tile {tile} is not in this run (0..{self.adata.n_obs - 1})")
        values = token_head_log1p(self.results, self._column(gene), tile)
        side = int(round(np.sqrt(values.size)))
        return values.reshape(side, side).astype(np.float32)

    @property
    def genes(self) -> list[str]:
        return list(self.results.addon_genes)

    def is_measured(self, gene: str) -> bool:
        return gene in self.results.measured_genes

    def _column(self, gene: str) -> int:
        try:
            return self.results.addon_genes.index(gene)
        except ValueError:
            raise InputError(
                f"{gene!r} is not an add-on gene of this model; pick one of {len(self.genes)} listed"
            ) from None

    def tile_values(self, gene: str, kind: str = "predicted") -> np.ndarray:
        """(tiles,) log1p values of ``gene``: predicted, measured or residual (measured - predicted)."""
        if kind not in MAP_KINDS:
            raise InputError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")
        column = self._column(gene)
        predicted = self.adata.X[:, column]
        if kind == "predicted":
            return predicted
        if kind == "interval":
            self._require_intervals("tile")
            return self.adata.layers["predicted_upper"][:, column] - self.adata.layers["predicted_lower"][:, column]
        if not self.is_measured(gene):
            raise InputError(f"{gene} was not measured in this sample: only its predicted map exists")
        measured = self.adata.layers["measured"][:, column]
        return measured if kind == "measured" else measured - predicted

    def gene_map(self, gene: str, kind: str = "predicted") -> np.ndarray:
        """(rows, cols) float32 stride-grid map of ``gene`` (NaN where no tile); cached per gene and kind."""
        key = (gene, kind)
        if key not in self._maps:
            self._maps[key] = self.grid.stride_map(self.tile_values(gene, kind))
        return self._maps[key]

    def tile_report(self, tile: int, top: int = 10) -> pd.DataFrame:
        """The ``top`` genes of one tile (results row) by predicted value, with measured values (NaN
        if not measured) and, for a calibrated run, the interval's lower and upper bounds."""
        if not 0 <= tile < self.adata.n_obs:
            raise InputError(f"tile {tile} is not in this run (0..{self.adata.n_obs - 1})")
        predicted = np.asarray(self.adata.X[tile], dtype=np.float64)
        order = np.argsort(-predicted, kind="stable")[:top]
        measured = (
            self.adata.layers["measured"][tile] if "measured" in self.adata.layers else np.full_like(predicted, np.nan)
        )
        report = pd.DataFrame({"predicted": predicted[order], "measured": np.asarray(measured, np.float64)[order]},
                              index=pd.Index([self.genes[i] for i in order], name="gene"))
        if self.trust.has_intervals:
            report["lower"] = np.asarray(self.trust.lower[tile], np.float64)[order]
            report["upper"] = np.asarray(self.trust.upper[tile], np.float64)[order]
        return report

    def tile_summary(self, tile: int) -> dict:
        """Tile position and transcript counts for the inspector, and for a calibrated run its
        outlier score and flag (None without)."""
        row, trust = self.results.tiles.iloc[tile], self.trust
        return {"tile_id": int(row["tile_id"]), "row": int(row["row"]), "col": int(row["col"]),
                "um_x": float(row["um_x"]), "um_y": float(row["um_y"]),
                "n_transcripts": int(row["n_transcripts"]), "n_core": int(row["n_core"]),
                "n_addon": int(row["n_addon"]),
                "outlier_score": float(trust.outlier_score[tile]) if trust.has_flags else None,
                "out_of_distribution": bool(trust.outlier_flag[tile]) if trust.has_flags else None}

    def tiles_at_um(self, points_um: np.ndarray) -> np.ndarray:
        """Results row of the tile under each (x, y) point in um, -1 where there is none."""
        return self.grid.tiles_at_global(np.asarray(points_um, dtype=np.float64) / self.xenium_pixel_size_um)

    def tiles_in_polygon_um(self, polygon_um: np.ndarray) -> np.ndarray:
        """Results rows of the tiles whose centre lies inside an (x, y) polygon in um."""
        centres = self.results.tiles[["um_x", "um_y"]].to_numpy(dtype=np.float64)
        return np.flatnonzero(PolygonPath(np.asarray(polygon_um, dtype=np.float64)).contains_points(centres))

    def cluster(self, resolutions=PAPER_RESOLUTIONS, n_pcs: int = PAPER_N_PCS, seed: int = 0) -> list[str]:
        """Run PCA / Leiden / UMAP on the embeddings; returns the obs keys of the clusterings."""
        add_clusters(self.adata, resolutions=resolutions, n_pcs=n_pcs, seed=seed)
        return [leiden_key(r) for r in resolutions]

    @property
    def has_clusters(self) -> bool:
        return "X_umap" in self.adata.obsm


def explore_run(results_path: str | Path) -> RunExplorer:
    """Open a finished results store for exploring: AnnData, stride grid and per-gene metrics."""
    results = open_results(results_path)
    return explore_results(results)


def partial_results(store_path: str | Path) -> Results | None:
    """The finished chunks of a run still writing ``store_path`` (its ``.partial`` folder), unfinished
    tiles as NaN; None before the run has written its tile table. See inference/store.py for the layout."""
    import zarr

    from napari_morphomol.inference import partial_path
    from napari_morphomol.inference.store import ATTRS_KEY, results_from_group

    path = partial_path(store_path)
    try:
        root = zarr.open_group(path, mode="r")
        return results_from_group(path, root, dict(root.attrs[ATTRS_KEY]))
    except (FileNotFoundError, KeyError, ValueError):
        return None


def explore_results(results: Results) -> RunExplorer:
    return RunExplorer(results, tiles_anndata(results), StrideGrid.from_results(results), gene_metrics(results),
                       results.frame_pixel_size_um)
