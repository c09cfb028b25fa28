"""Open a sample (Xenium folder, sample folder, SpatialData .zarr or H&E image) and summarise it."""

from __future__ import annotations

import json

NAME = "info"
HELP = "summarise a sample: image sizes (px, um), pixel sizes, transcripts, genes"


def add_arguments(parser):
    parser.add_argument("path", help="a Xenium output folder, a sample folder, a .zarr, or an H&E image")
    parser.add_argument("--he", help="H&E image to add to a Xenium folder (OME-TIFF/SVS/TIFF)")
    parser.add_argument("--alignment", help="he_imagealignment.csv: 3x3 matrix, H&E px -> Xenium morphology px")
    parser.add_argument("--he-pixel-size-um", type=float, help="H&E um/px when the file does not record it")


def run(args) -> int:
    from napari_morphomol.io.sample import load_sample, open_sample, summarize_sample
    if args.he or args.alignment:
        sdata = load_sample(args.path, args.he, args.alignment, he_pixel_size_um=args.he_pixel_size_um)
    else:
        sdata = open_sample(args.path, he_pixel_size_um=args.he_pixel_size_um)
    print(json.dumps(summarize_sample(sdata), indent=2, default=str))
    return 0
