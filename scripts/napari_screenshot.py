"""The README's picture of the napari widget, taken from the running plugin (not drawn).

    xvfb-run -a python scripts/napari_screenshot.py docs/napari.png

Opens napari with the packaged sample image, docks "Segment nuclei", segments with the shipped
model and saves ``viewer.screenshot(canvas_only=False)`` (the whole window, dock included).
"""

from __future__ import annotations

import sys
import time

import torch  # noqa: F401  (torch before Qt)


def main(out: str = "docs/napari.png") -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from cellseg.napari.sample import nuclei
    from cellseg.napari.widget import SegmentWidget

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1300, 760)
    ((data, meta, _),) = nuclei()
    viewer.add_image(data, **meta)
    dock = SegmentWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Segment nuclei (cellseg)")
    dock.image.reset_choices()
    dock.segment()
    start = time.time()
    while dock.result is None or dock.running:
        QApplication.processEvents()
        time.sleep(0.05)
        if time.time() - start > 600:
            raise SystemExit("segmentation did not finish in 10 minutes")
    viewer.layers[-1].contour = 1  # outlines: the image stays visible under the labels
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.screenshot(out, canvas_only=False)
    print(f"{out}: {dock.status.value}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
