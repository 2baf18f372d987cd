"""The configs travel with a non-editable install (``pip install .``)."""

import os
import subprocess
import sys
from pathlib import Path

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
