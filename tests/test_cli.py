"""The first hour of a new user: what the console shows, how errors read, how runs are named."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cellseg import config_dir, run_name
from cellseg.train import cpu_has_bf16, resolve_precision, train
from helpers import TINY_SYNTHETIC, compose_cfg, failure

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Tip:", "GPU available", "model summary", "LeafSpec", "v_num", "Traceback", "it/s")


def user_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m cellseg.train args`` as a user runs it: no HYDRA_FULL_ERROR, no terminal."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["CELLSEG_ROOT"] = str(cwd)
    return subprocess.run([sys.executable, "-m", "cellseg.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_data_error_is_one_line_before_the_network_is_built(tmp_path):
    out = user_cli(["data=folder", f"data.root={tmp_path / 'nope'}"], tmp_path)
    assert out.returncode == 1
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert lines[-1].endswith(
        f"ERROR: data.root {tmp_path / 'nope'} does not exist; point data.root at your dataset "
        "(see data/README.md) (HYDRA_FULL_ERROR=1 shows the traceback)"
    )
    assert len(lines) == 2
    assert lines[0].split("] ", 1)[1].startswith("Run default: data=folder")
    (run,) = (tmp_path / "logs/train/runs").iterdir()
    assert run.name.endswith("_default_nope")  # data=folder runs are named after their folder
    assert not list(run.rglob("events.out.tfevents.*"))  # no TensorBoard run to clutter the list


def test_the_first_line_names_the_crop_size_and_how_crops_are_shared_out():
    from cellseg.train import config_line

    line = config_line(compose_cfg("train", ["experiment=native"]))
    assert line.startswith("Run native: data=synthetic (128-px crops by area), ")
    assert "(resized to 64)" in config_line(compose_cfg("train", ["experiment=augmented"]))


@pytest.mark.slow
def test_a_native_debug_run_without_a_terminal_logs_each_epoch_and_ends_with_its_checkpoint(
    tmp_path,
):
    out = user_cli(["experiment=native", "debug=fast", "data.crop_size=32", *TINY_SYNTHETIC],
                   tmp_path)
    assert out.returncode == 0, failure(out)
    console = out.stdout + out.stderr
    assert not [noise for noise in NOISE if noise in console], console
    (run,) = (tmp_path / "logs/train/runs").iterdir()
    assert re.fullmatch(r"[\d_-]+_native_data.crop_size-32\+data.synthetic.n_images-10\+"
                        r"data.synthetic.size-64", run.name)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    epochs = re.compile(r"Epoch (\d)/2  train/loss \d\.\d{4}  val/loss .* images/s  .* left")
    assert [m.group(1) for m in map(epochs.search, console.splitlines()) if m] == ["1", "2"]
    log_file = (run / "train.log").read_text()
    assert len(epochs.findall(log_file)) == 2
    assert "Network: 2,160,595 parameters" in console
    assert "Data: 10 images" in console
    last = run / "checkpoints/last.ckpt"
    assert console.strip().splitlines()[-1].endswith(f"Tested checkpoint: {last}")
    assert torch.load(last, weights_only=True)["epoch"] == 1

    again = user_cli(["experiment=native", "debug=fast", "data.crop_size=32", *TINY_SYNTHETIC,
                      f"ckpt_path={last}"], tmp_path)  # the path as printed, unquoted
    assert again.returncode == 0, failure(again)
    assert f"{last}: the run is complete (2 of trainer.max_epochs=2 epochs)" in again.stdout

    other = user_cli(["experiment=baseline", "ckpt_path=last", *TINY_SYNTHETIC], tmp_path)
    assert other.returncode == 1
    assert "ckpt_path=last: no run under" in other.stdout
    assert str(run) in other.stdout


def test_debug_fast_connects_native_and_epoch_lines_carry_the_scores(cfg_factory, caplog):
    cfg = cfg_factory("experiment=native", "debug=fast", "data.crop_size=32",
                      "callbacks.progress_bar={_target_: cellseg.callbacks.EpochLines}")
    with caplog.at_level(logging.INFO):
        metrics = train(cfg)
    assert "val/iou_best" in metrics  # native validates every 5th epoch, debug=fast every one
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"]
    assert f"val/iou {metrics['val/iou']:.4f}" in lines[-1]
    assert f"train/loss {metrics['train/loss']:.4f}" in lines[-1]
    assert "images/s" in lines[-1]


def test_run_names_tell_runs_apart_and_are_valid_override_values():
    name = run_name("augmented", "folder", "/data/my cells", "model.loss=dice_bce,seed=1")
    assert name == "augmented_mycells_model.loss-dice_bce+seed-1"
    assert run_name("baseline", "synthetic", "/x/synthetic", "") == "baseline"
    assert run_name("dsb2018", "dsb2018", "/x/stage1_train", "split=all") == "dsb2018_split-all"
    # a model by what names it: a checkpoint by its run folder, a file by its name
    run = "logs/train/runs/2026-12-05_09-46-57_native_mydata"
    assert run_name("eval", "", "", f"model_name={run}/checkpoints/last.ckpt,split=all") == \
        "eval_model-2026-12-05_09-46-57_native_mydata+split-all"
    assert run_name("export", "", "", "model_name=/tmp/x/model.onnx") == "export_model-model.onnx"
    trial = run_name("augmented", "dsb2018", "/x", "augmentation=light,model.optimizer.lr=0.002")
    assert trial == "augmented_dsb2018_augmentation-light+model.optimizer.lr-0.002"
    (override,) = OverridesParser.create().parse_overrides([f"ckpt_path=/logs/{trial}/last.ckpt"])
    assert override.value() == f"/logs/{trial}/last.ckpt"


def test_only_the_first_ddp_process_logs_the_run_messages(monkeypatch, caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from cellseg.train import log

    with caplog.at_level(logging.INFO):
        for rank in (0, 1):
            monkeypatch.setattr(rank_zero_only, "rank", rank)
            log.info("message of rank %d", rank)
    assert "message of rank 0" in caplog.text
    assert "message of rank 1" not in caplog.text


def test_a_torch_without_the_private_bf16_checks_trains_in_fp32(monkeypatch, caplog):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    with caplog.at_level(logging.WARNING):
        assert not cpu_has_bf16()
        assert resolve_precision("mixed", "cpu") == "32-true"
    assert "cannot tell whether this CPU has native bf16" in caplog.text


def test_the_study_experiments_share_one_base_and_differ_in_augmentation_only():
    baseline, augmented = (OmegaConf.to_container(compose_cfg("train", [f"experiment={e}"]))
                           for e in ("baseline", "augmented"))
    assert baseline.pop("name") == "baseline"
    assert augmented.pop("name") == "augmented"
    assert baseline.pop("augmentation") == {}
    steps = list(augmented.pop("augmentation")["steps"])
    assert steps == ["hflip", "vflip", "rot90", "affine", "brightness", "noise"]
    assert baseline == augmented
    assert "tags" not in baseline
    text = (Path(config_dir()) / "experiment/augmented.yaml").read_text()
    assert "  - baseline\n" in text
    assert "max_epochs" not in text


def test_the_profiler_writes_the_file_its_config_names(cfg_factory):
    cfg = cfg_factory("debug=profiler", "trainer.max_epochs=1")
    train(cfg)
    assert (Path(cfg.paths.output_dir) / "fit-profile.txt").is_file()
    assert "<run>/fit-profile.txt" in (Path(config_dir()) / "debug/profiler.yaml").read_text()


def test_make_help_shows_the_real_data_folder_it_would_use():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "$(" not in out.stdout
    assert "make compare" in out.stdout
    assert "dsb2018/stage1_train exists" in out.stdout


def test_make_compare_says_which_data_it_trains_on(tmp_path):
    def dry_run(folder):  # make -n prints the commands without running them
        out = subprocess.run(["make", "-s", "-n", "compare", f"DSB2018={folder}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    empty = dry_run(tmp_path / "absent")
    assert f"the synthetic data (no images in {tmp_path / 'absent'}" in empty
    assert "data=dsb2018" not in empty
    (tmp_path / "real/some_id").mkdir(parents=True)
    real = dry_run(tmp_path / "real")
    assert f"the real data in {tmp_path / 'real'}" in real
    assert f"data=dsb2018 data.root={tmp_path / 'real'} " in real


def test_progress_without_a_terminal_logs_every_tenth_of_the_way(caplog):
    from cellseg.cli import progress

    with caplog.at_level(logging.INFO, logger="cellseg.cli"):
        assert list(progress(range(40), "Predicting", every_s=0)) == list(range(40))
        assert list(progress(range(30), "Segmenting")) == list(range(30))  # fast: the end only
        assert list(progress(range(5), "Reading", at_least=20)) == list(range(5))
    lines = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert lines == [*(f"Predicting: {n} of 40" for n in range(4, 41, 4)), "Segmenting: 30 of 30"]


def test_a_config_the_data_module_refuses_is_one_line(tmp_path):
    """A cellseg class refusing its config in its constructor (Hydra wraps that error in an
    InstantiationException) is still one line, in the terminal and in train.log."""
    out = user_cli(["model.net.out_channels=5", "trainer.max_epochs=1"], tmp_path)
    assert out.returncode == 1
    expected = ("model.net.out_channels=5 predicts centre offsets, drawn from each training "
                "crop's nuclei; it needs data.mode=crop (experiment=native)")
    assert f"ERROR: {expected}" in out.stdout + out.stderr
    assert "Error in call to target" not in out.stdout + out.stderr
    (run,) = (tmp_path / "logs/train/runs").iterdir()
    log = (run / "train.log").read_text()
    assert f"[ERROR] - {expected}" in log
    assert "outputs=foreground,contour,distance,offset_row,offset_col, loss=bce" in log


def test_a_missing_required_option_is_named_in_one_line():
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from cellseg.cli import message

    with pytest.raises(MissingMandatoryValue) as err:
        _ = OmegaConf.create({"input": "???"}).input
    assert message(err.value) == "input is required: pass input=... on the command line"


def test_best_checkpoint_is_never_chosen_on_the_test_images():
    from types import SimpleNamespace

    from cellseg.train import checkpoint_to_test

    same = SimpleNamespace(datamodule=SimpleNamespace(splits={"val": ["a"], "test": ["a"]}))
    held_out = SimpleNamespace(datamodule=SimpleNamespace(splits={"val": ["b"], "test": ["a"]}))
    assert checkpoint_to_test("best", "epoch_001.ckpt", same) is None  # the final weights
    assert checkpoint_to_test("best", "epoch_001.ckpt", held_out) == "epoch_001.ckpt"
    assert checkpoint_to_test("last", "epoch_001.ckpt", held_out) is None


def test_an_option_of_a_group_no_argument_chooses_is_refused_in_one_line(tmp_path):
    """eval scores the checkpoint's own data unless given other data: ``data.root=DIR`` alone
    chooses none, and Hydra's own error ("use +data.root") points to the wrong fix."""
    from cellseg.cli import missing_group

    groups = {"data": "data=folder data.root=DIR"}
    assert missing_group(["model=m", "data.root=/d"], groups) == (
        "data.root=/d sets an option of no data: choose the data first, e.g. data=folder "
        "data.root=DIR"
    )
    assert missing_group(["data=folder", "data.root=/d"], groups) is None
    assert missing_group(["+data=folder", "data.root=/d", "split=all"], groups) is None
    assert missing_group(["data_root=/moved", "split=all"], groups) is None
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run([sys.executable, "-m", "cellseg.eval", f"data.root={tmp_path}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert (out.stdout + out.stderr).strip() == (
        f"ERROR: data.root={tmp_path} sets an option of no data: choose the data first, e.g. "
        "python -m cellseg.eval model=MODEL data=folder data.root=DIR split=all"
    )
