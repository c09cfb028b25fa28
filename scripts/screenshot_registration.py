"""Screenshot of "Register H&E to Xenium" mid-registration, for docs/images/ (run under Xvfb):

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_registration.py

A small synthetic sample is loaded without its alignment; eight landmark pairs are clicked with
a few px of hand error and one sloppy click, the affine is fitted and applied, the view shows the
overlay centred on the worst pair.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_morphomol.io.sample import load_sample
from napari_morphomol.layers.sample import sample_layers
from napari_morphomol.registration import read_keypoints_csv
from napari_morphomol.synthetic import write_synthetic_sample
from napari_morphomol.widgets.registration import OVERLAY, RegistrationWidget

OUT = Path(__file__).resolve().parent.parent / "docs" / "images" / "registration_widget.png"


def settle():
    for _ in range(30):
        QApplication.processEvents()


def main(out: Path = OUT) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        sample = write_synthetic_sample(Path(tmp) / "sample", size_mm=(0.6, 0.6), seed=0, deformation=False)
        sdata = load_sample(sample.xenium_dir, sample.he_path)
        viewer = napari.Viewer()
        viewer.window._qt_window.resize(1500, 950)
        for data, kwargs, kind in sample_layers(sdata, with_density=False):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        viewer.scale_bar.visible = True
        widget = RegistrationWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Register H&E to Xenium")
        pairs = read_keypoints_csv(sample.keypoints_csv)
        he_px = pairs.he_px[:8] + np.random.default_rng(3).normal(0, 4, (8, 2))  # hand clicks
        he_px[5] += [25.0, -15.0]  # one sloppy click
        for h, g in zip(he_px, pairs.global_px[:8]):
            widget.he_points.add(h[::-1])
            widget.xenium_points.add(g[::-1])
        widget.fit()
        widget.apply()
        widget.view.value = OVERLAY
        widget.blend.value = 0.65
        settle()
        viewer.reset_view()
        viewer.camera.zoom *= 2.0
        widget.table.native.selectRow(0)  # centres on the worst pair
        settle()
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.window.screenshot(str(out), canvas_only=False, flash=False)
        viewer.close()
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
