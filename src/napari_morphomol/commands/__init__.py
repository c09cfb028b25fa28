"""The ``morphomol`` subcommands, one module each (``NAME``, ``HELP``, ``add_arguments``, ``run``):
argparse over one core call. :mod:`napari_morphomol.cli` imports a module only when its command
runs, so ``morphomol --help`` stays fast; this package has no face of its own."""
