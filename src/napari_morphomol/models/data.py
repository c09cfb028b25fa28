"""Torch datasets over tiles stores (``morphomol tiles``), with the H&E tiles decoded once.

A tiles store holds the grid, the core-gene token raster and the add-on targets, but no pixels.
Training reads every tile once per epoch, and area-resampling it from the H&E pyramid each time
would cost more than the small models' forward pass, so the 224 px tiles are decoded once with
:class:`napari_morphomol.tiling.LevelSampler` (each H&E chunk decoded once) into a sidecar zarr
beside the store, ``NAME.images.zarr``: ``images`` (tiles, 224, 224, 3) uint8, one chunk per
tile, rows in the store's table order. The sidecar records the tile ids it was cut for, so a
store rewritten later is noticed instead of silently misaligned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import ConcatDataset, Dataset

from napari_morphomol._atomic import atomic_output, guard_output_folder, open_versioned_group, zarr_store_kind
from napari_morphomol.errors import InputError
from napari_morphomol.tiling import GenePanel, LevelSampler, TileSpec, TilesStore, TilingOptions, read_tiles_zarr

IMAGES_ATTRS_KEY = "morphomol_tile_images"
IMAGES_FORMAT_VERSION = 1
TILE_IMAGES = zarr_store_kind("tile image cache", IMAGES_ATTRS_KEY)
_TOKENS_IN_MEMORY_BYTES = 1 << 30
_IMAGES_IN_MEMORY_BYTES = 1 << 28
"""Smaller samples' tiles are read into memory once: decoding one zarr chunk per tile and epoch
costs more than the expression models' whole step (benchmarks/bench_tile_dataset.py: 7x faster
items)."""


def image_cache_path(store_path: str | Path) -> Path:
    """Where the decoded tiles of a store live: ``tiles.zarr`` -> ``tiles.images.zarr``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name.removesuffix(".zarr") + ".images.zarr")


def sample_id_of(path: str | Path) -> str:
    """A sample's id: its folder's name, or its tiles store's name without ``.tiles.zarr``."""
    return Path(path).absolute().name.removesuffix(".zarr").removesuffix(".tiles")


def he_path_of_store(store: TilesStore) -> Path:
    """The H&E file a store was tiled from, as its provenance records it (absolute, relative to
    the working directory, or relative to the store's folder)."""
    recorded = (store.attrs.get("provenance") or {}).get("he")
    if not recorded:
        raise InputError(f"{store.path} does not record its H&E image; pass the H&E file explicitly (he_path=...)")
    for candidate in (Path(recorded), store.path.parent / recorded):
        if candidate.is_file():
            return candidate.absolute()
    raise InputError(
        f"{store.path} was tiled from {recorded}, which is not found (from here or beside the store); "
        "pass the H&E file explicitly (he_path=... / --he)"
    )


def he_levels_yxc_of_file(he_path: str | Path) -> list:
    """The RGB levels (y, x, 3) of an H&E pyramid file, lazily."""
    from napari_morphomol.elements import levels_yxc
    from napari_morphomol.io.he_image import read_pyramid, rgb_levels_cyx

    return levels_yxc(rgb_levels_cyx(read_pyramid(he_path)))


def write_tile_images(
    store: TilesStore,
    *,
    he_path: str | Path | None = None,
    out_path: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Decode the store's tiles from the H&E pyramid into the sidecar (atomically); returns its path."""
    out = Path(out_path) if out_path is not None else image_cache_path(store.path)
    he_path = Path(he_path) if he_path is not None else he_path_of_store(store)
    sampler = LevelSampler(store.geometry, he_levels_yxc_of_file(he_path))
    n_tiles, size = len(store.tiles), store.geometry.image_px
    with atomic_output(out, TILE_IMAGES, inputs=(store.path, he_path), overwrite=overwrite) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        root.attrs[IMAGES_ATTRS_KEY] = {
            "format_version": IMAGES_FORMAT_VERSION,
            "tile_ids": [int(t) for t in store.tiles["tile_id"]],
            "he_path": str(he_path),
            "pyramid_level": int(sampler.level),
            "geometry": store.geometry.to_dict(),
        }
        images = root.create_array("images", shape=(n_tiles, size, size, 3), dtype=np.uint8,
                                   chunks=(1, size, size, 3), dimension_names=("tile", "y", "x", "rgb"))
        done = 0
        for positions, batch in sampler.iter_tiles(store.tiles["row"].to_numpy(), store.tiles["col"].to_numpy()):
            for position, image in zip(positions, batch, strict=True):
                images[int(position)] = image
            done += len(positions)
            if progress is not None:
                progress(done, n_tiles)
    return out


def open_tile_images(store: TilesStore, path: str | Path) -> zarr.Array:
    """The sidecar's ``images`` array, checked against the store's tiles."""
    path = Path(path)
    root, attrs = open_versioned_group(path, IMAGES_ATTRS_KEY, IMAGES_FORMAT_VERSION, "tile image cache",
                                       "delete it and let it be rebuilt")
    if "images" not in root:
        raise InputError(f"{path} is a tile image cache without its images; delete it and let it be rebuilt")
    images = root["images"]
    if attrs.get("tile_ids") != [int(t) for t in store.tiles["tile_id"]]:
        raise InputError(
            f"{path} was cut for other tiles than {store.path} now holds (the store was rewritten); "
            "rebuild it (overwrite=True / --overwrite)"
        )
    return images


class TileDataset(Dataset):
    """The tiles of one store as the models' items: ``image`` uint8 (3, 224, 224), ``tokens``
    float32 (196, G_core) raw counts, ``target`` float32 (G_add,) log1p tile sums,
    ``token_target`` float32 (196, G_add) raw add-on counts per token (they sum to the tile's
    counts), ``sample_id``.

    ``core_genes`` / ``addon_genes`` reorder (or select) the store's genes, e.g. to a model's
    panel; every named gene must be in the store.
    """

    def __init__(
        self,
        store: TilesStore,
        images: zarr.Array,
        *,
        sample_id: str,
        core_genes: Sequence[str] | None = None,
        addon_genes: Sequence[str] | None = None,
    ) -> None:
        if images.shape[0] != len(store.tiles):
            raise InputError(f"the image cache has {images.shape[0]} tiles, the store {store.path} {len(store.tiles)}")
        self.store = store
        self.sample_id = str(sample_id)
        self.core_genes = list(store.core_genes if core_genes is None else core_genes)
        self.addon_genes = list(store.addon_genes if addon_genes is None else addon_genes)
        self._core_index = _gene_index(store.core_genes, self.core_genes, "core", store.path)
        self._addon_index = _gene_index(store.addon_genes, self.addon_genes, "add-on", store.path)
        self._images = images[...] if images.nbytes <= _IMAGES_IN_MEMORY_BYTES else images
        tokens, addon_tokens = store.tokens, store.addon_tokens
        self._tokens = tokens[...] if tokens.nbytes <= _TOKENS_IN_MEMORY_BYTES else tokens
        self._addon_tokens = addon_tokens[...] if addon_tokens.nbytes <= _TOKENS_IN_MEMORY_BYTES else addon_tokens
        self._targets = np.asarray(store.targets_log1p[...])[:, self._addon_index]
        geometry = store.geometry
        self._stride, self._side = geometry.stride_tokens, geometry.tokens_per_side
        self._rows = store.tiles["row"].to_numpy()
        self._cols = store.tiles["col"].to_numpy()

    @classmethod
    def from_store(
        cls,
        store_path: str | Path,
        *,
        sample_id: str | None = None,
        he_path: str | Path | None = None,
        images_path: str | Path | None = None,
        core_genes: Sequence[str] | None = None,
        addon_genes: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> TileDataset:
        """Open a tiles store; decode its tiles into the sidecar first if they are not cached yet."""
        store = read_tiles_zarr(store_path)
        cache = Path(images_path) if images_path is not None else image_cache_path(store.path)
        if not cache.exists():
            write_tile_images(store, he_path=he_path, out_path=cache, progress=progress)
        name = sample_id if sample_id is not None else sample_id_of(store.path)
        return cls(store, open_tile_images(store, cache), sample_id=name, core_genes=core_genes,
                   addon_genes=addon_genes)

    def __len__(self) -> int:
        return len(self._rows)

    def tile_tokens(self, position: int) -> np.ndarray:
        """(14, 14, G_core) uint32 counts of the tile at table ``position``, in this dataset's gene order."""
        return self._window(self._tokens, position)[..., self._core_index]

    def tile_addon_tokens(self, position: int) -> np.ndarray:
        """(14, 14, G_add) uint32 per-token add-on counts of the tile, in this dataset's gene order."""
        return self._window(self._addon_tokens, position)[..., self._addon_index]

    def _window(self, raster, position: int) -> np.ndarray:
        s, t = self._stride, self._side
        i, j = int(self._rows[position]), int(self._cols[position])
        return np.asarray(raster[s * i:s * i + t, s * j:s * j + t])

    def __getitem__(self, position: int) -> dict:
        if not -len(self) <= position < len(self):
            raise IndexError(f"tile {position} of {len(self)}")
        position = position % len(self)
        image = np.asarray(self._images[position])
        n_tokens = self._side * self._side
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "tokens": torch.from_numpy(self.tile_tokens(position).reshape(n_tokens, -1).astype(np.float32)),
            "target": torch.from_numpy(self._targets[position].copy()),
            "token_target": torch.from_numpy(self.tile_addon_tokens(position).reshape(n_tokens, -1).astype(np.float32)),
            "sample_id": self.sample_id,
        }


def _gene_index(available: Sequence[str], wanted: Sequence[str], what: str, path: Path) -> np.ndarray:
    position = {g: k for k, g in enumerate(available)}
    missing = [g for g in wanted if g not in position]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise InputError(f"{path} lacks {len(missing)} {what} genes of the panel asked for: {shown}")
    return np.array([position[g] for g in wanted], dtype=np.int64)


class CohortDataset(ConcatDataset):
    """Tiles of several samples in one gene order (the first sample's, unless given)."""

    def __init__(self, samples: Sequence[TileDataset]) -> None:
        if not samples:
            raise InputError("no samples given")
        names = [s.sample_id for s in samples]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"sample ids must be unique (splits are by sample), repeated: {', '.join(twice)}")
        first = samples[0]
        for other in samples[1:]:
            if (other.core_genes, other.addon_genes) != (first.core_genes, first.addon_genes):
                raise InputError(
                    f"sample {other.sample_id} has another gene panel than {first.sample_id}; "
                    "open every store with the same core_genes and addon_genes"
                )
            if _scale(other.store.geometry) != _scale(first.store.geometry):
                raise InputError(
                    f"sample {other.sample_id} was tiled at another scale than {first.sample_id} "
                    f"({_scale(other.store.geometry)} vs {_scale(first.store.geometry)}); tile both alike"
                )
        super().__init__(samples)
        self.samples = list(samples)
        self.core_genes, self.addon_genes = first.core_genes, first.addon_genes

    def tile_spec(self) -> TileSpec:
        """How these tiles were cut: the tile geometry of a model trained on them."""
        return self.samples[0].store.geometry.spec

    @property
    def sample_ids(self) -> np.ndarray:
        """Per tile, its sample id (for :func:`split_by_sample`)."""
        return np.concatenate([np.full(len(s), s.sample_id, dtype=object) for s in self.samples]).astype(str)


def _scale(geometry) -> tuple:
    return (geometry.tile_px, geometry.tile_pixel_size_um, geometry.image_px, geometry.tokens_per_side)


def open_cohort(
    store_paths: Sequence[str | Path],
    *,
    core_genes: Sequence[str] | None = None,
    addon_genes: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CohortDataset:
    """Tiles stores as one dataset, in one gene order (given, or the first store's)."""
    if not store_paths:
        raise InputError("no tiles stores given")
    if core_genes is None or addon_genes is None:
        first = read_tiles_zarr(store_paths[0])
        core_genes = first.core_genes if core_genes is None else core_genes
        addon_genes = first.addon_genes if addon_genes is None else addon_genes
    samples = []
    for path in store_paths:
        report = None if progress is None else (lambda done, total, p=str(path): progress(p, done, total))
        samples.append(TileDataset.from_store(path, core_genes=core_genes, addon_genes=addon_genes, progress=report))
    return CohortDataset(samples)


def tile_sample_folder(
    folder: str | Path,
    out_path: str | Path,
    *,
    panel: GenePanel | None = None,
    overwrite: bool = False,
    options: TilingOptions = TilingOptions(),
) -> Path:
    """A sample folder (Xenium bundle with its aligned H&E, or ``xenium/`` + H&E files, as
    ``morphomol synth`` writes) -> a tiles store with its decoded tiles, as ``morphomol tiles``
    would make it. The panel is ``panel``, else the folder's ``panel.json``."""
    from napari_morphomol._atomic import guard_output
    from napari_morphomol.io.sample import find_sample_parts, load_sample
    from napari_morphomol.tiling import TILES_STORE, tile_sample, write_tiles_zarr

    folder = Path(folder)
    parts = find_sample_parts(folder)
    if parts is None or parts.he_path is None or parts.alignment_csv is None:
        raise InputError(
            f"{folder} is not a sample folder with an aligned H&E image: it needs a Xenium bundle and "
            "one *he_image.ome.tif and *he_imagealignment.csv (or give tiles stores from `morphomol tiles`)"
        )
    panel_source = "given"
    if panel is None:
        panel_json = folder / "panel.json"
        if not panel_json.is_file():
            raise InputError(f"no gene panel for {folder}: give a panel JSON {{\"core\": [...], \"addon\": [...]}}")
        panel, panel_source = GenePanel.from_json(panel_json), str(panel_json.absolute())
    if not panel.addon:
        raise InputError(f"the gene panel for {folder} has no add-on genes: models need targets")
    inputs = (folder, parts.xenium_dir, parts.he_path, parts.alignment_csv)
    out = guard_output(out_path, TILES_STORE, inputs=inputs, overwrite=overwrite)
    sdata = load_sample(parts.xenium_dir, parts.he_path, parts.alignment_csv)
    tiling = tile_sample(sdata, panel=panel, options=options)
    provenance = {"xenium_dir": str(parts.xenium_dir.absolute()), "he": str(parts.he_path.absolute()),
                  "alignment": str(parts.alignment_csv.absolute()), "panel": panel_source}
    write_tiles_zarr(tiling, out, overwrite=overwrite, provenance=provenance, inputs=inputs)
    write_tile_images(read_tiles_zarr(out), he_path=parts.he_path, overwrite=True)
    return out


def is_tiles_store(path: str | Path) -> bool:
    try:
        read_tiles_zarr(path)
    except InputError:
        return False
    return True


def tiles_stores_for(
    inputs: Sequence[str | Path],
    *,
    work_dir: str | Path,
    panel: GenePanel | None = None,
    progress: Callable[[str], None] | None = None,
    options: TilingOptions = TilingOptions(),
) -> list[Path]:
    """Tiles stores for a mix of stores and sample folders: folders are tiled once into
    ``work_dir/NAME.tiles.zarr`` (reused when already there)."""
    say = progress or (lambda message: None)
    names = [Path(p).absolute().name for p in inputs if not is_tiles_store(p)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"sample folders share the name {', '.join(twice)}; a sample is known by its folder name, "
                         "so rename them (or tile them first with `morphomol tiles --out NAME.tiles.zarr`)")
    stores = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise InputError(f"{path} does not exist; give tiles stores (morphomol tiles) or sample folders")
        if is_tiles_store(path):
            stores.append(path)
            continue
        store = guard_output_folder(work_dir, inputs=inputs) / f"{path.absolute().name}.tiles.zarr"
        if store.exists():
            say(f"{path}: reusing {store}")
        else:
            say(f"{path}: tiling into {store}")
            store.parent.mkdir(parents=True, exist_ok=True)
            tile_sample_folder(path, store, panel=panel, options=options)
        stores.append(store)
    return stores
