"""The names of a sample's SpatialData elements, one place for every package (no imports).

A sample opened by :func:`napari_morphomol.io.load_sample` holds at most these elements; code
that reads a sample names them through these constants, never as bare strings. The keys follow
spatialdata-io's Xenium reader, so a sample written by either is read by both.
"""

HE_IMAGE = "he_image"
"""The registered H&E pyramid (RGB), in ``he_px`` and, once aligned, in ``global``."""
MORPHOLOGY = "morphology_focus"
"""Xenium's DAPI (morphology focus) pyramid, in ``global``."""
TRANSCRIPTS = "transcripts"
"""Xenium's transcripts as dask points (um columns), scaled to ``global``."""
CELL_TABLE = "table"
"""The cell table (AnnData: one row per segmented cell)."""
