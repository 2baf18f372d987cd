"""LightningModule: the U-Net with its loss, metrics, logging and optimiser."""

from __future__ import annotations

import atexit
import logging
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric

from cellseg.checkpoint import describe_data
from cellseg.errors import UserError
from cellseg.metrics import pixel_metrics
from cellseg.unet import UNet

log = logging.getLogger(__name__)


def destroy_process_group_at_exit() -> None:
    """Destroy this process's process group when it exits, while Python is still whole.

    Lightning does so for NCCL only; a gloo group left to interpreter shutdown can abort the
    process ("terminate called without an active exception", SIGABRT), seen once in CI in a
    ddp_spawn worker. Registering again replaces the earlier registration.
    """
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice of sigmoid(logits) and target over the batch, averaged over channels."""
    prob = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (prob * target).sum(dims)
    dice = (2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)
    return 1 - dice.mean()


LOSSES = ("bce", "dice_bce")


def check_loss(name: str) -> None:
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")


def segmentation_loss(
    name: str, logits: Tensor, target: Tensor, weight: Tensor | None = None
) -> Tensor:
    """``bce`` (binary cross-entropy on logits, the study's) or ``dice_bce`` (their sum);
    ``weight`` (N, H, W) weighs each pixel's cross-entropy in the channels that split touching
    nuclei (contours, distance, centre offsets), not in the foreground channel. Dice scores
    the first three channels only: the centre offsets (3, 4) are no masks."""
    check_loss(name)
    if weight is None:
        bce = F.binary_cross_entropy_with_logits(logits, target)
    else:
        each = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce = torch.cat([each[:, :1], each[:, 1:] * weight[:, None]], dim=1).mean()
    if name == "bce":
        return bce
    return bce + soft_dice_loss(logits[:, :3], target[:, :3])


CHECKPOINT_FORMAT = 2  # cellseg's own keys: 2 adds checkpoint["cellseg"] (format, commit, command)


class SegmentationModule(L.LightningModule):
    """Binary nucleus segmentation with the study's U-Net.

    Every argument is a primitive (dicts of numbers and strings), so checkpoints load with
    ``torch.load(weights_only=True)``; ``optimizer``/``scheduler`` are Hydra configs with
    ``_partial_: true`` that are called with the parameters / optimiser here. ``compile``
    compiles the network with ``torch.compile`` for training (slower on CPU here; see the
    README's performance section). ``preprocess`` is read only from checkpoints older than the
    data description (``cellseg.checkpoint.preprocessing`` reads the datamodule's hyperparameters
    and state, which ``on_load_checkpoint`` keeps as ``data_description``).
    """

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        loss: str = "bce",
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        channels_last: bool = True,
        preprocess: dict[str, Any] | None = None,
        nonfinite_loss: str = "raise",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_loss(loss)  # fail before training, not at the first step
        if nonfinite_loss not in ("raise", "skip"):
            raise UserError(f"nonfinite_loss={nonfinite_loss!r}; use raise or skip")
        self.net = UNet(**(net or {}))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.train_metrics = pixel_metrics("train/")
        self.val_metrics = pixel_metrics("val/")
        self.test_metrics = pixel_metrics("test/")
        # "ignore" drops a skipped batch's NaN; "disable" would also drop the weights (it
        # replaces them with ones in torchmetrics 1.x), making the loss a mean of batch means
        self.train_loss = MeanMetric(nan_strategy="ignore")
        self.val_loss = MeanMetric(nan_strategy="ignore")
        self.test_loss = MeanMetric(nan_strategy="ignore")
        self.val_iou_best = MaxMetric()
        self.resumed_iou_best: float | None = None  # from the checkpoint a run resumes
        self.provenance: dict[str, Any] = {}  # train.py: the commit and command of the run

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what the checkpoint says beside the weights, read once with them
        self.data_description = describe_data(checkpoint)
        self.postprocess = checkpoint.get("postprocess") or {}
        self.resumed_iou_best = checkpoint.get("val_iou_best")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the best validation iou so far (a MaxMetric keeps no state in the state dict): a
        # resumed run reports the best of all its epochs, not only of those after the resume
        if self.val_iou_best.update_count:
            checkpoint["val_iou_best"] = float(self.val_iou_best.compute())
        checkpoint["cellseg"] = {"format": CHECKPOINT_FORMAT, **self.provenance}

    def setup(self, stage: str) -> None:
        if torch.distributed.is_initialized():
            destroy_process_group_at_exit()
        if self.hparams.compile and stage == "fit":  # in place: checkpoint keys stay the same
            self.net.compile()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def check_batch(self, images: Tensor, masks: Tensor) -> None:
        """Input checks in one place: shapes and the number of target channels."""
        self.net.check_input(images)
        expected = (images.shape[0], self.net.head.out_channels, *images.shape[-2:])
        if tuple(masks.shape) != expected:
            raise UserError(
                f"targets {tuple(masks.shape)} do not match images {tuple(images.shape)}; "
                f"expected {expected} (data.target_channels = model.net.out_channels)"
            )

    def shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        images, masks = batch["image"], batch["mask"]
        self.check_batch(images, masks)
        logits = self(images)
        if images.shape[0] == 1 and "size" in batch:  # a padded whole image: score its pixels
            h, w = batch["size"][0].tolist()
            logits, masks = logits[..., :h, :w], masks[..., :h, :w]
        loss = segmentation_loss(self.hparams.loss, logits.float(), masks, batch.get("weight"))
        # Metrics (exact under DDP): updated per step, computed and logged once per epoch in
        # log_epoch: self.log of a Metric on every step cost Lightning about 2 ms per step
        getattr(self, f"{stage}_metrics").update(logits.detach()[:, :1], masks[:, :1])
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=images.shape[0])
        return loss

    def log_epoch(self, stage: str) -> dict[str, Tensor]:
        """Log the epoch's loss and pixel scores of ``stage`` (synced over processes), reset."""
        mean_loss, metrics = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_metrics")
        scores = {f"{stage}/loss": mean_loss.compute(), **metrics.compute()}
        mean_loss.reset()
        metrics.reset()
        # the values are already the same on every process; sync_dist only keeps Lightning
        # from warning that they might not be
        sync = self.trainer.world_size > 1
        self.log(f"{stage}/loss", scores[f"{stage}/loss"], prog_bar=True, sync_dist=sync)
        others = {k: v for k, v in scores.items() if k != f"{stage}/loss"}
        self.log_dict(others, prog_bar=stage != "train", sync_dist=sync)
        return scores

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self.shared_step(batch, "train")
        if torch.isfinite(loss):  # one host sync per step: free on CPU, cheap beside a step
            return loss
        where = f"epoch {self.current_epoch}, step {self.global_step}, batch {batch_idx}"
        if self.hparams.nonfinite_loss == "skip":
            log.warning("non-finite loss at %s: batch skipped", where)
            return None  # Lightning skips the optimiser step
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) at {where}; lower model.optimizer.lr, check the "
            "input images, or set model.nonfinite_loss=skip"
        )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "test")

    def on_train_start(self) -> None:
        self.val_iou_best.reset()  # forget the sanity check's untrained score
        if self.resumed_iou_best is not None:
            self.val_iou_best(torch.tensor(self.resumed_iou_best))

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        scores = self.log_epoch("val")
        self.val_iou_best(scores["val/iou"])
        self.log("val/iou_best", self.val_iou_best.compute(), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = self.hparams.optimizer or {"_target_": "torch.optim.Adam", "_partial_": True}
        optimizer = hydra.utils.instantiate(opt_cfg)(params=self.parameters())
        if not self.hparams.scheduler:
            return {"optimizer": optimizer}
        scheduler = hydra.utils.instantiate(self.hparams.scheduler)(optimizer=optimizer)
        schedule = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
