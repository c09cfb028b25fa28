"""napari-morphomol: H&E + Xenium morpho-molecular analysis in napari and on the command line."""

__version__ = "0.1.0"
