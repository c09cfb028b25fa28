"""Write a synthetic H&E + Xenium sample with known ground truth into a new folder.

The folder gets xenium/ (a Xenium bundle spatialdata-io reads unchanged), he_image.ome.tif,
he_imagealignment.csv, he_keypoints.csv, panel.json, ground_truth.json and
ground_truth_cells.parquet. The same seed always gives the same sample.

With --scale-transcripts, --scale-grid or --scale-size-mm it writes a slide-scale sample instead:
a block (--size-mm, default 2 x 2 mm, or --block) repeated on a grid, in minutes, without cell
segmentation (synthetic.write_scale_sample).
"""

from __future__ import annotations

import resource
import sys

from napari_morphomol.commands._arguments import real_number, whole_number
from napari_morphomol.errors import InputError

NAME = "synth"
HELP = "write a synthetic Xenium bundle + H&E sample with ground truth (for tests and demos)"


def add_arguments(parser):
    parser.add_argument("out_dir", help="new (or empty) folder to create")
    parser.add_argument("--size-mm", type=real_number(0.0, 30.0, open_minimum=True, unit="mm"), nargs=2,
                        default=None, metavar=("W", "H"),
                        help="section size in mm (default 1 1; of a scale sample's block: 2 2)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="random seed (default 0)")
    parser.add_argument("--core-genes", type=whole_number(1, 20_000), default=380, help="core panel size (default 380)")
    parser.add_argument("--addon-genes", type=whole_number(1, 20_000), default=100,
                        help="add-on panel size (default 100)")
    parser.add_argument("--he-pixel-size-um", type=real_number(0.05, 5.0, unit="um/px"), default=0.2737,
                        help="H&E pixel size in um/px (default 0.2737)")
    parser.add_argument("--no-deformation", action="store_true", help="H&E placed by an affine only (no local warp)")
    shift = parser.add_argument_group("dataset shift",
                                      "make a sample unlike the cohort (for out-of-distribution checks)")
    shift.add_argument("--stain", choices=("cohort", "unseen"), default=None,
                       help="unseen: an H&E protocol no cohort sample has (default cohort)")
    shift.add_argument("--tissue", choices=("cohort", "sarcomatoid"), default=None,
                       help="sarcomatoid: spindle tumour cells no cohort tumour has (default cohort)")
    shift.add_argument("--tissue-region-um", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                       help="apply --tissue only inside this box of the section, in um (default everywhere)")
    shift.add_argument("--registration-offset-um", type=float, nargs=2, metavar=("DX", "DY"), default=None,
                       help="write he_imagealignment.csv off by this shift, in um (default 0 0)")
    scale = parser.add_argument_group(
        "scale sample", "a block repeated on a grid (no cells; H&E at 0.2732 um/px, no warp); give one of the "
                        "first three")
    scale_size = scale.add_mutually_exclusive_group()
    scale_size.add_argument("--scale-transcripts", type=real_number(0.0, open_minimum=True), metavar="N",
                            help="at least N transcripts, e.g. 300e6")
    scale_size.add_argument("--scale-grid", type=whole_number(1), nargs=2, metavar=("COLUMNS", "ROWS"),
                            help="copies of the block's cell across and down")
    scale_size.add_argument("--scale-size-mm", type=real_number(0.0, open_minimum=True, unit="mm"), nargs=2,
                            metavar=("W", "H"), help="section size in mm (the nearest grid)")
    scale.add_argument("--block", metavar="DIR",
                       help="repeat this block (written with axis-aligned placement, e.g. by an earlier scale run's "
                            "block/) instead of writing one")
    scale.add_argument("--dapi-compression", choices=("jpeg2000", "deflate"), default=None,
                       help="DAPI codec: lossless JPEG 2000 as Xenium ships it (default) or deflate (faster to read)")


_SECTION_ONLY = {"stain": "--stain", "tissue": "--tissue", "tissue_region_um": "--tissue-region-um",
                 "registration_offset_um": "--registration-offset-um"}
"""The dataset shift of a sample written section by section, which a scale sample (a block
repeated) does not take."""
_SCALE_ONLY = {"block": "--block", "dapi_compression": "--dapi-compression"}
"""Options of a scale sample only."""


def run(args) -> int:
    scale = args.scale_transcripts is not None or args.scale_grid is not None or args.scale_size_mm is not None
    for name, flag in (_SECTION_ONLY if scale else _SCALE_ONLY).items():
        if getattr(args, name) is not None:
            raise InputError(
                (f"{flag} does not apply to a scale sample (--scale-*): leave it out, or drop the --scale-* option "
                 "to write a sample section by section") if scale else
                (f"{flag} applies only to a scale sample: add --scale-transcripts, --scale-grid or --scale-size-mm, "
                 "or leave it out"))
    if scale:
        return _run_scale(args)
    from napari_morphomol.synthetic import write_synthetic_sample
    from napari_morphomol.synthetic.plan import DatasetShift
    region = None if args.tissue_region_um is None else tuple(args.tissue_region_um)
    shift = DatasetShift(args.stain or "cohort", args.tissue or "cohort", region,
                         tuple(args.registration_offset_um or (0.0, 0.0)))
    sample = write_synthetic_sample(
        args.out_dir,
        size_mm=tuple(args.size_mm or (1.0, 1.0)),
        seed=args.seed,
        n_core_genes=args.core_genes,
        n_addon_genes=args.addon_genes,
        he_pixel_size_um=args.he_pixel_size_um,
        deformation=not args.no_deformation,
        shift=shift,
        progress=lambda message: print(f"  {message}", file=sys.stderr),
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = sample.summary
    print(f"wrote {sample.root}")
    print(f"  cells:        {s.n_cells:,}")
    print(f"  transcripts:  {s.n_transcripts:,} "
          f"({s.n_transcripts / s.transcript_seconds:,.0f} transcripts/s in the transcript stage)")
    print(f"  morphology:   {s.morphology_shape[1]} x {s.morphology_shape[0]} px at 0.2125 um/px")
    print(f"  H&E:          {s.he_shape[1]} x {s.he_shape[0]} px at {args.he_pixel_size_um} um/px")
    print(f"  time:         {s.seconds:.1f} s wall, {s.cpu_seconds:.1f} s CPU "
          f"({s.n_transcripts / s.seconds:,.0f} transcripts/s overall)")
    print(f"  peak RSS:     {peak_mb:,.0f} MB")
    return 0


def _run_scale(args) -> int:
    from napari_morphomol.synthetic import write_scale_sample

    sample = write_scale_sample(
        args.out_dir,
        n_transcripts=args.scale_transcripts,
        grid=args.scale_grid,
        size_mm=args.scale_size_mm,
        block_dir=args.block,
        block_size_mm=tuple(args.size_mm or (2.0, 2.0)),
        seed=args.seed,
        n_core_genes=args.core_genes,
        n_addon_genes=args.addon_genes,
        dapi_compression=args.dapi_compression or "jpeg2000",
        progress=lambda message: print(f"  {message}", file=sys.stderr),
    )
    width_um, height_um = sample.size_um
    print(f"wrote {sample.root} (block: {sample.block_root})")
    print(f"  grid:         {sample.grid[0]} x {sample.grid[1]} copies of a {sample.pitch_um[0]:.1f} x "
          f"{sample.pitch_um[1]:.1f} um cell")
    print(f"  section:      {width_um / 1000:.2f} x {height_um / 1000:.2f} mm, no cell segmentation")
    print(f"  transcripts:  {sample.n_transcripts:,} ({sample.n_transcripts / sample.seconds:,.0f} transcripts/s)")
    print(f"  time:         {sample.seconds:.1f} s wall")
    return 0
