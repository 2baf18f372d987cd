"""Shared fixtures (helpers for tests are in ``helpers.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_cfg


def qt_screen() -> str:
    """Where Qt (the napari tests) draws: the screen ``DISPLAY`` names where Qt can open it, else
    the offscreen platform. ``xvfb-run`` without the libraries of Qt's xcb plugin (e.g.
    libxcb-cursor0) gives a ``DISPLAY`` that Qt aborts on, which would end the whole run."""
    if os.environ.get("DISPLAY") and "QT_QPA_PLATFORM" not in os.environ:
        probe = "from PyQt6.QtWidgets import QApplication; QApplication([])"
        opened = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                timeout=120)
        if opened.returncode == 0:
            return f"the screen DISPLAY={os.environ['DISPLAY']}"
        reason = (opened.stderr.strip().splitlines() or ["?"])[0]
        del os.environ["DISPLAY"]
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return f"offscreen, as Qt cannot open DISPLAY ({reason}; docs/napari.md)"
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    return os.environ.get("QT_QPA_PLATFORM") or f"DISPLAY={os.environ['DISPLAY']}"


QT_SCREEN = qt_screen()  # before any test module imports Qt

# fixtures that train a model: a test using one runs a whole training (marked e2e)
TRAINING_FIXTURES = {"trained", "cfg_factory"}


def pytest_report_header() -> str:
    return f"Qt for the napari tests: {QT_SCREEN}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark e2e every test that trains through a fixture: ``make test-quick`` leaves them out
    (modules of whole commands mark themselves with ``pytestmark``)."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, list(overrides))


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, synthetic data root) of one tiny training shared by several tests."""
    from cellseg.train import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = make_cfg(tmp, ["model.net.out_channels=2", "trainer.max_epochs=1"])
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", Path(cfg.data.root)
