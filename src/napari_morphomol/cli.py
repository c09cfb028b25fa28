"""The ``morphomol`` command line: one entry point, one module per subcommand.

Each module in ``napari_morphomol.commands`` exposes ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; it parses and prints, and calls one core function for the work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from napari_morphomol import __version__
from napari_morphomol._atomic import os_fault_message
from napari_morphomol.errors import InputError

SUBCOMMANDS = [  # in the order of the work
    "synth",
    "info",
    "register",
    "tiles",
    "train",
    "evaluate",
    "predict",
    "calibrate",
    "export",
    "demo",
]

EPILOG = """\
Units and conventions:
  Positions are micrometres (um) unless a flag says px. 'global' means Xenium morphology-image
  pixels (0.2125 um/px on current instruments), as in spatialdata-io. H&E px are the H&E image's
  own full-resolution pixels. Point pairs and matrices are in (x, y) order, x to the right,
  y down; alignment matrices map H&E px -> global px, like Xenium's he_imagealignment.csv.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morphomol",
        description="H&E + Xenium: load, register, predict add-on gene panels, explore, export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"napari_morphomol.commands.{name}")
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _plain_warnings_of_ours(show_warning):
    """A ``warnings.showwarning`` that prints this package's warnings as one ``warning:`` line
    (a user of the command line needs the message, not our source line) and others as before."""

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("napari_morphomol"):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show_warning(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _plain_warnings_of_ours(warnings.showwarning)
            return int(args._run(args) or 0)
    except (InputError, FileNotFoundError, ValueError) as exc:
        print(f"morphomol {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the last line of defence: a fault of the machine, said in one line
        print(f"morphomol {args.command}: error: {os_fault_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"morphomol {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
