"""Readers (no Qt): a Xenium bundle and an H&E pyramid as one lazy SpatialData sample, and the
transcript density built from it. Nothing here ever writes into a bundle.

Entry points: :func:`load_sample` (bundle + H&E + alignment) and :func:`open_sample` (a sample
folder, found by :func:`find_sample_parts`) give the sample; :func:`summarize_sample` describes
it; :func:`read_pyramid` / :func:`open_he_image` read an H&E pyramid level by level;
:func:`build_transcript_density` indexes its transcripts per gene and per block in bounded memory
(the index lives in a scratch folder; it reads a transcripts element straight from its parquet
file where :func:`transcripts_file` finds one, a :class:`TranscriptsFile`). A sample's element
keys, its provenance record (``sample_info``) and its image levels are in
:mod:`napari_morphomol.elements`.
The synthetic sample generator is :mod:`napari_morphomol.synthetic`.
"""

from napari_morphomol._lazy import lazy_attributes

#: Public names and the submodule defining each. They load on first use, so that importing
#: ``napari_morphomol.io`` (or one light submodule) does not import spatialdata, dask or tifffile.
_SOURCES = {
    "features": ("XeniumDataWarning", "is_control_feature"),
    "he_image": ("PyramidImage", "read_pyramid", "rgb_levels_cyx"),
    "sample": ("SampleParts", "TranscriptsFile", "find_sample_parts", "load_sample", "open_he_image", "open_sample",
               "read_experiment", "summarize_sample", "transcripts_file"),
    "transcript_density": ("TranscriptDensity", "build_transcript_density", "transcripts_in_box_um"),
}
__getattr__ = lazy_attributes("napari_morphomol.io", _SOURCES)

__all__ = [
    "PyramidImage",
    "SampleParts",
    "TranscriptDensity",
    "TranscriptsFile",
    "XeniumDataWarning",
    "build_transcript_density",
    "find_sample_parts",
    "is_control_feature",
    "load_sample",
    "open_he_image",
    "open_sample",
    "read_experiment",
    "read_pyramid",
    "rgb_levels_cyx",
    "summarize_sample",
    "transcripts_file",
    "transcripts_in_box_um",
]
