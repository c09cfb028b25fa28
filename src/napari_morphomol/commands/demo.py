"""The whole path on the embedded default: a synthetic Xenium + H&E sample, loaded as one
SpatialData sample, the shipped early-fusion model run over it tile by tile, clusters of the
tile embeddings, export to AnnData (tiles and, with a token-head model, cells) and SpatialData,
a screenshot of the product in napari (MKI67 predicted over the H&E, the Explore dock with the
clusters' legend and the metrics), one of MKI67 at tile and token resolution, and one of its
interval width with the tiles flagged out of distribution (the sample's right 30 % is a
sarcomatoid tumour, a tissue the shipped model never saw). Then the same slide's H&E alone, as
for a slide that never saw a Xenium run: the shipped model predicts from the image, and a
screenshot shows MKI67 by both routes side by side.

Everything goes into --out; running it again reuses the sample and the finished prediction and
rewrites the exported files."""

from __future__ import annotations

import json
import time

from napari_morphomol.commands._arguments import real_number, whole_number

DEMO_GENE = "MKI67"
"""A gene no core gene shows (proliferation, read from the H&E): its token map is the model's own."""
SARCOMATOID_FRACTION = 0.3
"""The demo sample's right 30 % holds a sarcomatoid tumour (spindle cells no training sample had),
so the shipped model's out-of-distribution flag has something to find."""
NAME = "demo"
HELP = "run the whole path on a synthetic sample: load, predict, cluster, export, screenshot"


def add_arguments(parser):
    parser.add_argument("--out", default="morphomol-demo", help="output folder (default: ./morphomol-demo)")
    parser.add_argument("--size-mm", nargs=2, type=real_number(0.0, 30.0, open_minimum=True, unit="mm"),
                        default=(1.0, 1.0), metavar=("W", "H"), help="synthetic tissue size in mm (default: 1 1)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="synthetic sample seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu or cuda")


def _step(message: str, start: float) -> float:
    now = time.perf_counter()
    print(f"  {message} ({now - start:.1f} s)", flush=True)
    return now


def run(args) -> int:
    from napari_morphomol._atomic import guard_output_folder
    from napari_morphomol.export.writers import export_results
    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io.sample import open_sample, summarize_sample
    from napari_morphomol.synthetic import write_synthetic_sample
    from napari_morphomol.synthetic.plan import DatasetShift
    out = guard_output_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample_dir = out / f"sample-{args.size_mm[0]:g}x{args.size_mm[1]:g}mm-seed{args.seed}-sarcomatoid-right"
    start = time.perf_counter()
    if sample_dir.exists():
        print(f"1. reusing the synthetic sample in {sample_dir}")
    else:
        print(f"1. writing a synthetic {args.size_mm[0]:g} x {args.size_mm[1]:g} mm sample to {sample_dir}")
        width_um, height_um = (1000.0 * size for size in args.size_mm)
        shift = DatasetShift(tissue="sarcomatoid",
                             tissue_region_um=((1 - SARCOMATOID_FRACTION) * width_um, 0.0, width_um, height_um))
        write_synthetic_sample(sample_dir, size_mm=tuple(args.size_mm), seed=args.seed, shift=shift)
    start = _step("sample ready", start)

    sdata = open_sample(sample_dir)
    print("2. loaded as one SpatialData sample:")
    print(json.dumps(summarize_sample(sdata), indent=2, default=str))
    start = _step("loaded", start)

    results = out / "results.zarr"
    print(f"3. predicting the add-on panel with the shipped model into {results}")
    predict(sdata, PredictOptions(store=results, device=args.device),
            progress=lambda done, total: print(f"  chunk {done}/{total}", flush=True))
    start = _step("predicted", start)

    print("4. clusters (PCA, Leiden 0.5 / 1.0, UMAP) and export")
    from napari_morphomol.analysis import explore_run

    explorer = explore_run(results)
    cells = out / "cells.h5ad" if explorer.has_token_maps else None
    written = export_results(results, h5ad=out / "tiles.h5ad", spatialdata=out / "sample.zarr",
                             overwrite=True, clusters=True, sample=sdata, cells_h5ad=cells)
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    start = _step("exported", start)

    from napari_morphomol.widgets.screenshot import screenshot_maps, screenshot_product, screenshot_trust

    gene = DEMO_GENE if DEMO_GENE in explorer.genes else explorer.genes[0]
    shot = screenshot_product(sdata, explorer, gene, out / "screenshot.png")
    start = _step(f"{gene} predicted over the H&E, with the Explore dock, in napari: {shot}", start)
    if explorer.has_token_maps:
        gene = DEMO_GENE if DEMO_GENE in explorer.genes else explorer.genes[0]
        maps = screenshot_maps(explorer, gene, out / "token_maps.png")
        start = _step(f"{gene} at tile and token resolution in napari: {maps}", start)
    trust = explorer.trust
    if trust.has_flags and trust.has_intervals:
        gene = DEMO_GENE if DEMO_GENE in explorer.genes else explorer.genes[0]
        shot = screenshot_trust(explorer, gene, out / "trust.png")
        _step(f"{int(trust.outlier_flag.sum())} of {len(trust.outlier_flag)} tiles out of distribution; {gene} with "
              f"its {trust.level:.0%} interval width and the flagged tiles in napari: {shot}", start)
    else:
        print(f"  {trust.unavailable or 'the model gives no tile intervals'}")
    _he_alone(sdata, explorer, out, args.device)
    return 0


def _he_alone(sdata, explorer, out, device: str) -> None:
    """Step 5: the sample's H&E alone through the image-only route, and both routes' maps side by side."""
    from napari_morphomol.analysis import explore_run
    from napari_morphomol.elements import sample_info
    from napari_morphomol.errors import InputError
    from napari_morphomol.inference import PredictOptions, predict
    from napari_morphomol.io.sample import load_sample
    from napari_morphomol.widgets.screenshot import screenshot_routes

    start = time.perf_counter()
    results = out / "results-he-alone.zarr"
    print(f"5. the same slide's H&E alone (no Xenium run), predicted from the image into {results}")
    he_alone = load_sample(he_path=sample_info(sdata).he_path)
    try:
        predict(he_alone, PredictOptions(store=results, device=device))
    except InputError as exc:
        print(f"  {exc}")
        return
    start = _step("predicted from the H&E alone", start)
    he_explorer = explore_run(results)
    gene = DEMO_GENE if DEMO_GENE in explorer.genes else explorer.genes[0]
    shot = screenshot_routes({"H&E + Xenium": explorer, "H&E alone": he_explorer}, gene, out / "routes.png")
    _step(f"{gene} from H&E + Xenium and from the H&E alone, side by side in napari: {shot}", start)
