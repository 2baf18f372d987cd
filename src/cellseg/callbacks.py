"""Lightning callbacks and the checkpoint writer of cellseg's own."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cellseg import threads
from cellseg.cli import rank_zero_logger
from cellseg.errors import UserError
from cellseg.figures import rows_grid

log = rank_zero_logger(__name__)
EPOCH_SCORES = ("train/loss", "val/loss", "val/iou", "val/dice", "val/iou_best")


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The SummaryWriters of the trainer's TensorBoard loggers."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class ImageGridLogger(L.Callback):
    """Log sample images with masks at the start, and image / mask / prediction rows for fixed
    validation images every ``every_n_epochs`` epochs and after the last one."""

    def __init__(self, n_images: int = 6, every_n_epochs: int = 10) -> None:
        self.n_images, self.every_n_epochs = n_images, every_n_epochs

    def fixed_images(self, trainer: L.Trainer, split: str) -> tuple[list, list]:
        """The first images of a split with their foreground masks, centre-cropped to one size
        (a multiple of the network's size multiple, at most 256) when their sizes differ."""
        dataset = trainer.datamodule.datasets[split]
        pairs = [dataset.pairs[i] for i in range(min(self.n_images, len(dataset.pairs)))]
        arrays = [(image, target[..., :1]) for image, target in pairs]
        multiple = trainer.lightning_module.net.multiple
        side = min(256, *(min(a.shape[:2]) for a, _ in arrays)) // multiple * multiple
        images, masks = [], []
        for image, mask in arrays:
            if image.shape[:2] != (side, side):
                y, x = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
                image, mask = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
            images.append(torch.from_numpy(image.transpose(2, 0, 1).copy()))
            masks.append(torch.from_numpy(mask.transpose(2, 0, 1).copy()))
        return images, masks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers or trainer.datamodule is None:
            return
        images, masks = self.fixed_images(trainer, "train")
        for w in writers:
            w.add_image("data/train_samples", rows_grid([images, masks]), 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        epoch = trainer.current_epoch + 1
        last = epoch >= (trainer.max_epochs or 0)
        if trainer.sanity_checking or not writers or (epoch % self.every_n_epochs and not last):
            return
        images, masks = self.fixed_images(trainer, "val")
        with torch.no_grad():
            logits = pl_module(torch.stack(images).to(pl_module.device))
        preds = list((logits[:, :1].float() > 0).float().cpu())
        grid = rows_grid([images, masks, preds])
        for w in writers:
            w.add_image("val/predictions", grid, trainer.global_step)


class FitThreads(L.Callback):
    """PyTorch threads resized to this run's share of the cores as other cellseg jobs start
    and end (:mod:`cellseg.threads`); a check every few seconds, between batches."""

    def on_train_batch_start(self, *args: Any) -> None:
        threads.refit()

    def on_validation_batch_start(self, *args: Any) -> None:
        threads.refit()


class Throughput(L.Callback):
    """Log ``perf/train_images_per_s``: training images per second of each epoch, from its
    start to its last training batch (data loading included, validation excluded)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = time.perf_counter()
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.images += len(batch["image"])
        self.last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.images and self.last > self.start:
            rate = self.images / (self.last - self.start)
            pl_module.log("perf/train_images_per_s", rate, on_epoch=True, prog_bar=False)


def weight_average(decay: float | None = None) -> L.Callback | None:
    """An exponential moving average of the weights over the training steps (``decay`` a step),
    which validation scores and the checkpoints hold (so tuning, testing and shipping use it;
    the weights being trained stay under ``current_model_state``); None (off) without a decay."""
    if decay is None:
        return None
    if not 0 < decay < 1:
        raise UserError(f"callbacks.ema.decay={decay}: a weight's share that stays a step, "
                        "between 0 and 1 (0.999 averages over about 1,000 steps); null: off")
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging
    except ImportError:  # Lightning 2.6 added it; cellseg admits 2.4 and later
        raise UserError(f"callbacks.ema needs lightning 2.6 or later (here {L.__version__}): "
                        "pip install 'lightning>=2.6', or callbacks.ema.decay=null") from None
    return EMAWeightAveraging(decay=decay)


def progress_bar() -> ProgressBar:
    """A live progress bar on a terminal; one log line per epoch elsewhere (a log file, nohup,
    a SLURM job), where a bar would print nothing until the end."""
    return TerminalProgressBar() if sys.stdout.isatty() else EpochLines()


class TerminalProgressBar(RichProgressBar):
    """Lightning's rich bar for training and validation, without the run version (``v_num``)
    and without a bar for the few test batches (the final scores follow)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_test_start(self, *args: Any) -> None:
        pass

    def on_test_batch_start(self, *args: Any) -> None:
        pass

    def on_test_batch_end(self, *args: Any) -> None:
        pass

    def on_test_end(self, *args: Any) -> None:
        pass


class EpochLines(ProgressBar):
    """One line per epoch in the run's log (console and ``train.log``): the epoch, its losses,
    the validation scores of epochs that validated, training images/s and the time left."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.finished: int | None = None  # the epoch whose line is due once its scores are in

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.first_epoch = time.perf_counter(), trainer.current_epoch
        self.validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the module logs the epoch's training scores after this hook: print at the next one
        self.finished = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.print_epoch(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.print_epoch(trainer)

    def print_epoch(self, trainer: L.Trainer) -> None:
        if self.finished is None or not self.enabled:
            return
        metrics = trainer.callback_metrics
        fresh = [k for k in EPOCH_SCORES if self.validated or k.startswith("train")]
        shown = [k for k in fresh if k in metrics]
        parts = [f"Epoch {self.finished + 1}/{trainer.max_epochs}"]
        parts += [f"{k} {float(metrics[k]):.4f}" for k in shown]
        if "perf/train_images_per_s" in metrics:
            parts.append(f"{float(metrics['perf/train_images_per_s']):.1f} images/s")
        done = self.finished + 1 - self.first_epoch
        per_epoch = (time.perf_counter() - self.start) / max(done, 1)
        left = per_epoch * max((trainer.max_epochs or 0) - self.finished - 1, 0)
        parts.append(f"{per_epoch:.1f} s/epoch, {duration(left)} left")
        log.info("  ".join(parts))
        self.finished, self.validated = None, False


def duration(seconds: float) -> str:
    """``1h 02m``, ``3m 05s`` or ``42s``."""
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s" if m else f"{s}s"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are either the old file or the complete new one, never a torn write.

    Lightning stages a checkpoint in the system temp folder and moves it into place; when that
    folder is on another filesystem (a tmpfs /tmp, a cluster's scratch) the move is a copy, and a
    process killed during the copy leaves a truncated ``last.ckpt``. Here the file is written
    beside its destination, flushed to disk and renamed over it (``os.replace`` is atomic).
    Remote paths (``s3://`` ...) keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
