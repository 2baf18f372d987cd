"""Faults without lost work: resume from 'last', mismatched checkpoints, non-finite losses,
reproducible runs."""

import logging
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cellseg.cli import one_line_errors
from cellseg.module import SegmentationModule
from cellseg.train import metric_value, read_checkpoint, resolve_ckpt, train


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


def saved_run(log_dir: Path, name: str, cfg, age: float) -> Path:
    """A run folder as Hydra and training leave it: its config and a last.ckpt of a given age."""
    run = log_dir / "train/runs" / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra/config.yaml")
    last = run / "checkpoints/last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    os.utime(last, (time.time() - age, time.time() - age))
    return last


def test_ckpt_path_last_takes_the_newest_run_of_the_same_config_or_lists_the_others(cfg_factory):
    baseline, augmented = cfg_factory("experiment=baseline"), cfg_factory("experiment=augmented")
    log_dir = Path(baseline.paths.log_dir)
    old_baseline = saved_run(log_dir, "old_baseline", baseline, age=100)
    newer_augmented = saved_run(log_dir, "newer_augmented", augmented, age=10)
    assert resolve_ckpt("last", str(log_dir), baseline) == str(old_baseline)
    assert resolve_ckpt("last", str(log_dir), augmented) == str(newer_augmented)
    other_data = cfg_factory("experiment=baseline")
    other_data.data.root = "/elsewhere"
    with pytest.raises(FileNotFoundError) as err:
        resolve_ckpt("last", str(log_dir), other_data)
    message = str(err.value)
    assert "no run under" in message
    assert "(baseline, synthetic /elsewhere)" in message
    assert str(newer_augmented.parents[1]) in message
    assert str(old_baseline.parents[1]) in message
    # a run on every batch does not resume a newer debug=fast smoke test of its experiment
    full = cfg_factory("experiment=baseline", "trainer.limit_train_batches=null")
    full_run = saved_run(log_dir, "full_baseline", full, age=50)
    saved_run(log_dir, "fast_baseline", cfg_factory("experiment=baseline", "debug=fast"), age=1)
    assert resolve_ckpt("last", str(log_dir), full) == str(full_run)


def test_resuming_a_finished_run_says_it_is_complete(cfg_factory, caplog):
    cfg = cfg_factory("trainer.max_epochs=1")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    again = cfg_factory("trainer.max_epochs=1", f"ckpt_path={last}")
    again.paths.output_dir += "_again"
    with caplog.at_level(logging.INFO):
        assert train(again) == {}
    assert f"{last}: the run is complete (1 of trainer.max_epochs=1 epochs)" in caplog.text
    assert not Path(again.paths.output_dir).exists()  # nothing trained, nothing tested


@pytest.mark.parametrize("content", [b"epoch 3", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_it(tmp_path, content, caplog):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_checkpoint(str(path))
    assert str(err.value).startswith(f"ckpt_path={path} is not a cellseg checkpoint")
    assert "KeyError" not in str(err.value)
    assert "pop from" not in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        one_line_errors(read_checkpoint)(str(path))  # as every entry point reports it
    assert exit_.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in record.getMessage()
    assert "HYDRA_FULL_ERROR=1" in record.getMessage()


def test_a_run_that_fails_in_its_first_epoch_leaves_no_tensorboard_run(cfg_factory, monkeypatch):
    def fails(*args):
        raise FloatingPointError("non-finite loss")

    monkeypatch.setattr(SegmentationModule, "training_step", fails)
    cfg = cfg_factory()
    with pytest.raises(FloatingPointError):
        train(cfg)  # after the image grid callback wrote the training samples
    out = Path(cfg.paths.output_dir)
    assert out.is_dir()
    assert not list(out.rglob("events.out.tfevents.*"))


def test_native_writes_last_ckpt_every_epoch_though_it_validates_every_fifth(cfg_factory):
    cfg = cfg_factory("experiment=native", "trainer.max_epochs=2", "data.crop_size=32",
                      "trainer.check_val_every_n_epoch=5")
    metrics = train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert "val/iou" not in metrics
    assert metric_value(metrics, "val/iou_best") is None  # a warning outside a sweep, no crash
