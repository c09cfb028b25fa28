"""Cut the model's tiles from an H&E image registered to a Xenium run, and count their transcripts.

Tiles are 512 px at 0.5 um/px (stride 256) in H&E space, kept on tissue, optionally inside a
region, and with at least --min-transcripts core + add-on transcripts (qv >= 20, no controls).
Writes TILES.zarr: the tile table, the 14 x 14-per-tile token raster of core-gene counts and
the add-on targets (sums per tile, and per stride square for maps).
"""

from __future__ import annotations

import argparse
import json
import sys

from napari_morphomol.commands._arguments import fraction, real_number, whole_number
from napari_morphomol.commands._sample_inputs import (
    add_sample_arguments,
    input_paths,
    region_polygon_he_px,
    sample_paths,
)

NAME = "tiles"
HELP = "tile grid, core-gene token raster and add-on targets -> TILES.zarr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sample_arguments(parser, region_action="keep")
    parser.add_argument("--panel", metavar="FILE",
                        help='JSON {"core": [...], "addon": [...]}; default: every gene core, no add-on')
    parser.add_argument("--out", required=True, metavar="TILES.zarr", help="output store (written atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is a tiles store written by napari-morphomol")
    parser.add_argument("--tile-px", type=whole_number(14), default=512,
                        help="tile size in px at --tile-pixel-size-um (default 512)")
    parser.add_argument("--stride-px", type=whole_number(1), default=256, help="tile stride in px (default 256)")
    parser.add_argument("--tile-pixel-size-um", "--tile-mpp", dest="tile_pixel_size_um",
                        type=real_number(0.0, open_minimum=True, unit="um/px"), default=0.5,
                        help="tile pixel size, um/px (default 0.5; --tile-mpp is the same option)")
    parser.add_argument("--max-background", type=fraction, default=0.3,
                        help="largest background fraction of a kept tile, 0 to 1 (default 0.3)")
    parser.add_argument("--min-transcripts", type=whole_number(0), default=1000,
                        help="fewest core + add-on transcripts of a kept tile; 0 keeps all (default 1000)")
    parser.add_argument("--min-qv", type=real_number(0.0, unit="(Phred)"), default=20.0,
                        help="lowest transcript qv counted (default 20)")


def run(args: argparse.Namespace) -> int:
    from napari_morphomol._atomic import guard_output
    from napari_morphomol.io.sample import load_sample
    from napari_morphomol.registration import read_registration_json
    from napari_morphomol.tiling import TILES_STORE, GenePanel, TileSpec, TilingOptions, tile_sample, write_tiles_zarr

    _, _, alignment = sample_paths(args)
    inputs = input_paths(args, alignment)
    out = guard_output(args.out, TILES_STORE, inputs=inputs, overwrite=args.overwrite)
    registration = read_registration_json(args.registration) if args.registration else None
    panel = GenePanel.from_json(args.panel) if args.panel else None
    sdata = load_sample(args.xenium_dir, args.he, alignment, he_pixel_size_um=args.he_pixel_size_um)

    def progress(done: int, total: int) -> None:
        print(f"\rbinning transcripts: partition {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
              flush=True)

    options = TilingOptions(
        spec=TileSpec(tile_px=args.tile_px, stride_px=args.stride_px, tile_pixel_size_um=args.tile_pixel_size_um),
        max_background=args.max_background, min_transcripts=args.min_transcripts, min_qv=args.min_qv,
        region_he_px=region_polygon_he_px(args.region),
    )
    tiling = tile_sample(sdata, panel=panel, he_to_global=registration, options=options, progress=progress)
    provenance = {"xenium_dir": str(args.xenium_dir), "he": str(args.he), "alignment": alignment,
                  "registration": args.registration, "panel": args.panel}
    write_tiles_zarr(tiling, out, overwrite=args.overwrite, provenance=provenance, inputs=inputs)
    report = tiling.report
    print(f"{report['kept_tiles']} tiles kept of {report['grid_tiles']} in the grid "
          f"({report['tissue_tiles']} on tissue; transcript filter: {report['transcript_filter']['kept']} kept, "
          f"{report['transcript_filter']['dropped']} dropped)")
    print("transcripts: " + json.dumps(report["transcripts"]))
    print(f"wrote {out}")
    return 0
