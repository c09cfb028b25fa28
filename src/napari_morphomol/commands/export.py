"""Export a prediction run (RESULTS.zarr from `morphomol predict`) to AnnData and SpatialData.

--h5ad: tiles as observations, predicted add-on expression (log1p) as X, measured counts (log1p)
in layers['measured'], tile centres in obsm['spatial'] (Xenium morphology px; H&E um for a run
of an H&E alone), embeddings, PCA, UMAP and Leiden clusters (0.5, 1.0) of the embeddings,
per-gene metrics in var, model card and registration in uns. Reads straight into scanpy.

--spatialdata: the tiles as shapes annotated by the table above, the predicted / measured gene
maps as images (one channel per gene), the cells where the run has them, and a coarse overview of
the H&E (about 2 um/px), all placed in the 'global' coordinate system; the store names the sample's
files and refers to them rather than copying them (napari_morphomol.export.open_export reads it
back with the full H&E, DAPI and transcripts). Opens with spatialdata.read_zarr and
napari-spatialdata (the maps over the H&E overview). --self-contained copies the sample's images
and transcripts into the store instead (about the bundle's size).

--cells-h5ad: the Xenium cells as observations (obs indexed by cell_id, cell_area), the
predicted add-on expression per cell from the token map (log1p, area-scaled) as X, measured
counts (log1p) in layers['measured'], centroids (um) in obsm['spatial']; needs a model trained
with --token-head and a run with cell segmentation (cells.parquet).

--qupath: the tiles as QuPath GeoJSON (File > Object data... > Import objects in QuPath, over the
H&E): tile objects in H&E level-0 px with each gene's prediction (and measurement, interval and
outlier score) as measurements and the Leiden clusters as classifications with their colours.

--landmarks: the landmark pairs of the run's registration (Xenium Explorer keypoints CSV, or
BigWarp CSV with --landmark-format bigwarp).

Files are written under a temporary name and renamed when complete. No output may be, hold or
lie inside the results store or the sample's files, nor lie inside a Xenium bundle; an existing
file is replaced only with --overwrite, and only when it is an export napari-morphomol wrote.
"""

from __future__ import annotations

from napari_morphomol.errors import InputError

NAME = "export"
HELP = "write a prediction run as AnnData (.h5ad), SpatialData (.zarr), QuPath GeoJSON and/or landmark CSV"


def add_arguments(parser):
    from napari_morphomol.registration.formats import LANDMARK_FORMATS

    parser.add_argument("results", help="results store written by `morphomol predict` (RESULTS.zarr)")
    parser.add_argument("--h5ad", metavar="OUT.h5ad", help="write an AnnData file here")
    parser.add_argument("--spatialdata", metavar="OUT.zarr", help="write a SpatialData store here")
    parser.add_argument("--landmarks", metavar="OUT.csv", help="write the registration's landmark pairs here")
    parser.add_argument("--cells-h5ad", metavar="CELLS.h5ad",
                        help="write the predictions per Xenium cell here (a model trained with --token-head)")
    parser.add_argument("--qupath", metavar="TILES.geojson",
                        help="write the tiles as QuPath GeoJSON (H&E level-0 px, predictions as measurements)")
    parser.add_argument("--self-contained", action="store_true",
                        help="copy the sample's H&E, DAPI and transcripts into the SpatialData store (about the "
                             "bundle's size) instead of referring to the sample's files")
    parser.add_argument("--landmark-format", choices=LANDMARK_FORMATS, default="xenium",
                        help="landmark CSV flavour (default: xenium, Xenium Explorer keypoints)")
    parser.add_argument("--no-clusters", dest="clusters", action="store_false",
                        help="skip PCA / Leiden / UMAP of the embeddings")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing exports that napari-morphomol wrote (never other files)")


def run(args) -> int:
    from napari_morphomol.export import export_results

    if not (args.h5ad or args.spatialdata or args.landmarks or args.cells_h5ad or args.qupath):
        raise InputError("nothing to export: give --h5ad OUT.h5ad, --spatialdata OUT.zarr, --landmarks OUT.csv, "
                         "--cells-h5ad CELLS.h5ad and/or --qupath TILES.geojson")
    written = export_results(args.results, h5ad=args.h5ad, spatialdata=args.spatialdata, landmarks=args.landmarks,
                             landmark_format=args.landmark_format, overwrite=args.overwrite, clusters=args.clusters,
                             cells_h5ad=args.cells_h5ad, qupath=args.qupath, self_contained=args.self_contained)
    for kind, path in written.items():
        print(f"{kind}: {path.resolve()}")
    return 0
