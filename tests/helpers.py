"""Test helpers: composed and shrunk configs, the real data when present, command-line runs.

Fixtures live in ``conftest.py``; tests import these with ``from helpers import ...``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from cellseg import config_dir

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/dsb2018/stage1_train"
needs_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real DSB2018 data not found at {REAL_DATA}"
)

TINY_SYNTHETIC = ["data.synthetic.n_images=10", "data.synthetic.size=64"]
TINY = [
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.image_grid.every_n_epochs=1",
]


def compose_cfg(name: str, overrides: list[str]) -> DictConfig:
    """Compose a config of ``configs/`` as the command line would."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


def make_cfg(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """The training config with tiny synthetic data, writing only under ``tmp_path``."""
    other_data = any(o.startswith("data=") and o != "data=synthetic" for o in overrides)
    tiny = TINY if other_data else [*TINY_SYNTHETIC, *TINY]
    cfg = compose_cfg("train", [*tiny, *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "out")
        if cfg.data.layout == "synthetic":
            cfg.data.root = str(tmp_path / "data/synthetic")
    return cfg


def cli_env(cwd: Path) -> dict[str, str]:
    """The environment of a command-line test: logs and data under ``cwd``."""
    return {**os.environ, "CELLSEG_ROOT": str(cwd), "HYDRA_FULL_ERROR": "1"}


def failure(out: subprocess.CompletedProcess) -> str:
    """What a failed command printed: the lines of crashes that a long traceback would push out
    of view (a C++ abort in a child process), then the end of its stderr."""
    crash = re.compile(r"terminate called|what\(\)|Fatal Python error|Segmentation fault|Error:")
    lines = [line for line in out.stderr.splitlines() if crash.search(line)]
    return "\n".join([*lines[:20], "...", out.stderr[-3000:]])


def run_cli(
    args: list[str], cwd: Path, module: str = "cellseg.train", launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (or ``launcher -m module args``, e.g. torchrun) in ``cwd``."""
    cmd = [*(launcher or [sys.executable]), "-m", module, *args]
    return subprocess.run(
        cmd, cwd=cwd, env=cli_env(cwd), capture_output=True, text=True, timeout=600
    )


def predict_cfg(ckpt, input_path, output, *overrides) -> DictConfig:
    """The predict config for ``ckpt`` on ``input_path``, keeping nuclei of any size."""
    cfg = compose_cfg(
        "predict", [f"ckpt_path={ckpt}", f"input={input_path}", f"output={output}", *overrides]
    )
    with open_dict(cfg):
        cfg.instances.min_size = 1
    return cfg


def two_peaks(separation: int = 14, sigma: float = 6.0) -> np.ndarray:
    """A predicted distance with two maxima (1.0 and 0.9) joined by a saddle of about 0.5."""
    yy, xx = np.mgrid[:40, :60].astype(np.float32)
    left, right = (a * np.exp(-((yy - 20) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
                   for a, c in ((1.0, 23), (0.9, 23 + separation)))
    return np.maximum(left, right)
