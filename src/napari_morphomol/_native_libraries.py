"""Native-library clashes that crash the process, avoided before the imports that cause them."""

from __future__ import annotations

import logging
import sys

_PROCESS_MAPS = "/proc/self/maps"


def keep_triton_out_beside_system_llvm(maps_path: str = _PROCESS_MAPS) -> bool:
    """Keep ``triton`` from being imported once a system libLLVM is loaded; True when it did.

    Mesa's software OpenGL (llvmpipe: Xvfb, virtual machines, remote desktops) loads the
    system libLLVM when napari opens its canvas. triton bundles another LLVM, and importing it
    afterwards crashes the process (segmentation fault). timm (through torchvision) and
    Lightning import torch._dynamo, which imports triton only to offer torch.compile, unused
    here. Marking triton as absent makes torch treat it as not installed. A triton imported
    before the canvas is harmless and left alone.
    """
    if "triton" in sys.modules:
        return False
    try:
        with open(maps_path) as maps:
            system_llvm = any("/libLLVM" in line for line in maps)
    except OSError:  # not Linux: no Mesa llvmpipe clash known there
        return False
    if system_llvm:
        sys.modules["triton"] = None
        # torch then warns once that flop counting cannot see triton kernels: true, and moot here
        logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)
    return system_llvm
