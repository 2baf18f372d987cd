"""Every option of every config group composes and instantiates (as the lightning-hydra-template's
``test_configs.py``): a typo in a ``_target_`` or an interpolation fails here, not in a run."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
import tifffile
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from cellseg import config_dir, synthetic
from cellseg.datasets import read_samples
from cellseg.inference import predict_image
from cellseg.instances import instances
from cellseg.train import build
from cellseg.unet import UNet
from helpers import TINY_SYNTHETIC, compose_cfg, make_cfg

GROUPS = Path(config_dir())
NEEDS_GPU = {("trainer", "gpu")}
# Hydra's own groups: composed with the hydra config, their sweeper/launcher instantiated
HYDRA_GROUPS = ("hparams_search", "launcher", "hydra")
# eval's and predict's groups: composed (and run) with those configs below
PREDICT_GROUPS = ("inference", "instances", "cluster", "shared")
TOP_LEVEL = ("train", "eval", "predict", "compare", "bench")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (GROUPS / group).glob("*.yaml"))


TRAIN_OPTIONS = [
    (group.name, option)
    for group in sorted(p for p in GROUPS.iterdir() if p.is_dir())
    if group.name not in (*HYDRA_GROUPS, *PREDICT_GROUPS)
    for option in options(group.name)
]


EXPERIMENT_DATA = {("experiment", "general"): "dsb2018", ("experiment", "finetune"): "folder"}


def test_every_group_is_covered():
    covered = {g for g, _ in TRAIN_OPTIONS} | {*HYDRA_GROUPS, *PREDICT_GROUPS}
    assert covered == {p.name for p in GROUPS.iterdir() if p.is_dir()}
    assert len(TRAIN_OPTIONS) >= 20


@pytest.mark.parametrize(("group", "option"), TRAIN_OPTIONS,
                         ids=[f"{g}={o}" for g, o in TRAIN_OPTIONS])
def test_train_option_composes_and_builds(tmp_path, group, option):
    if (group, option) in NEEDS_GPU and not torch.cuda.is_available():
        pytest.skip(f"{group}={option} needs a CUDA device")
    if group == "callbacks":  # the shrunk config sets callbacks.* that callbacks=none lacks
        cfg = compose_cfg("train", [f"callbacks={option}", *TINY_SYNTHETIC, "data.num_workers=0"])
        with open_dict(cfg):
            cfg.paths.root_dir = cfg.paths.output_dir = str(tmp_path)
            cfg.data.root = str(tmp_path / "data")
    elif (group, option) in EXPERIMENT_DATA:  # experiments that name their data
        cfg = make_cfg(tmp_path, [f"{group}={option}", f"data={EXPERIMENT_DATA[group, option]}"])
        with open_dict(cfg):
            cfg.data.root = str(small_dataset(tmp_path / option, cfg.data.layout))
            if cfg.data.train_roots:
                cfg.data.train_roots = [str(small_dataset(tmp_path / "more", "folder"))]
    else:
        cfg = make_cfg(tmp_path, [f"{group}={option}"])
    if group == "data" and option != "synthetic":  # build() reads the data: give it some
        with open_dict(cfg):
            cfg.data.root = str(small_dataset(tmp_path / option, cfg.data.layout))
    datamodule, model, trainer = build(cfg)
    assert model.net.multiple == 2 ** len(cfg.model.net.channels)
    assert datamodule.hparams.layout == cfg.data.layout
    if group == "trainer":
        assert trainer.max_epochs == cfg.trainer.max_epochs


def small_dataset(root: Path, layout: str) -> Path:
    """10 synthetic 64x64 images in the dsb2018 layout, or as a folder-layout copy."""
    synthetic.generate(root / "dsb2018", n_images=10, size=64)
    if layout == "dsb2018":
        return root / "dsb2018"
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True)
    for sample in read_samples(root / "dsb2018", "dsb2018"):
        Image.fromarray(sample.image).save(root / "images" / f"{sample.id}.png")
        tifffile.imwrite(root / "masks" / f"{sample.id}.tif", sample.labels.astype(np.uint16))
    return root


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_config_composes(name):
    required = {"eval": ["ckpt_path=x"], "predict": ["ckpt_path=x", "input=x", "output=y"],
                "compare": ["runs=[x]"]}
    cfg = compose_cfg(name, required.get(name, []))
    assert cfg.task_name == name


@pytest.mark.parametrize("option", options("inference"))
def test_inference_option_runs(option):
    cfg = compose_cfg("eval", ["ckpt_path=x", f"inference={option}"])
    image = np.random.default_rng(0).random((40, 200, 3)).astype(np.float32)
    probs = predict_image(UNet(3).eval(), image, mode="resize", img_size=32, **cfg.inference)
    assert probs.shape == (40, 200, 1)


@pytest.mark.parametrize("option", options("cluster"))
def test_cluster_option_composes_into_predict(option):
    cfg = compose_cfg("predict", ["input=x", "output=y", f"cluster={option}"])
    assert cfg.cluster.kind == option  # the SLURM one's job script: tests/test_blocks.py


@pytest.mark.parametrize("option", options("instances"))
def test_instances_option_runs(option):
    cfg = compose_cfg("eval", ["ckpt_path=x", f"instances={option}"])
    opts = dict(cfg.instances)
    opts.pop("use_contours")
    probs = np.zeros((32, 32), np.float32)
    probs[4:14, 4:14] = probs[20:30, 18:28] = 1.0
    given = {k: v for k, v in opts.items() if v is not None}  # null: tuned, else the default
    assert instances(probs, None, **given).max() == 2


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize(
    "override", [f"hparams_search={o}" for o in options("hparams_search")]
    + [f"launcher={o}" for o in options("launcher")] + ["hydra=default"],
)
def test_hydra_option_composes_and_its_plugin_instantiates(override, tmp_path):
    cfg = compose_with_hydra([override, f"paths.root_dir={tmp_path}"])
    assert cfg.hydra.run.dir
    assert cfg.hydra.sweep.dir
    if override.startswith("hparams_search"):
        sweeper = hydra.utils.instantiate(cfg.hydra.sweeper, _recursive_=False)
        assert type(sweeper).__name__ == "OptunaSweeper"
    if override.startswith("launcher"):
        launcher = hydra.utils.instantiate(cfg.hydra.launcher)
        assert type(launcher).__name__ == "SlurmLauncher"


def test_native_long_is_native_with_a_twice_longer_schedule():
    native = compose_cfg("train", ["experiment=native"])
    long = compose_cfg("train", ["experiment=native_long"])
    assert long.trainer.max_epochs == 2 * native.trainer.max_epochs == 240
    assert long.model.scheduler.T_max == 240  # the cosine schedule follows max_epochs
    assert long.name == "native_long"
    for key in ("data", "augmentation", "model.net", "model.loss"):
        assert OmegaConf.select(long, key) == OmegaConf.select(native, key)


def test_eval_predict_and_export_share_their_common_keys_from_one_file():
    """model=, ckpt_path and preprocess in configs/shared/model.yaml; device, backend, channel
    and diameter in shared/images.yaml: each written once, the same in every entry point."""
    model_keys = ("model_name", "ckpt_path", "preprocess")
    image_keys = ("device", "backend", "channel", "diameter")
    given = {"eval": [], "predict": ["input=x", "output=y"], "export": ["image=z"]}
    cfgs = {name: compose_cfg(name, overrides) for name, overrides in given.items()}
    for name, cfg in cfgs.items():
        for key in model_keys + (image_keys if name != "export" else ()):
            assert key in cfg, (name, key)
    assert cfgs["predict"].diameter == cfgs["eval"].diameter == "auto"
    for name in cfgs:  # nowhere else
        text = (GROUPS / f"{name}.yaml").read_text()
        assert not [k for k in model_keys + image_keys if f"\n{k}:" in text], name


def test_the_experiments_take_the_cosine_schedule_from_its_group():
    for experiment in ("baseline", "augmented", "native", "general", "finetune"):
        cfg = compose_cfg("train", [f"experiment={experiment}"])
        assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
        assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs
    assert compose_cfg("train", []).model.scheduler is None
    cosine = compose_cfg("train", ["scheduler=cosine", "trainer.max_epochs=7"])
    assert cosine.model.scheduler.T_max == 7
