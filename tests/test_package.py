"""The configs travel with a non-editable install (``pip install .``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_finds_its_configs(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    code = "import cellseg; print(cellseg.config_dir())"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    found = Path(out.stdout.strip())
    assert found == site / "cellseg" / "configs"
    for name in ("train.yaml", "experiment/augmented.yaml", "data/dsb2018.yaml"):
        assert (found / name).is_file()
    for data in ("models/nuclei.pth", "samples/nuclei.png", "samples/dsb2018_sample50_ids.txt"):
        assert (site / "cellseg" / data).is_file()


# scripts that need a peer's package this project does not install
OPTIONAL = {"cellpose_bf16.py": "cellpose"}


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_imports_what_exists(script, monkeypatch):
    """A moved function breaks a script at its first line; the suite runs none of them."""
    import importlib.util

    monkeypatch.syspath_prepend(ROOT / "scripts")  # as `python scripts/x.py` runs it

    if script in OPTIONAL:
        pytest.importorskip(OPTIONAL[script])
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"),
                                                  ROOT / "scripts" / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the __main__ guard holds
