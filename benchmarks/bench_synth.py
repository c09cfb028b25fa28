"""Synthetic sample generator: transcripts/s written, total time and peak memory per size.

Each size runs in a fresh subprocess (so peak RSS is that size's own). As a baseline measured
in the same run, the 1 mm sample's transcripts.parquet is re-encoded with plain pyarrow (read,
then written with the same settings): the generator's transcript rate is printed as a ratio of
that bare I/O rate. CPU seconds are printed beside wall seconds because the machine is shared.
Usage:
    python benchmarks/bench_synth.py [--sizes-mm 1 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys
from napari_morphomol.synthetic import write_synthetic_sample
sample = write_synthetic_sample(sys.argv[1], size_mm=(float(sys.argv[2]),) * 2, seed=0)
print(json.dumps({**sample.summary.__dict__, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_size(out: Path, size_mm: float) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), str(size_mm)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parquet_baseline(path: Path) -> tuple[int, float]:
    """Transcripts/s of pyarrow alone re-encoding the same file (read + write, row group by row group)."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        writer = None
        for i in range(source.num_row_groups):
            table = source.read_row_group(i)
            if writer is None:
                writer = pq.ParquetWriter(Path(tmp) / "t.parquet", table.schema,
                                          compression="zstd", compression_level=1)
            writer.write_table(table)
        writer.close()
    return source.metadata.num_rows, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mm", type=float, nargs="+", default=[1.0])
    parser.add_argument("--keep", type=Path, help="write samples here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        base = Path(tmp)
        print(f"{'size':>8} {'cells':>10} {'transcripts':>13} {'wall s':>8} {'cpu s':>8} "
              f"{'tx wall/s':>11} {'tx cpu/s':>11} {'all wall/s':>11} {'peak RSS':>9}")
        results = {}
        for size in args.sizes_mm:
            r = run_size(base / f"sample_{size:g}mm", size)
            results[size] = r
            n = r["n_transcripts"]
            print(
                f"{size:>5g} mm {r['n_cells']:>10,} {n:>13,} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f}"
                f" {n / r['transcript_seconds']:>11,.0f} {n / r['transcript_cpu_seconds']:>11,.0f}"
                f" {n / r['seconds']:>11,.0f} {r['peak_rss_mb']:>7,.0f} MB",
                flush=True,
            )
        first = min(results)
        n, seconds = parquet_baseline(base / f"sample_{first:g}mm" / "xenium" / "transcripts.parquet")
        bare = n / seconds
        gen = results[first]["n_transcripts"] / results[first]["transcript_seconds"]
        print(f"baseline: pyarrow re-encoding the {first:g} mm transcripts.parquet: {bare:,.0f} transcripts/s")
        print(f"generator transcript stage / bare parquet I/O: {gen / bare:.2f}")


if __name__ == "__main__":
    main()
