"""The checks :func:`~napari_morphomol.inference.predict` makes before it writes anything.

In the order predict runs them: the options (numbers in range, a known dtype), the sample (an
H&E file, with Xenium transcripts or alone) and the route the model takes on it, the memory the
model's tile geometry, batch and chunk imply over this H&E image, and the checkpoint's weights
against its card. After tiling, a model that reads transcripts is refused when too few of the
sample's transcripts fall on its tiles. Each refusal is one
:class:`~napari_morphomol.errors.InputError` saying what to give instead.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from napari_morphomol.errors import InputError
from napari_morphomol.inference.devices import check_dtype
from napari_morphomol.inference.worker import PREFETCH_BATCHES, load_model

MIN_FUSION_TRANSCRIPT_SHARE = 0.05
"""A model that reads transcripts is not run when fewer of the sample's panel transcripts than this
share fall on its tissue tiles: the registration does not place the H&E on the Xenium run."""

_LEAST = {"batch_size": 1, "tiles_per_chunk": 1, "num_workers": 1, "min_transcripts": 0}
"""The smallest whole number each counting option of predict takes (``num_workers`` may be None)."""


def check_options(options) -> None:
    """The numeric options, the dtype and the JPEG decoder's device of a ``PredictOptions``, refused
    with what to give (a Python caller's CLI checks)."""
    for name, least in _LEAST.items():
        value = getattr(options, name)
        if name == "num_workers" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise InputError(f"{name} must be a whole number of {least} or more, got {value!r}")
    share = options.max_background
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0.0 <= share <= 1.0:
        raise InputError(f"max_background is the largest background fraction of a tile, from 0 to 1; got {share!r}")
    check_dtype(options.dtype)
    _check_jpeg_device(options.jpeg_device)


def _check_jpeg_device(jpeg_device) -> None:
    """Refuse a ``jpeg_device`` that ``torchvision.io.decode_jpeg`` does not take (None, ``"cpu"``
    or a CUDA device)."""
    if jpeg_device is None:
        return
    try:
        kind = torch.device(jpeg_device).type if isinstance(jpeg_device, str) else None
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise InputError(f"jpeg_device {jpeg_device!r} is not a device torchvision decodes JPEG on; give None "
                         "(tifffile's decoder on the CPU), 'cpu' or a CUDA device such as 'cuda' or 'cuda:0'")


def sample_route(sdata, info, card) -> str:
    """The route a run of ``card``'s model takes on this sample (``models.config.ROUTES``): every input
    the model reads when the sample has Xenium transcripts, the image alone when it is an H&E alone.
    Refuses a sample without an H&E image file (workers reopen it) and a model that cannot take
    that route, saying what to do."""
    from napari_morphomol.elements import HE_IMAGE, TRANSCRIPTS

    if HE_IMAGE not in sdata.images or info.he_path is None:
        what = "a Xenium run without its H&E" if TRANSCRIPTS in sdata.points else "no H&E image"
        raise InputError(f"prediction needs an H&E image file (with or without a Xenium run); this sample has {what}: "
                         "give the H&E (--he HE.ome.tif)")
    route = card.model.default_route if TRANSCRIPTS in sdata.points else "image"
    card.model.check_route(route)
    return route


def run_route(sdata, checkpoint) -> str:
    """The route (``models.config.ROUTES``) a run of ``checkpoint`` takes on the sample ``sdata``
    (``image`` for an H&E alone), checked as :func:`~napari_morphomol.inference.predict` checks it.

    Parameters
    ----------
    sdata
        A sample from :func:`napari_morphomol.io.load_sample`.
    checkpoint
        A .safetensors model with its card.

    Returns
    -------
    str
        ``both``, ``image`` or ``transcripts``; InputError, saying what to do, when the model
        cannot take the route the sample needs.
    """
    from napari_morphomol.elements import sample_info
    from napari_morphomol.models import read_model_card

    return sample_route(sdata, sample_info(sdata), read_model_card(checkpoint))


def sample_geometry(sdata, info, card):
    """The model's tile geometry over the sample's H&E image (checks the memory it implies)."""
    from napari_morphomol.elements import HE_IMAGE, element_levels_cyx
    from napari_morphomol.tiling import TileGeometry

    height, width = element_levels_cyx(sdata.images[HE_IMAGE])[0].shape[1:]
    return TileGeometry(**card.tile_geometry.to_dict(), he_pixel_size_um=info.he_pixel_size_um,
                        he_height_px=int(height), he_width_px=int(width))


def check_memory(geometry, card, output_specs, batch_size: int, tiles_per_chunk: int) -> None:
    """Refuse a batch or chunk size whose tensors cannot be held (capped at the tiles there can be)."""
    from napari_morphomol.tiling.geometry import check_batch_memory, check_fits_in_memory

    rows, cols = geometry.grid_shape
    grid_tiles = max(1, rows * cols)
    check_batch_memory(geometry, min(batch_size, tiles_per_chunk, grid_tiles), card.model.n_core_genes,
                       held_batches=PREFETCH_BATCHES + 1)
    chunk = min(tiles_per_chunk, grid_tiles)
    n_tokens = geometry.tokens_per_side ** 2
    values = sum(spec.width * (n_tokens if spec.level == "token" else 1) for spec in output_specs)
    per_tile = values * 4 * 2  # float32 rows, in the task and in zarr
    names = " and ".join(spec.name for spec in output_specs)
    check_fits_in_memory(chunk * per_tile, f"a chunk of {chunk} tiles (--tiles-per-chunk) with its {names}",
                         "give a smaller --tiles-per-chunk (default 64)")


def check_weights(checkpoint: Path, sha: str, device: str, scheduler) -> None:
    """Load the weights (refused when they do not match the card) before anything is written; on
    threads the tasks of this process reuse the loaded model."""
    if scheduler is None or scheduler in ("threads", "synchronous"):
        load_model(str(checkpoint.resolve()), sha, device)
    else:
        from napari_morphomol.models import load_checkpoint

        load_checkpoint(checkpoint, "cpu")


def check_transcripts_meet_tiles(card, tiling, route: str) -> None:
    """Refuse a model that reads transcripts on ``route`` when the sample's transcripts miss its tiles."""
    from napari_morphomol.tiling.pipeline import REGISTRATION_HINT, transcripts_on_tissue_text

    if not card.model.route_reads(route)[1]:
        return
    on_tissue = tiling.report["transcripts_on_tissue_tiles"]
    if on_tissue["share"] < MIN_FUSION_TRANSCRIPT_SHARE:
        raise InputError(
            f"the sample's transcripts do not meet its tiles: {transcripts_on_tissue_text(tiling.report)}. The "
            "registration probably does not place the H&E on the Xenium run, and this model reads the "
            f"transcripts of each tile; {REGISTRATION_HINT}"
        )
