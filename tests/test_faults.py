"""No lost work: a killed training resumes, a checkpoint is never torn."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cellseg.callbacks import AtomicCheckpointIO
from cellseg.train import build
from helpers import cli_env, failure

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out


def test_training_uses_the_atomic_checkpoint_writer(cfg_factory):
    _, _, trainer = build(cfg_factory())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_sigkill_mid_training_then_ckpt_path_last_finishes_the_schedule(tmp_path):
    args = [
        "experiment=augmented", "trainer.max_epochs=6", "trainer.precision=32-true",
        "data.synthetic.n_images=40", "data.synthetic.size=64", "data.img_size=64",
        "data.batch_size=2", "trainer.accelerator=cpu", "callbacks.progress_bar=null",
        "callbacks.model_summary=null", "test=false",
    ]  # 16 steps of batch 2 per epoch, cosine schedule over 6 epochs
    env = cli_env(tmp_path)
    cmd = [sys.executable, "-m", "cellseg.train", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    runs = tmp_path / "logs/train/runs"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("*/checkpoints/last.ckpt"))
            if found and torch.load(found[0], weights_only=True)["epoch"] >= 1:
                break  # two epochs done; the third is running
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (killed_run,) = runs.iterdir()
    at_kill = torch.load(killed_run / "checkpoints/last.ckpt", weights_only=True)
    assert 1 <= at_kill["epoch"] < 5

    out = subprocess.run([*cmd, "ckpt_path=last"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, failure(out)
    assert f"Resuming from {killed_run}" in out.stdout + out.stderr
    resumed_run = max(runs.iterdir(), key=lambda p: p.name)
    final = torch.load(resumed_run / "checkpoints/last.ckpt", weights_only=True)
    assert final["epoch"] == 5
    assert final["global_step"] == 6 * 16
    assert final["lr_schedulers"][0]["last_epoch"] == 6  # the cosine schedule ran to its end
    steps = final["optimizer_states"][0]["state"][0]["step"]
    assert float(steps) == 6 * 16  # Adam's moments continued rather than restarted


def test_sigterm_mid_training_fails_the_run_names_the_resume_and_nothing_ships(tmp_path):
    """SIGTERM (kill, timeout, a SLURM limit): Lightning stops the loop and exits with status 0,
    so ``make model`` went on to ship a one-epoch model; the run now fails and says how to go
    on, and scripts/ship_model.py refuses the unfinished run."""
    import importlib.util

    args = [
        "experiment=augmented", "trainer.max_epochs=50", "trainer.precision=32-true",
        "data.synthetic.n_images=40", "data.synthetic.size=64", "data.img_size=64",
        "data.batch_size=2", "trainer.accelerator=cpu", "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "cellseg.train", *args], cwd=tmp_path,
                            env=cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "logs/train/runs"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(runs.glob("*/checkpoints/last.ckpt")):
                break  # an epoch done: a checkpoint to go on from
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    (run,) = runs.iterdir()
    last = run / "checkpoints/last.ckpt"
    assert proc.returncode == 143, output[-2000:]
    assert "training stopped by SIGTERM in epoch" in output
    assert f"nothing was tuned or tested; go on with the same command and ckpt_path={last}" \
        in output
    spec = importlib.util.spec_from_file_location(
        "ship_model", Path(__file__).parents[1] / "scripts/ship_model.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    with pytest.raises(SystemExit, match=r"is not a finished run \(stopped after epoch \d+, "
                       r"its post-processing never tuned\)"):
        ship.check_finished(torch.load(last, weights_only=True), last)


KILLED_WHILE_WRITING = """
import os, signal, sys, torch
from cellseg.callbacks import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"epoch": 1, "weights": torch.ones(1000)}, sys.argv[1])
def torn_save(obj, f):  # write part of the file, then die as a SIGKILL would
    f.write(b"PK" + b"x" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
io.save_checkpoint({"epoch": 2, "weights": torch.zeros(1000)}, sys.argv[1])
"""


def test_a_checkpoint_killed_while_written_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints/last.ckpt"
    out = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(path)], timeout=120)
    assert out.returncode == -signal.SIGKILL
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1
    assert torch.equal(kept["weights"], torch.ones(1000))


def test_atomic_writer_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    for epoch in (1, 2):
        io.save_checkpoint({"epoch": epoch}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["last.ckpt"]
