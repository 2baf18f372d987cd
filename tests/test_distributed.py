"""Scaling out with Lightning: DDP on CPU processes (gloo) scores like a single process."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from cellseg import config_dir
from cellseg.datamodule import NucleiDataModule
from cellseg.module import SegmentationModule
from cellseg.train import build
from helpers import compose_cfg, failure, make_cfg, run_cli

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out

TINY_DDP = [
    "data.synthetic.n_images=15",  # 3 validation images: 2 + 1 (no process repeats one)
    "data.synthetic.size=64",
    "data.batch_size=8",  # global: 4 per process
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.image_grid=null",
    "logger=csv",
    "test=false",
]
SCORES = ("val/iou", "val/miou", "val/dice", "val/loss")


def last_logged(metrics_csv: Path) -> dict[str, float]:
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/iou")]
    return {k: float(rows[-1][k]) for k in SCORES}


def test_two_gloo_processes_validate_like_one(tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer=ddp", "trainer.devices=2", *TINY_DDP, f"hydra.run.dir={run_dir}"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, failure(out)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr + out.stdout
    ddp = last_logged(run_dir / "csv/metrics.csv")

    # the same weights and data, validated by one process
    cfg = make_cfg(tmp_path, TINY_DDP)
    cfg.data.root = str(tmp_path / "data/synthetic")
    datamodule, _, _ = build(cfg)
    model = SegmentationModule.load_from_checkpoint(
        run_dir / "checkpoints/last.ckpt", weights_only=True
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (single,) = trainer.validate(model, datamodule=datamodule)
    for key in SCORES:
        assert single[key] == pytest.approx(ddp[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(("world", "expected"), [(1, 16), (2, 8), (4, 4)])
def test_batch_size_is_global_and_split_over_processes(tmp_path, world, expected):
    dm = NucleiDataModule(str(tmp_path), batch_size=16)
    dm.trainer = SimpleNamespace(world_size=world)
    assert dm.device_batch_size() == expected


def test_a_batch_that_does_not_split_names_the_fix(tmp_path):
    dm = NucleiDataModule(str(tmp_path), batch_size=16)
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="data.batch_size=16 .* multiple of 3"):
        dm.device_batch_size()


def test_a_split_smaller_than_the_processes_names_the_fix(tmp_path):
    dm = NucleiDataModule(str(tmp_path))
    dm.datasets = {"val": list(range(3))}
    dm.trainer = SimpleNamespace(world_size=4, global_rank=0)
    with pytest.raises(ValueError, match="val split has 3 images for 4 processes"):
        dm.loader("val")


@pytest.mark.parametrize("name", ["ddp", "ddp_spawn"])
def test_ddp_configs(name):
    cfg = compose_cfg("train", [f"trainer={name}"])
    assert cfg.trainer.strategy == name
    assert cfg.trainer.devices == 2


def test_slurm_launcher_config_resolves_without_a_cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = ["launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.submitit_folder.endswith("/.submitit/%j")


def test_sweep_through_submitit_runs_its_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # submitit's local executor: the same pickled-job path as on SLURM, without a cluster
    tiny = ["debug=fast", "data.synthetic.n_images=10", "data.synthetic.size=64"]
    out = run_cli(["-m", "hydra/launcher=submitit_local", "seed=0,1", *tiny], tmp_path)
    assert out.returncode == 0, failure(out)
    (sweep,) = (tmp_path / "logs/train/multiruns").iterdir()
    for seed in (0, 1):  # job folders are named after their overrides
        (job,) = sweep.glob(f"{seed}_default_*seed-{seed}")
        assert (job / "checkpoints/last.ckpt").is_file()
    assert list((sweep / ".submitit").rglob("*_result.pkl"))


TINY_RUN = ["trainer.accelerator=cpu", "debug=fast", "data.synthetic.n_images=10",
            "data.synthetic.size=64", "data.batch_size=4", "callbacks.progress_bar=null"]


def test_multirun_with_ddp_spawn_trains_every_job_on_two_processes(tmp_path):
    out = run_cli(["-m", "trainer=ddp_spawn", "seed=0,1", *TINY_RUN], tmp_path)
    assert out.returncode == 0, failure(out)
    assert (out.stdout + out.stderr).count("MEMBER: 2/2") >= 2
    (sweep,) = (tmp_path / "logs/train/multiruns").iterdir()
    for seed in (0, 1):  # job folders are named after their overrides
        (job,) = sweep.glob(f"{seed}_default_*seed-{seed}")
        assert (job / "checkpoints/last.ckpt").is_file()


def test_torchrun_starts_the_processes_and_lightning_joins_them(tmp_path):
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                "--nproc-per-node=2"]
    args = ["trainer=ddp", *TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    out = run_cli(args, tmp_path, launcher=torchrun)
    assert out.returncode == 0, failure(out)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out.stdout + out.stderr
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()


EXIT_CHECK = """
import atexit, sys
import torch.distributed as dist
from cellseg.module import SegmentationModule
atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))  # runs last
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
model = SegmentationModule()
model.setup("fit")
model.setup("test")  # a second registration replaces the first
"""


def test_a_process_group_is_destroyed_at_exit_not_left_to_interpreter_shutdown(tmp_path):
    # a gloo group left to interpreter shutdown can abort a ddp_spawn worker (SIGABRT)
    out = subprocess.run([sys.executable, "-c", EXIT_CHECK, str(tmp_path / "group")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, failure(out)
    assert out.stdout.strip().splitlines()[-1] == "group alive at exit: False"
