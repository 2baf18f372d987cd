"""The napari plugin, headless: widget, reader, sample data, training set and fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("napari", reason="the napari extra is not installed (pip install -e .[napari])")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from cellseg import checkpoint  # noqa: E402
from cellseg.files import read_image  # noqa: E402
from cellseg.samples import sample_path  # noqa: E402
from helpers import run_cli  # noqa: E402

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out


@pytest.fixture
def viewer(qtbot):
    """napari's viewer, window and canvas, where a screen with OpenGL exists (``make test`` runs
    under ``xvfb-run`` when the machine has it); else napari's viewer model, which has no canvas
    (Qt's offscreen platform has no OpenGL for one; the widget needs none). napari's own
    ``make_napari_viewer`` does the same, but its pytest plugin is off (pyproject.toml)."""
    if not os.environ.get("DISPLAY"):
        from napari.components import ViewerModel

        yield ViewerModel()
        return
    import napari

    window = napari.Viewer(show=False)
    yield window
    window.close()


@pytest.fixture
def widget(viewer):
    from cellseg.napari.sample import nuclei
    from cellseg.napari.widget import SegmentWidget

    ((data, meta, _),) = nuclei()
    viewer.add_image(data, **meta)
    dock = SegmentWidget(viewer)
    if hasattr(viewer, "window"):
        viewer.window.add_dock_widget(dock)
    dock.image.reset_choices()
    return dock


def segment_and_wait(widget, qtbot, timeout=240_000):
    widget.segment()
    qtbot.waitUntil(lambda: widget.result is not None and not widget.running, timeout=timeout)


def test_the_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("cellseg")
    assert {c.id for c in manifest.contributions.commands} >= {
        "cellseg.segment_widget", "cellseg.get_reader", "cellseg.sample_nuclei"}
    manifest.validate_imports()  # every python_name imports


def test_the_widget_gives_predicts_labels_on_the_sample(widget, qtbot, tmp_path):
    segment_and_wait(widget, qtbot)
    layer = widget.viewer.layers["nuclei (cellseg sample) nuclei"]
    assert 60 < layer.data.max() < 120  # 89 annotated nuclei
    assert len(layer.features) == layer.data.max()
    assert "area_px" in layer.features.columns
    assert widget.table.shape[0] == layer.data.max()  # the dock's table
    (tmp_path / "in").mkdir()
    (tmp_path / "in/nuclei.png").write_bytes(sample_path().read_bytes())
    out = run_cli([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"], tmp_path,
                  "cellseg.predict")
    assert out.returncode == 0, out.stderr[-2000:]
    predicted = read_image(tmp_path / "out/labels/nuclei.png")[..., 0]
    np.testing.assert_array_equal(layer.data, predicted)


def test_a_finetune_run_is_kept_beside_its_training_set(tmp_path):
    from cellseg.errors import UserError
    from cellseg.napari import actions

    with pytest.raises(UserError, match="no annotated images in masks/"):
        actions.finetune_dir(tmp_path / "set")
    (tmp_path / "set/masks").mkdir(parents=True)
    (tmp_path / "set/masks/a.png").write_bytes(b"")
    first, second = actions.finetune_dir(tmp_path / "set"), actions.finetune_dir(tmp_path / "set")
    assert first.parent == second.parent == tmp_path / "set/models"
    assert first != second
    assert first.is_dir()
    assert second.is_dir()


def test_the_reader_opens_named_channels_with_their_pixel_size(tmp_path):
    from cellseg.napari.reader import get_reader

    nuclei = read_image(sample_path())[..., 0]
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, np.stack([nuclei, 255 - nuclei]), metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]},
        "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325})
    layers = get_reader(str(path))(str(path))
    assert [meta["name"] for _, meta, _ in layers] == ["cells DAPI", "cells GFP"]
    assert layers[0][1]["scale"] == [0.325, 0.325]
    np.testing.assert_array_equal(layers[0][0], nuclei)


def test_the_reader_opens_a_predict_output_folder_over_its_images(tmp_path):
    from cellseg.napari.reader import get_reader

    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.png").write_bytes(sample_path().read_bytes())
    nuclei = read_image(sample_path())[:128, :128, 0]
    planes = np.stack([nuclei, nuclei[::-1], nuclei[:, ::-1]])  # a Z stack of 0.325 µm pixels
    tifffile.imwrite(tmp_path / "in/b.tif", planes, imagej=True, resolution=(1 / 0.325,) * 2,
                     metadata={"axes": "ZYX", "unit": "um"})
    out = run_cli([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "diameter=null"],
                  tmp_path, "cellseg.predict")
    assert out.returncode == 0, out.stderr[-2000:]
    layers = get_reader(str(tmp_path / "out"))(str(tmp_path / "out"))
    found = {meta["name"]: (kind, data.shape, meta["scale"]) for data, meta, kind in layers}
    assert found == {
        "a overlay": ("image", (256, 256, 3), [1.0, 1.0]),  # a PNG: no pixel size
        "a labels": ("labels", (256, 256), [1.0, 1.0]),
        "b overlay": ("image", (3, 128, 128, 3), [1.0, 0.325, 0.325]),  # over the stack's
        "b labels": ("labels", (3, 128, 128), [1.0, 0.325, 0.325]),  # own layers (µm)
    }
    labels, meta, _ = layers[1]
    assert len(meta["features"]["label"]) == labels.max()
    assert layers[3][1]["units"] == ("pixel", "µm", "µm")
    # Fiji reads the same calibration from the labels stack
    with tifffile.TiffFile(tmp_path / "out/labels/b.tif") as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["unit"] == "um"


def test_corrected_labels_go_to_the_training_set_and_fine_tune(widget, qtbot, tmp_path):
    segment_and_wait(widget, qtbot)
    layer = widget.labels_layer
    corrected = layer.data.copy()
    corrected[corrected == corrected[128, 128]] = 0  # erase one nucleus, as the eraser would
    layer.data = corrected
    widget.folder.value = str(tmp_path / "set")
    mask = widget.add_to_training_set()
    np.testing.assert_array_equal(read_image(mask)[..., 0], corrected)
    assert (tmp_path / "set/images/nuclei (cellseg sample).tif").is_file()
    saved = widget.save(tmp_path / "results")
    assert [p.name for p in saved] == ["nuclei (cellseg sample).tif",
                                       "nuclei (cellseg sample).measurements.csv"]
    widget.start_finetune(epochs=1, extra=("trainer.limit_train_batches=2",
                                           "data.crops_per_image=4"))
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.status.value.startswith("fine-tuned"), widget.status.value
    assert Path(widget.model.value).parent.parent.parent == tmp_path / "set/models"
    tuned = checkpoint.load(widget.model.value)
    assert tuned.info["command"].startswith("python -m cellseg.train experiment=finetune")
