"""Train a U-Net from a Hydra config: ``python -m cellseg.train experiment=augmented``."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cellseg import config_dir
from cellseg.callbacks import tensorboard_writers

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group holding several objects (callbacks, loggers)."""
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c and "_target_" in c]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere it is emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for the hardware at hand.

    ``mixed`` picks ``bf16-mixed`` on GPUs that support it, ``16-mixed`` on older GPUs,
    ``bf16-mixed`` on CPUs with native bf16 and ``32-true`` on other CPUs. A ``bf16-mixed`` or
    ``mixed`` request on a CPU without native bf16 falls back to ``32-true`` with a warning.
    """
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        if precision == "mixed":
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return precision
    if precision in ("mixed", "bf16-mixed"):
        if cpu_has_bf16():
            return "bf16-mixed"
        log.warning(
            "trainer.precision=%s: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 "
            "is emulated and slower; training in 32-true instead", precision
        )
        return "32-true"
    return precision


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory PyTorch frees for the next training step.

    By default glibc hands free memory at the top of its heap back to the system once 128 KiB
    or more is free, so every step faults the pages of its activations in again (measured here:
    twice the page faults and kernel time of a run with this, about 10 % of a 64x64 step). A
    high trim threshold keeps them; the mmap threshold is pinned at glibc's own maximum (32 MiB)
    because setting either turns glibc's adaptive thresholds off. Peak memory is the same; the
    process does not shrink after it. Returns False (logged) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("keep_freed_memory: no glibc mallopt here; the memory allocator is left as is")
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if mallopt(m_mmap_threshold, 32 * 2**20) and mallopt(m_trim_threshold, 2**30):
        return True
    log.warning("keep_freed_memory: glibc refused mallopt; the memory allocator is left as is")
    return False


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data, model and trainer as the config describes them (and the allocator setting)."""
    if cfg.get("keep_freed_memory"):
        keep_freed_memory()
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    augmentation = None
    if cfg.get("augmentation"):  # plain lists, not OmegaConf ones: slow to read per image
        augmentation = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    datamodule = hydra.utils.instantiate(cfg.data, augmentation=augmentation, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _recursive_=False, _convert_="all")
    trainer = hydra.utils.instantiate(
        cfg.trainer, precision=precision, callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer


def resolve_ckpt(ckpt_path: str | None, log_dir: str) -> str | None:
    """``last``: the newest ``runs/*/checkpoints/last.ckpt`` under ``log_dir``; else the path."""
    if ckpt_path != "last":
        if ckpt_path and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        return ckpt_path
    found = sorted(Path(log_dir).glob("train/*/*/checkpoints/last.ckpt"), key=os.path.getmtime)
    found += sorted(Path(log_dir).glob("train/*/*/*/checkpoints/last.ckpt"), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no run under {log_dir} has checkpoints/last.ckpt")
    newest = max(found, key=os.path.getmtime)
    log.info("Resuming from %s", newest)
    return str(newest)


def check_resumable(ckpt_path: str | None, model: L.LightningModule) -> None:
    """Refuse to resume a checkpoint of a different network with a message, not a traceback."""
    if not ckpt_path:
        return
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters")
    if saved and saved.get("net") != model.hparams.net:
        raise ValueError(
            f"{ckpt_path} holds a network {saved.get('net')} but the config asks for "
            f"{dict(model.hparams.net)}; resume with the run's own model settings"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, log hyperparameters with the results; return the metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt(cfg.get("ckpt_path"), cfg.paths.log_dir)
    datamodule, model, trainer = build(cfg)
    check_resumable(ckpt_path, model)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test"):
        tested = test_checkpoint(cfg.get("test_ckpt", "best"), best)
        log.info("Testing the %s weights", tested or "last epoch's")
        trainer.test(model, datamodule=datamodule, ckpt_path=tested)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    hp_metrics = {f"hp/{k.replace('/', '_')}": v for k, v in metrics.items()}
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab pairs them with metrics
            logger.log_hyperparams(params, hp_metrics)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(hp_metrics, step=trainer.global_step)
    report(trainer, metrics, best)
    return metrics


def test_checkpoint(choice: str, best: str) -> str | None:
    """The checkpoint path to test: ``best`` (on validation) or ``last`` (the final weights)."""
    if choice not in ("best", "last"):
        raise ValueError(f"test_ckpt={choice!r}; use best or last")
    return best or None if choice == "best" else None


def report(trainer: L.Trainer, metrics: dict[str, float], best: str) -> None:
    """Print the final metrics and where the logs and checkpoints are."""
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/", "perf/"))}
    log.info("Final metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    for writer in tensorboard_writers(trainer):
        log.info("TensorBoard logs: %s  (tensorboard --logdir logs)", writer.log_dir)
    if best:
        log.info("Best checkpoint: %s", best)


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a Hydra sweeper optimises; a clear error if the metric was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}")
    return metrics[name]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return metric_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
