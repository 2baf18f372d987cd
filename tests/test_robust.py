"""Faults without lost work: resume from 'last', mismatched checkpoints, non-finite losses,
reproducible runs."""

import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cellseg.module import SegmentationModule
from cellseg.train import resolve_ckpt, train


def test_ckpt_path_last_finds_the_newest_run(tmp_path):
    old = tmp_path / "train/runs/2026-01-01_baseline/checkpoints/last.ckpt"
    new = tmp_path / "train/multiruns/2026-01-02/1_augmented/checkpoints/last.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() + i, time.time() + i))
    assert resolve_ckpt("last", str(tmp_path)) == str(new)
    assert resolve_ckpt(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no run under"):
        resolve_ckpt("last", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt(str(tmp_path / "nope.ckpt"), str(tmp_path))


def test_resuming_a_different_network_is_refused(cfg_factory):
    cfg = cfg_factory("trainer.max_epochs=1")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    other = cfg_factory("model.net.out_channels=2", f"ckpt_path={last}")
    other.paths.output_dir += "_other"
    with pytest.raises(ValueError, match="holds a network"):
        train(other)


def nan_loader():
    images = torch.full((2, 3, 32, 32), float("nan"))
    masks = torch.zeros(2, 1, 32, 32)
    return DataLoader([{"image": i, "mask": m} for i, m in zip(images, masks, strict=True)],
                      batch_size=2)


def fit_one_step(model):
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=nan_loader())


def test_non_finite_loss_stops_naming_epoch_and_step():
    with pytest.raises(FloatingPointError, match="epoch 0, step 0"):
        fit_one_step(SegmentationModule())


def test_non_finite_loss_can_skip_the_batch():
    model = SegmentationModule(nonfinite_loss="skip")
    before = [p.detach().clone() for p in model.parameters()]
    fit_one_step(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_same_seed_gives_the_same_metrics(cfg_factory):
    runs = []
    for name in ("a", "b"):
        cfg = cfg_factory("experiment=augmented", "trainer.max_epochs=2", "seed=3")
        cfg.paths.output_dir += name
        runs.append(train(cfg))
    keys = ("train/loss", "val/loss", "val/iou", "test/iou")
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]
