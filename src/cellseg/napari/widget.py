"""The "Segment nuclei" dock widget: segment, look, correct, measure and fine-tune in napari.

Every action runs :mod:`cellseg.napari.actions` (the functions ``cellseg.predict`` runs) in a
worker thread, so the window never freezes; the dock shows what runs and a busy bar.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (torch before Qt: both load OpenMP/C++ runtimes)
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)

from cellseg import checkpoint
from cellseg.napari import actions

TABLE_COLUMNS = ("label", "area_px", "equivalent_diameter_px", "score")


class SegmentWidget(Container):
    """Image layer, model, channel, diameter, tta -> a Labels layer with measurements."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.model = FileEdit(label="model", mode="r", value="",
                              filter="*.ckpt *.pt *.onnx *.zip",
                              tooltip="empty: the shipped nuclei model")
        self.channel = SpinBox(label="channel", min=0, max=63, value=0,
                               tooltip="the nuclei channel of a multi-channel (C, Y, X) layer")
        self.diameter = LineEdit(label="diameter (px)", value="auto",
                                 tooltip="auto: estimated per image; a number: the nuclei's size")
        self.tta = CheckBox(text="test-time augmentation (8 flips and turns, slower)")
        self.run = PushButton(text="Segment nuclei")
        self.busy = ProgressBar(min=0, max=0, visible=False, label="")
        self.status = Label(value="")
        self.table = Table(value={c: [] for c in TABLE_COLUMNS})
        self.folder = FileEdit(label="training set", mode="d",
                               value=str(Path.home() / "cellseg-training-set"))
        self.add = PushButton(text="Add to training set")
        self.finetune = PushButton(text="Fine-tune on the training set")
        self.output = FileEdit(label="save to", mode="d",
                               value=str(Path.home() / "cellseg-results"))
        self.save_button = PushButton(text="Save labels and measurements")
        self.extend([self.image, self.model, self.channel, self.diameter, self.tta, self.run,
                     self.busy, self.status, self.table, self.folder, self.add, self.finetune,
                     self.output, self.save_button])
        self.run.changed.connect(lambda: self.segment())
        self.add.changed.connect(lambda: self.add_to_training_set())
        self.finetune.changed.connect(lambda: self.start_finetune())
        self.save_button.changed.connect(lambda: self.save())
        self.viewer.layers.events.inserted.connect(lambda _: self.image.reset_choices())
        self.viewer.layers.events.removed.connect(lambda _: self.image.reset_choices())
        self._models: dict[str, checkpoint.Model] = {}
        self.result: actions.Result | None = None
        self.labels_layer = None
        self.worker = None
        self.running = False  # a worker runs (busy.visible follows the dock's own visibility)

    def _image_layers(self, _widget: Any = None) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def model_name(self) -> str | None:
        value = str(self.model.value or "").strip()
        return None if value in ("", ".") else value

    def load_model(self) -> checkpoint.Model:
        """The chosen model (the shipped one when none is chosen), loaded once."""
        key = self.model_name() or checkpoint.DEFAULT_MODEL
        if key not in self._models:
            self._models[key] = checkpoint.load(self.model_name())
        return self._models[key]

    def layer_image(self):
        """The chosen layer's 2-D plane as (Y, X, C), its name and its pixel size."""
        layer = self.image.value
        if layer is None:
            raise ValueError("no image layer: open an image (File > Open, or the sample)")
        data = layer.data
        if not layer.rgb and data.ndim == 3:  # a (C, Y, X) layer of another reader
            data = data[self.channel.value]
        meta = layer.metadata or {}
        names = None
        if "channel_names" in meta and not layer.rgb:
            names = [meta["channel_names"][meta.get("channel", 0)]]
        return actions.as_planes(data, layer.rgb), layer.name, meta.get("pixel_size"), names

    def diameter_value(self) -> Any:
        text = str(self.diameter.value).strip().lower()
        if text in ("auto", ""):
            return "auto"
        if text in ("none", "null", "off"):
            return None
        return float(text)

    def _start(self, message: str, work, done) -> None:
        from napari.qt.threading import create_worker

        self.status.value, self.busy.visible, self.running = message, True, True
        for button in (self.run, self.add, self.finetune, self.save_button):
            button.enabled = False
        self.worker = create_worker(work)
        self.worker.returned.connect(done)
        self.worker.errored.connect(self._failed)
        if hasattr(self.worker, "yielded"):  # a generator's lines: the fine-tuning log
            self.worker.yielded.connect(lambda line: setattr(self.status, "value", line))
        self.worker.finished.connect(self._idle)
        self.worker.start()

    def _idle(self) -> None:
        self.busy.visible, self.running = False, False
        for button in (self.run, self.add, self.finetune, self.save_button):
            button.enabled = True

    def _failed(self, err: Exception) -> None:
        self.status.value = f"failed: {err}"

    def segment(self) -> None:
        """Segment the chosen layer in a worker thread; a Labels layer appears when done."""
        image, name, pixel_size, names = self.layer_image()
        diameter, tta = self.diameter_value(), self.tta.value

        def work():
            model = self.load_model()
            start = time.perf_counter()
            result = actions.segment(model, image, diameter, tta, name, pixel_size, names)
            return result, model, time.perf_counter() - start

        self._start(f"segmenting {name} ...", work, self._show)

    def _show(self, out) -> None:
        result, model, seconds = out
        self.result = result
        name = f"{self.image.value.name} nuclei"
        layer_scale = self.image.value.scale[-2:]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.labels_layer = self.viewer.add_labels(
            result.labels, name=name, scale=layer_scale, features=features(result.measurements)
        )
        self.table.value = {c: [row.get(c) for row in result.measurements]
                            for c in TABLE_COLUMNS}
        self.status.value = (f"{int(result.labels.max())} nuclei in {seconds:.1f} s "
                             f"({model.name})")

    def add_to_training_set(self) -> Path:
        """Save the image and its labels (as corrected in the Labels layer) to the folder."""
        if self.labels_layer is None:
            raise ValueError("segment an image first")
        image, name, _, _ = self.layer_image()
        mask = actions.add_to_training_set(self.folder.value, name, image,
                                           self.labels_layer.data)
        count = len(list(mask.parent.glob("*.png")))
        self.status.value = f"added {name}: {count} images in {Path(self.folder.value)}"
        return mask

    def save(self, folder: str | Path | None = None) -> list[Path]:
        """Write the labels TIFF and the measurements CSV (of the corrected labels) into
        ``folder`` (the "save to" folder)."""
        if self.labels_layer is None or self.result is None:
            raise ValueError("segment an image first")
        image, name, pixel_size, names = self.layer_image()
        folder = Path(folder or self.output.value)
        paths = actions.save(folder, name, image, self.labels_layer.data, self.result.foreground,
                             pixel_size, names)
        self.status.value = f"saved {', '.join(p.name for p in paths)} in {folder}"
        return paths

    def start_finetune(self, epochs: int = 20, extra: tuple[str, ...] = ()) -> None:
        """Fine-tune the current model on the training set in a subprocess; its log lines show
        in the dock; the new model is chosen when it ends. The run is kept beside the images it
        learnt from: ``<training set>/models/finetune_<time>/``."""
        model = self.model_name() or checkpoint.DEFAULT_MODEL
        run_dir = actions.finetune_dir(self.folder.value)
        command = [*actions.finetune_command(self.folder.value, model, run_dir, epochs), *extra]

        def work():
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
            for line in process.stdout:
                if line.strip():
                    yield line.strip()[-120:]
            if process.wait():
                raise RuntimeError(f"fine-tuning failed (exit {process.returncode}); its log: "
                                   f"{run_dir / 'train.log'}")
            return run_dir / "checkpoints/last.ckpt"

        self._start("fine-tuning ...", work, self._tuned)

    def _tuned(self, path: Path) -> None:
        self.model.value = str(path)
        self.status.value = f"fine-tuned: {path} (segment again to see its labels)"


def features(rows: list[dict]) -> dict[str, list]:
    """Measurement rows as a Labels layer's features (one column per measurement)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in columns}
