"""Train a U-Net from a Hydra config: ``python -m cellseg.train experiment=augmented``."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cellseg import checkpoint, config_dir, threads
from cellseg.callbacks import FitThreads, tensorboard_writers
from cellseg.cli import in_multirun, one_line_errors, quiet_console, rank_zero_logger, run
from cellseg.errors import UserError
from cellseg.eval import scoring_command
from cellseg.memory import keep_freed_memory
from cellseg.targets import TARGET_NAMES
from cellseg.unet import count_parameters

log = rank_zero_logger(__name__)
PRIVATE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group holding several objects (callbacks, loggers)."""
    made = [hydra.utils.instantiate(c) for c in (group or {}).values() if c and "_target_" in c]
    return [m for m in made if m is not None]  # a factory may answer None: off


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere it is emulated.

    torch answers through private functions; a torch without them counts as no (fp32).
    """
    checks = [getattr(torch.cpu, name, None) for name in PRIVATE_BF16_CHECKS]
    if not all(callable(check) for check in checks):
        log.warning(
            "torch %s cannot tell whether this CPU has native bf16 (no torch.cpu.%s)",
            torch.__version__, " or ".join(PRIVATE_BF16_CHECKS),
        )
        return False
    return any(check() for check in checks)


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


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data (read and checked first), model and trainer as the config describes them."""
    if cfg.get("keep_freed_memory"):
        keep_freed_memory()
    model = hydra.utils.instantiate(cfg.model, _recursive_=False, _convert_="all")
    if cfg.get("pretrained"):
        start_from(model, cfg)
    datamodule = build_data(cfg, model.net.multiple)
    log.info("Network: %s parameters", f"{count_parameters(model):,}")
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    if precision != str(cfg.trainer.precision):
        log.info("trainer.precision=%s: %s on this machine", cfg.trainer.precision, precision)
    callbacks = [*instantiate_group(cfg.get("callbacks")), FitThreads()]
    trainer = hydra.utils.instantiate(
        cfg.trainer, precision=precision, callbacks=callbacks,
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer


FINETUNE_KEYS = ("mode", "in_channels", "normalize", "invert_bright", "img_size")


def start_from(model: L.LightningModule, cfg: DictConfig) -> None:
    """Fine-tuning: the weights of the model ``cfg.pretrained`` names (a shipped model's name or
    a .ckpt, :mod:`cellseg.checkpoint`), refused in one line when this run's network or input
    preparation differs from the pretrained model's (they must stay what it learnt with)."""
    pretrained = checkpoint.load(cfg.pretrained)
    source = pretrained.module
    log.info("Fine-tuning from %s", pretrained.first_line().removeprefix("model: "))
    if pretrained.data.get("diameter"):
        log.info("The pretrained model's training nuclei: %.1f px across; the fine-tuned model "
                 "records its own training nuclei's size instead (below)",
                 pretrained.data["diameter"])
    theirs, ours = dict(source.hparams.net), dict(model.hparams.net)
    for key in sorted(set(theirs) | set(ours)):
        if key != "init" and theirs.get(key) != ours.get(key):
            raise UserError(
                f"model.net.{key}={ours.get(key)} but pretrained={cfg.pretrained} has "
                f"{theirs.get(key)}; a fine-tuned model keeps the pretrained network (drop the "
                "override, or train from scratch with pretrained=null)"
            )
    data = pretrained.data["hparams"]
    for key in FINETUNE_KEYS:
        if key in data and cfg.data.get(key) != data[key] and (key != "img_size"
                                                                or data["mode"] == "resize"):
            raise UserError(
                f"data.{key}={cfg.data.get(key)} but pretrained={cfg.pretrained} was trained "
                f"with {data[key]}; a fine-tuned model keeps the pretrained input preparation"
            )
    model.net.load_state_dict(source.net.state_dict())


def build_data(cfg: DictConfig, multiple: int) -> L.LightningDataModule:
    """The DataModule, checked against the network's size ``multiple``, its images found, read
    and split now: a data error arrives in seconds, before the trainer is built (``fit`` then
    reuses what was read)."""
    augmentation = None
    if cfg.get("augmentation"):  # plain lists, not OmegaConf ones: slow to read per image
        augmentation = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    datamodule = hydra.utils.instantiate(cfg.data, augmentation=augmentation, _convert_="all")
    datamodule.set_multiple(multiple)
    datamodule.prepare_data()
    datamodule.setup("fit")  # logs the data found and the split
    return datamodule


def config_line(cfg: DictConfig) -> str:
    """The settings a researcher reads first, on one line (the rest: ``.hydra/config.yaml``)."""
    data, model = cfg.data, cfg.model
    geometry = (f"resized to {data.img_size}" if data.mode == "resize"
                else f"{data.crop_size}-px crops")
    if data.get("crops_by_area"):  # refused in resize mode
        power, by = data.get("area_power", 1.0), "nuclei" if data.get("crops_by_nuclei") else "area"
        geometry += f" by {by}" if power == 1 else f" by {by}^{power:g}"
        geometry += " and kind" if data.get("crops_by_kind") else ""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    optimizer = model.get("optimizer") or {}
    return (
        f"Run {cfg.name}: data={data.layout} ({geometry}), "
        f"augmentation={choices.get('augmentation', '?')}, "
        f"outputs={','.join(TARGET_NAMES[: model.net.out_channels])}, loss={model.loss}, "
        f"{str(optimizer.get('_target_', 'Adam')).rsplit('.', 1)[-1]} lr={optimizer.get('lr')}, "
        f"batch {data.batch_size}, {cfg.trainer.max_epochs} epochs, "
        f"precision={cfg.trainer.precision}, seed={cfg.get('seed')}"
    )


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint written by ``cellseg.train`` to resume (``cellseg.checkpoint.read``, which
    also needs the training loop's ``epoch``)."""
    ckpt = checkpoint.read(path)
    if "epoch" not in ckpt:
        raise UserError(
            f"ckpt_path={path} holds weights but no training state (a shipped or slimmed "
            "model); to train from it use experiment=finetune model=" + str(path)
        )
    return ckpt


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What makes two runs the same experiment: its name, its data, its network, and whether
    it trains on every batch (``ckpt_path=last`` never resumes a ``debug=fast`` run)."""
    batches = cfg.trainer.get("limit_train_batches")
    return {
        "experiment": cfg.get("name"),
        "data": f"{cfg.data.layout} {Path(str(cfg.data.root)).expanduser().resolve()}",
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),
        "batches": "all" if batches in (None, 1.0) else batches,
    }


def saved_identity(run: Path) -> dict[str, Any] | None:
    """``run_identity`` of a run folder's saved config; None where it cannot be read."""
    try:
        return run_identity(OmegaConf.load(run / ".hydra/config.yaml"))
    except Exception:  # a missing or foreign config: no identity, so never a match
        return None


def resolve_ckpt(ckpt_path: str | None, log_dir: str, cfg: DictConfig | None = None) -> str | None:
    """``last``: the newest ``checkpoints/last.ckpt`` under ``log_dir`` of a run of the same
    experiment, data and network as ``cfg`` (any run if no cfg); else the path as given."""
    if ckpt_path != "last":
        if ckpt_path and not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} does not exist; pass <run>/checkpoints/last.ckpt or last"
            )
        return ckpt_path
    found = [*Path(log_dir).glob("train/*/*/checkpoints/last.ckpt"),
             *Path(log_dir).glob("train/*/*/*/checkpoints/last.ckpt")]
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no run under {log_dir} has checkpoints/last.ckpt")
    found.sort(key=os.path.getmtime, reverse=True)
    wanted = run_identity(cfg) if cfg is not None else None
    same = [p for p in found if wanted is None or saved_identity(p.parents[1]) == wanted]
    if not same:
        others = ", ".join(str(p.parents[1]) for p in found[:3])
        raise FileNotFoundError(
            f"ckpt_path=last: no run under {log_dir} has the experiment, data and network of this "
            f"one ({wanted['experiment']}, {wanted['data']}); newest of other runs: {others}; "
            "pass ckpt_path=<run>/checkpoints/last.ckpt to resume one of them"
        )
    log.info("Resuming from %s", same[0])
    return str(same[0])


def check_resumable(ckpt: dict[str, Any], path: str, model: L.LightningModule) -> None:
    """Refuse to resume a checkpoint of a different network with a message, not a traceback."""
    saved = ckpt.get("hyper_parameters")
    if saved and saved.get("net") != model.hparams.net:
        raise UserError(
            f"{path} holds a network {saved.get('net')} but the config asks for "
            f"{dict(model.hparams.net)}; resume with the run's own model settings"
        )


@threads.sharing_cores
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the chosen checkpoint, log hyperparameters with the results; return the
    metrics (none when ``ckpt_path`` holds a run that already finished its epochs)."""
    quiet_console()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info(config_line(cfg))
    ckpt_path = resolve_ckpt(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg)
    ckpt = read_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None and ckpt["epoch"] + 1 >= cfg.trainer.max_epochs:
        log.info(
            "%s: the run is complete (%d of trainer.max_epochs=%d epochs); raise "
            "trainer.max_epochs to train on, or score it: python -m cellseg.eval ckpt_path=%s",
            ckpt_path, ckpt["epoch"] + 1, cfg.trainer.max_epochs, ckpt_path,
        )
        return {}
    datamodule, model, trainer = build(cfg)
    model.provenance = provenance()
    if ckpt is not None:
        check_resumable(ckpt, ckpt_path, model)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as err:
        if trainer.current_epoch == 0 and trainer.is_global_zero:  # no run to list in TensorBoard
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    shutil.rmtree(logger.log_dir, ignore_errors=True)
        if isinstance(err, SystemExit):  # Lightning's exit on SIGTERM (status 0!) or Ctrl-C
            log.error(stopped(trainer, cfg.trainer.max_epochs))
            raise SystemExit(143 if trainer.received_sigterm else 130) from None
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    tested = None
    if cfg.get("test"):
        tested = checkpoint_to_test(cfg.get("test_ckpt", "best"), best, trainer)
        trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    hp_metrics = {f"hp/{k.replace('/', '_')}": v for k, v in metrics.items()}
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab pairs them with metrics
            logger.log_hyperparams(params, hp_metrics)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(hp_metrics, step=trainer.global_step)
    report(trainer, metrics, tested or last_checkpoint(trainer), bool(cfg.get("test")))
    return metrics


def stopped(trainer: L.Trainer, max_epochs: int) -> str:
    """The line a run stopped by a signal ends with: where, and how to go on."""
    how = "SIGTERM" if trainer.received_sigterm else "an interrupt (Ctrl-C)"
    last = last_checkpoint(trainer)
    go_on = (f"go on with the same command and ckpt_path={last}" if last
             else "no checkpoint was written yet: run it again")
    return (f"training stopped by {how} in epoch {trainer.current_epoch + 1} of {max_epochs}: "
            f"nothing was tuned or tested; {go_on}")


def provenance() -> dict[str, str]:
    """The command and the commit (``git describe``, ``+dirty`` with uncommitted changes) that
    trained a model, stored in its checkpoints."""
    command = " ".join(["python -m cellseg.train", *map(shlex.quote, sys.argv[1:])])
    here = Path(__file__).parent
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"], cwd=here,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = f"cellseg {version('cellseg')} (not a git checkout)"
    return {"command": command, "commit": commit}


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The ``last.ckpt`` this run wrote (the final weights), if any."""
    paths = [Path(cb.dirpath) / "last.ckpt" for cb in trainer.checkpoint_callbacks if cb.dirpath]
    return next((str(p) for p in paths if p.is_file()), None)


def checkpoint_to_test(choice: str, best: str, trainer: L.Trainer) -> str | None:
    """The checkpoint to test: ``best`` (on validation) or ``last`` (the final weights, tested
    in memory; their ``last.ckpt`` is named). A checkpoint is never chosen on the test images:
    where validation is the test split, ``best`` tests the final weights (logged)."""
    if choice not in ("best", "last"):
        raise UserError(f"test_ckpt={choice!r}; use best or last")
    splits = getattr(trainer.datamodule, "splits", None) or {}
    if choice == "best" and best and splits.get("val") == splits.get("test"):
        log.info("Testing the last epoch's weights: validation is the test split here, so the "
                 "best checkpoint on validation would be chosen on the test images")
        return None
    if choice == "best" and best:
        log.info("Testing the best checkpoint on validation: %s", best)
        return best
    log.info("Testing the last epoch's weights")
    return None


def report(
    trainer: L.Trainer, metrics: dict[str, float], checkpoint: str | None, tested: bool
) -> None:
    """Print the final scores and where the logs are; last, the checkpoint (the tested one)."""
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
    if shown:
        log.info("Final scores: %s", ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    else:  # no held-back image scored (experiment=finetune trains on every image)
        log.info("No scores: no held-back image was scored. Score the model on annotated "
                 "images it did not see: %s",
                 scoring_command(checkpoint or "<run>/checkpoints/last.ckpt"))
    for writer in tensorboard_writers(trainer):
        log.info("TensorBoard: %s  (tensorboard --logdir logs)", writer.log_dir)
    if checkpoint:
        log.info("%s checkpoint: %s", "Tested" if tested else "Last", checkpoint)


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a Hydra sweeper optimises; a clear error (in a sweep) if it was never logged."""
    if not name or not metrics:
        return None
    if name not in metrics:
        problem = f"optimized_metric={name} was not logged (did the run validate?)"
        if in_multirun():
            raise UserError(f"{problem}; logged: {', '.join(sorted(metrics))}")
        log.warning("%s; a sweep would need it", problem)
        return None
    return metrics[name]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return metric_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    run(main)
