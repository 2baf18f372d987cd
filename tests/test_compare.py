"""``cellseg.compare`` on tiny runs: figures, results rows, unfinished runs listed."""

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from cellseg.compare import compare, curves_figure
from cellseg.train import train
from helpers import compose_cfg, make_cfg

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out


def tiny_run(tmp_path: Path, job: str, experiment: str, finished: bool = True) -> Path:
    cfg = make_cfg(tmp_path, [f"experiment={experiment}", "trainer.max_epochs=2"])
    run = tmp_path / "multirun" / job
    cfg.paths.output_dir = str(run)
    cfg.data.root = "${paths.data_dir}/synthetic"  # as the configs write it
    if finished:
        train(cfg)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra/config.yaml")
    overrides = [f"experiment={experiment}", "debug=fast", "seed=0", f"paths.root_dir={tmp_path}"]
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra/overrides.yaml")
    return run


def test_compare_two_runs_and_an_unfinished_one(tmp_path, capsys, monkeypatch):
    import cellseg.eval

    tiny_run(tmp_path, "0_baseline", "baseline")
    tiny_run(tmp_path, "1_augmented", "augmented")
    tiny_run(tmp_path, "2_augmented", "augmented", finished=False)
    cfg = compose_cfg("compare", [f"runs=[{tmp_path / 'multirun'}]", "n_images=2"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "compare")
    segmented = []
    segment = cellseg.eval.segment_at_scale
    counted = lambda *a, **k: segmented.append(1) or segment(*a, **k)  # noqa: E731
    monkeypatch.setattr(cellseg.eval, "segment_at_scale", counted)
    infos = compare(cfg)
    assert len(segmented) == 2 * 2  # each run's 2 test images once: the figure reuses them
    out = tmp_path / "compare"
    assert (out / "comparison.png").stat().st_size > 10_000
    assert (out / "curves.png").stat().st_size > 10_000
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0_baseline", "1_augmented", "2_augmented"]
    assert [r["status"] for r in rows] == ["finished", "finished", "no finished checkpoint"]
    assert rows[0]["overrides"] == "experiment=baseline"  # not paths.*, not what all share
    for row in rows[:2]:  # eval's scores: pooled pixel counts, so dice follows from iou
        iou, dice = float(row["iou"]), float(row["dice"])
        assert dice == pytest.approx(2 * iou / (1 + iou), abs=2e-4)
        assert dice > iou
    assert float(rows[1]["map"]) == pytest.approx(infos[1]["metrics"]["map"], abs=1e-4)
    assert rows[2]["map"] == ""
    assert rows[0]["epochs"] == "2"
    assert float(rows[0]["train_s"]) >= 0
    assert (out / "results.md").read_text().count("\n") == 2 + 3
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "multirun/comparison").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out  # the table on the console too
    assert "| 0_baseline | baseline | experiment=baseline | 0 | 2 |" in printed
    figure = curves_figure(infos)
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss (bce)", "iou"]
    (legend,) = figure.legends  # one legend for both axes, below them (it covers no data)
    assert legend.get_texts()[0].get_text().endswith(" train")
    for ax in figure.axes:
        assert ax.get_legend() is None
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks
        assert all(float(t).is_integer() for t in ticks)
