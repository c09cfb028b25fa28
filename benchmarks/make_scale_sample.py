"""Write a slide-scale sample (synthetic.write_scale_sample) and print its time and size on disk.

A scale sample is one 2 x 2 mm synthetic block repeated on a grid (docs/synthetic.md). It is
written outside the repository: into --out, by default $MORPHOMOL_BENCH_DIR/NAME, else
/tmp/morphomol-scale/NAME. The block is written once beside it (BLOCK_NAME) and reused by later
runs (--block gives another). Baselines measured in the same run, as the machine is shared: the
generator's own rate (write_synthetic_sample of a 0.5 mm sample, transcripts/s) and the disk's bare
write rate (256 MB written and fsynced); the scale writer's rates are printed as ratios of them.
Usage:
    python benchmarks/make_scale_sample.py --transcripts 300e6 --name t300M
    python benchmarks/make_scale_sample.py --size-mm 10 10 --name cm1
    python benchmarks/make_scale_sample.py --grid 2 2 --out /somewhere/new
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from napari_morphomol.synthetic import write_scale_sample, write_synthetic_sample
from napari_morphomol.synthetic.bundle import MORPHOLOGY_FOCUS
from napari_morphomol.synthetic.scale import SCALE_HE_PIXEL_SIZE_UM

REPO = Path(__file__).resolve().parents[1]
BLOCK_NAME = "block-2mm-seed0"


def bench_dir() -> Path:
    return Path(os.environ.get("MORPHOMOL_BENCH_DIR", "/tmp/morphomol-scale"))


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (as du counts them)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def generator_rate(parent: Path) -> float:
    """Transcripts/s of write_synthetic_sample on a 0.5 mm block (the generator's own rate, this run)."""
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        sample = write_synthetic_sample(Path(tmp) / "s", size_mm=(0.5, 0.5), deformation=False, axis_aligned=True,
                                        he_pixel_size_um=SCALE_HE_PIXEL_SIZE_UM)
    return sample.summary.n_transcripts / sample.summary.seconds


def disk_rate(parent: Path, n_bytes: int = 256 << 20) -> float:
    """Bytes/s of writing ``n_bytes`` and fsyncing them, here."""
    chunk = os.urandom(8 << 20)
    with tempfile.NamedTemporaryFile(dir=parent) as f:
        start = time.perf_counter()
        for _ in range(n_bytes // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        return n_bytes / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--transcripts", type=float, help="at least this many transcripts (e.g. 300e6)")
    what.add_argument("--grid", type=int, nargs=2, metavar=("COLUMNS", "ROWS"), help="copies of the block's cell")
    what.add_argument("--size-mm", type=float, nargs=2, metavar=("W", "H"), help="section size in mm (nearest grid)")
    parser.add_argument("--name", default="scale", help="folder name under the bench folder (default scale)")
    parser.add_argument("--out", type=Path, help="new folder to write (default: the bench folder / NAME)")
    parser.add_argument("--dapi-compression", choices=("jpeg2000", "deflate"), default="jpeg2000",
                        help="DAPI codec (default jpeg2000, as Xenium ships it)")
    parser.add_argument("--block", type=Path, help=f"block sample to repeat (default: bench folder / {BLOCK_NAME}, "
                                                   "written there first when missing)")
    args = parser.parse_args()
    out = (args.out or bench_dir() / args.name).absolute()
    if out.is_relative_to(REPO):
        parser.error(f"{out} is inside the repository: write scale samples elsewhere (--out or $MORPHOMOL_BENCH_DIR)")
    out.parent.mkdir(parents=True, exist_ok=True)
    block = (args.block or out.parent / BLOCK_NAME).absolute()
    if not block.exists():
        start = time.perf_counter()
        write_synthetic_sample(block, size_mm=(2.0, 2.0), seed=0, deformation=False, axis_aligned=True,
                               he_pixel_size_um=SCALE_HE_PIXEL_SIZE_UM)
        print(f"block {block} written in {time.perf_counter() - start:.1f} s")

    gen_rate, io_rate = generator_rate(out.parent), disk_rate(out.parent)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    sample = write_scale_sample(out, n_transcripts=args.transcripts, grid=args.grid, size_mm=args.size_mm,
                                block_dir=block, dapi_compression=args.dapi_compression,
                                progress=lambda message: print(f"  {message}", flush=True))
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    parts = {
        "transcripts.parquet": disk_bytes(sample.xenium_dir / "transcripts.parquet"),
        "DAPI (morphology_focus)": disk_bytes(sample.xenium_dir / MORPHOLOGY_FOCUS),
        "H&E": disk_bytes(sample.he_path),
    }
    total = disk_bytes(sample.root)
    rate = sample.n_transcripts / wall
    width_um, height_um = sample.size_um
    print(f"wrote {sample.root}")
    print(f"  grid:          {sample.grid[0]} x {sample.grid[1]} copies of {sample.transcripts_per_copy:,} transcripts "
          f"({sample.pitch_um[0]:.1f} um pitch)")
    print(f"  section:       {width_um / 1000:.2f} x {height_um / 1000:.2f} mm = {width_um * height_um / 1e8:.2f} cm^2")
    print(f"  transcripts:   {sample.n_transcripts:,}")
    print(f"  time:          {wall:.1f} s wall, {cpu:.1f} s CPU; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    print(f"  rate:          {rate / 1e6:.2f} M transcripts/s = {rate / gen_rate:.0f} x the generator's "
          f"{gen_rate / 1e6:.3f} M/s (0.5 mm sample, this run)")
    print(f"  bytes out:     {total / wall / 1e6:.0f} MB/s = {total / wall / io_rate:.2f} x the disk's bare "
          f"{io_rate / 1e6:.0f} MB/s (this run)")
    for name, n in parts.items():
        print(f"  {name + ':':<25}{n / 1e9:8.2f} GB")
    print(f"  {'total on disk:':<25}{total / 1e9:8.2f} GB")


if __name__ == "__main__":
    main()
