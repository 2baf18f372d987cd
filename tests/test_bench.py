"""The benchmark runs on tiny settings and writes a well-formed table (timings not asserted)."""

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from cellseg.bench import main as _  # noqa: F401  (the entry point imports)
from cellseg.bench import markdown, run_bench, timed
from helpers import compose_cfg


def test_bench_on_tiny_settings(tmp_path):
    tiny = ["shapes=[[32,2]]", "precisions=[32-true]", "repeats=1", "epochs=2"]
    tiny += ["rounds=2", "matmul_n=64", "predict_size=96"]
    cfg = compose_cfg("bench", [*tiny, "inference.tile_size=64", "inference.overlap=8"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
    rows = run_bench(cfg)
    (row,) = rows
    assert row["size"] == 32
    assert row["batch"] == 2
    for key in ("pipeline_img_s", "plain_img_s", "train_gflop_s", "matmul_gflop_s",
                "tiled_mpx_s", "bare_mpx_s", "pipeline_peak_mb", "predict_peak_mb"):
        assert row[key] > 0, key
    assert row["pipeline_vs_plain"] == row["pipeline_img_s"] / row["plain_img_s"]
    # two rounds of two epochs, the first of each left out; plain loop beside every epoch
    assert len(row["epochs_plain_img_s"]) == len(row["epochs_pipeline_img_s"]) == 2
    assert row["plain_img_s"] == sum(row["epochs_plain_img_s"]) / 2  # the median of two
    table = markdown(rows)
    assert table.count("\n") == 3
    assert "pipeline img/s" in table
    json.dumps(rows)  # serialisable


def test_timed_alternates_its_functions_and_leaves_out_the_warmup(monkeypatch):
    import cellseg.bench

    clock, calls = [0.0], []
    durations = {"a": [100.0, 3.0, 1.0, 2.0], "b": [50.0, 10.0, 30.0, 20.0]}  # warm-up first

    def call(name):
        calls.append(name)
        clock[0] += durations[name][calls.count(name) - 1]

    monkeypatch.setattr(cellseg.bench.time, "perf_counter", lambda: clock[0])
    medians = timed([lambda: call("a"), lambda: call("b")], 1, 3)
    assert calls == ["a", "b"] * 4  # one warm-up round, three measured, in turn
    assert medians == [2.0, 20.0]  # the medians of the measured rounds only


def test_slide_is_the_sample_tiled_in_both_formats(tmp_path):
    import numpy as np
    import tifffile
    import zarr
    from PIL import Image

    from cellseg.bench import slide
    from cellseg.samples import sample_path

    base = np.asarray(Image.open(sample_path("nuclei")))
    tiff = tifffile.imread(slide(tmp_path / "a", 600, "tiff", tile=256))
    level = np.asarray(zarr.open_array(slide(tmp_path / "b", 600, tile=256) / "0", mode="r"))
    for image in (tiff, level):
        assert image.shape == (600, 600)
        turns = [np.rot90(b, k) for b in (base, base.T) for k in range(4)]
        assert any(np.array_equal(image[256:512, :256], t) for t in turns)


def test_large_and_folder_rows_run_the_whole_predict(tmp_path):
    from cellseg.bench import folder_rows, large_rows
    from cellseg.samples import sample_path

    cfg = compose_cfg("bench", ["large.sides=[512]", "large.whole_up_to=512",
                                "large.block_size=128", "large.workers=1",
                                'large.overrides=["diameter=null"]',
                                f"folder.root={sample_path('nuclei').parent}", "folder.images=1",
                                'folder.overrides=["diameter=null"]'])
    rows = large_rows(cfg, tmp_path)
    assert [(r["side"], r["mode"]) for r in rows] == [(512, "blocks"), (512, "whole")]
    for row in rows:
        assert row["megapixels"] == 512 * 512 / 1e6
        assert row["peak_mb"] > 100
    rows = folder_rows(cfg, tmp_path)
    assert [r["outputs"] for r in rows] == ["[masks,labels,overlays,tables]", "[labels]"]
    assert rows[0]["megapixels"] == 256 * 256 / 1e6
    assert rows[0]["vs_bare"] == rows[0]["mpx_s"] / rows[0]["bare_mpx_s"]
    assert all(r["startup_s"] > 0 for r in rows)


def test_folder_rows_time_the_fixed_cost_on_the_first_image_alone(tmp_path, monkeypatch):
    """The start-up column is the whole predict of the folder's first image alone, and the
    ratio after it leaves that time out (the commands' timings faked: none asserted)."""
    import cellseg.bench as bench
    from cellseg.samples import sample_path

    inputs = []

    def fake_run(cmd):
        folder = Path(next(a for a in cmd if a.startswith("input=")).split("=", 1)[1])
        inputs.append(sorted(p.name for p in folder.iterdir()))
        return (10.0 if len(inputs[-1]) > 1 else 2.0), 100.0, ""

    monkeypatch.setattr(bench, "run_measured", fake_run)
    monkeypatch.setattr(bench, "bare_forward_mpx_s", lambda paths: 0.5)
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a.png", "b.png"):
        (source / name).write_bytes(sample_path("nuclei").read_bytes())
    cfg = compose_cfg("bench", [f"folder.root={source}", "folder.images=2"])
    rows = bench.folder_rows(cfg, tmp_path / "bench")
    assert inputs == [["a.png", "b.png"], ["a.png"]] * len(cfg.folder.outputs)
    megapixels = 2 * 256 * 256 / 1e6
    for row in rows:
        assert (row["seconds"], row["startup_s"]) == (10.0, 2.0)
        assert row["vs_bare"] == pytest.approx(megapixels / 10.0 / 0.5)
        assert row["vs_bare_started"] == pytest.approx(megapixels / 8.0 / 0.5)
