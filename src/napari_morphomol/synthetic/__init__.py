"""Synthetic H&E + Xenium samples with a known answer: Open Sample, ``morphomol synth``, the demo,
the shipped model's training data and every test fixture (no Qt).

Entry points: :func:`write_synthetic_sample` writes a sample folder (a :class:`SyntheticSample`):
a genuine Xenium bundle (spatialdata-io reads it unchanged), an H&E pyramidal OME-TIFF placed by
a known affine plus a smooth warp, Xenium's alignment CSV, Xenium Explorer keypoints and the
ground truth; :func:`load_ground_truth` reads the truth back, :func:`expected_cell_counts` gives
each cell's expected counts without counting noise, and :func:`true_he_to_global_px` /
:func:`true_global_to_he_px` apply the exact map. Add-on genes depend on cell type (seen by H&E
and core genes), on hidden states (seen only by core genes) and on morphology states (seen only
by H&E), so neither modality alone explains the add-on panel. Deterministic by seed; memory
stays per block. :func:`write_scale_sample` writes a slide-scale sample (hundreds of millions of
transcripts) in minutes by repeating one block on a grid (a :class:`ScaleSample`, no cell
segmentation; its pieces: :func:`write_repeated_ome_tiff` with :func:`repeat_step_px`, the
transcript table's :class:`TranscriptColumns` and :func:`transcripts_writer`,
:data:`DAPI_COMPRESSIONS`, and :func:`check_out_dir`, the refusal of a folder that is not new or
empty). See docs/synthetic.md.

Modules: :mod:`.plan` (sizes, transform, stain, seed), :mod:`.tissue` (fields, regions, cells),
:mod:`.expression` (the panel's programs and transcript sampling), :mod:`.render` and
:mod:`.kernels` (image chunks), :mod:`.transform` (the true map), :mod:`.bundle` (the Xenium
tables and metadata), :mod:`.images` (DAPI, masks, H&E), :mod:`.writers` (streaming OME-TIFF and
10x HDF5), :mod:`.truth` (ground truth), :mod:`.sample` (the folder, written atomically), :mod:`.scale` (a
block repeated).
"""

from napari_morphomol._lazy import lazy_attributes

#: Public names and the submodule defining each. They load on first use, so that importing the
#: package (a command's --help, Open Sample's menu entry) does not load numba, pyarrow or zarr.
_SOURCES = {
    "bundle": ("TranscriptColumns", "transcripts_writer"),
    "sample": ("SampleSummary", "SyntheticSample", "check_out_dir", "write_synthetic_sample"),
    "scale": ("DAPI_COMPRESSIONS", "SCALE_HE_PIXEL_SIZE_UM", "ScaleSample", "write_scale_sample"),
    "truth": ("GENERATOR_VERSION", "GroundTruth", "expected_cell_counts", "load_ground_truth", "true_global_to_he_px",
              "true_he_to_global_px"),
    "writers": ("repeat_step_px", "write_repeated_ome_tiff"),
}
__getattr__ = lazy_attributes("napari_morphomol.synthetic", _SOURCES)

__all__ = [
    "DAPI_COMPRESSIONS",
    "GENERATOR_VERSION",
    "SCALE_HE_PIXEL_SIZE_UM",
    "GroundTruth",
    "SampleSummary",
    "ScaleSample",
    "SyntheticSample",
    "TranscriptColumns",
    "check_out_dir",
    "expected_cell_counts",
    "load_ground_truth",
    "repeat_step_px",
    "transcripts_writer",
    "true_global_to_he_px",
    "true_he_to_global_px",
    "write_scale_sample",
    "write_repeated_ome_tiff",
    "write_synthetic_sample",
]
