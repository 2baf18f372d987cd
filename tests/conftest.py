"""Shared fixtures (helpers for tests are in ``helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

if not os.environ.get("DISPLAY"):  # Qt (the napari tests) without a screen
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest

from helpers import make_cfg

# fixtures that train a model: a test using one runs a whole training (marked e2e)
TRAINING_FIXTURES = {"trained", "cfg_factory"}


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
