"""``cellseg.predict`` on microscopy files: channels, planes, measurements, bad pixels and
files, nucleus scale, shards."""

import csv
import logging
import re

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.measure import label as connected_components
from torch import nn

import cellseg.predict as predict_module
from cellseg.datasets import prepare_image, resize
from cellseg.errors import UserError
from cellseg.files import ImageFileError
from cellseg.inference import segment_at_scale
from cellseg.predict import in_shard, predict
from helpers import failure, predict_cfg, run_cli
from microscopy import nuclei_field, write_nan, write_ome, write_stack

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out


def threshold_segment(model, image, pre, inference, instances_cfg, diameter=None, name=""):
    """A stand-in for the network: normalised intensity above 0.5, connected components."""
    x = prepare_image(image, 1)[..., 0]
    return x, connected_components(x > 0.5).astype(np.int32)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ome_tiff_needs_its_channel_then_measures_every_channel(trained, tmp_path, monkeypatch):
    ckpt, _ = trained
    (tmp_path / "in").mkdir()
    data = write_ome(tmp_path / "in/cells.ome.tif", pixel_size=0.5)
    out = tmp_path / "out"
    with pytest.raises(ImageFileError, match=r"cells.ome.tif has 2 channels \(0=DAPI, 1=noise\); "
                       r"choose the nuclei channel with channel="):
        predict(predict_cfg(ckpt, tmp_path / "in", out))
    assert "channel=" in (out / "tables/cells.error.txt").read_text()
    monkeypatch.setattr(predict_module, "segment_at_scale", threshold_segment)
    summary = predict(predict_cfg(ckpt, tmp_path / "in", out, "channel=DAPI"))
    assert summary["images"] == 1
    assert summary["failed"] == 0
    assert not (out / "tables/cells.error.txt").exists()
    labels = np.asarray(Image.open(out / "labels/cells.png"))
    foreground = prepare_image(data[0][..., None], 1)[..., 0]  # the stand-in's probabilities
    np.testing.assert_array_equal(labels, connected_components(foreground > 0.5))
    rows = read_csv(out / "measurements.csv")
    assert len(rows) == labels.max() > 2
    areas = np.bincount(labels.ravel())
    for row in rows:
        k = int(row["label"])
        assert (row["image"], row["t"], row["z"]) == ("cells", "0", "0")
        assert int(row["area_px"]) == areas[k]
        assert float(row["area_um2"]) == areas[k] * 0.25
        assert float(row["mean_DAPI"]) == pytest.approx(data[0][labels == k].mean())
        assert float(row["score"]) == pytest.approx(foreground[labels == k].mean())
        assert float(row["max_noise"]) == data[1][labels == k].max()
        assert float(row["integrated_noise"]) == pytest.approx(data[1][labels == k].sum())
    (summary_row,) = read_csv(out / "summary.csv")
    assert int(summary_row["nuclei"]) == labels.max()
    assert float(summary_row["area_fraction"]) == pytest.approx((labels > 0).mean())
    # channel by index, with the network: the same file, one table row per nucleus
    summary = predict(predict_cfg(ckpt, tmp_path / "in", out, "channel=0", "overwrite=true"))
    labels = np.asarray(Image.open(out / "labels/cells.png"))
    assert len(read_csv(out / "measurements.csv")) == summary["nuclei"] == labels.max()


def test_pixel_size_gives_areas_in_um2_to_files_that_record_none(trained, tmp_path, monkeypatch,
                                                                   caplog):
    ckpt, _ = trained
    monkeypatch.setattr(predict_module, "segment_at_scale", threshold_segment)
    (tmp_path / "in").mkdir()
    image, _ = nuclei_field()
    Image.fromarray(image).save(tmp_path / "in/field.png")  # a PNG records no pixel size
    write_ome(tmp_path / "in/cells.ome.tif", pixel_size=0.5)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="cellseg.predict"):
        predict(predict_cfg(ckpt, tmp_path / "in", out, "channel=0"))
    # each image's line says what its areas are measured with
    assert "field.png: axes YX, shape (96, 96, 1) (from the file), no pixel size: areas in px " \
        "only (pixel_size= gives it)" in caplog.text
    assert re.search(r"cells.ome.tif: axes \w+, shape .* pixels of 0.5 µm", caplog.text)
    caplog.clear()
    rows = read_csv(out / "measurements.csv")
    assert {r["area_um2"] for r in rows if r["image"] == "field"} == {""}
    assert all(float(r["area_um2"]) == int(r["area_px"]) * 0.25
               for r in rows if r["image"] == "cells")
    with caplog.at_level(logging.WARNING, logger="cellseg.predict"):
        predict(predict_cfg(ckpt, tmp_path / "in", out, "channel=0", "overwrite=true",
                            "pixel_size=[0.2,0.3]"))
    rows = read_csv(out / "measurements.csv")
    assert {r["image"] for r in rows} == {"field", "cells"}
    for r in rows:  # the given size, for both files
        assert float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.06)
    assert "cells.ome.tif records pixels of 0.5 x 0.5 µm; pixel_size= gives 0.2 x 0.3 µm" \
        in caplog.text
    for bad in ("pixel_size=-1", "pixel_size=[1,2,3]", "pixel_size=wide"):
        with pytest.raises(UserError, match="give the pixel size in micrometres"):
            predict(predict_cfg(ckpt, tmp_path / "in", tmp_path / "new", "channel=0", bad))
        assert not (tmp_path / "new").exists()  # refused before any output folder


def test_z_stack_gives_a_multipage_label_tiff_equal_to_its_planes(trained, tmp_path):
    ckpt, _ = trained
    (tmp_path / "stack").mkdir()
    (tmp_path / "flat").mkdir()
    data = write_stack(tmp_path / "stack/zs.tif", planes=3)
    for z in range(3):
        tifffile.imwrite(tmp_path / f"flat/z{z}.tif", data[z])
    predict(predict_cfg(ckpt, tmp_path / "stack", tmp_path / "o1"))
    predict(predict_cfg(ckpt, tmp_path / "flat", tmp_path / "o2"))
    with tifffile.TiffFile(tmp_path / "o1/labels/zs.tif") as tif:
        assert tif.series[0].axes == "ZYX"
        stack = tif.asarray()
    assert stack.dtype == np.uint16
    assert stack.shape == (3, 96, 96)
    for z in range(3):
        flat = np.asarray(Image.open(tmp_path / f"o2/labels/z{z}.png"))
        np.testing.assert_array_equal(stack[z], flat)
    assert sorted(p.name for p in (tmp_path / "o1/overlays").iterdir()) == [
        "zs_z0.png", "zs_z1.png", "zs_z2.png"]
    rows = read_csv(tmp_path / "o1/summary.csv")
    assert [(r["image"], r["z"]) for r in rows] == [("zs", "0"), ("zs", "1"), ("zs", "2")]
    assert [int(r["nuclei"]) for r in rows] == [len(np.unique(p)) - 1 for p in stack]
    measured = read_csv(tmp_path / "o1/measurements.csv")
    assert len(measured) == sum(len(np.unique(p)) - 1 for p in stack)


def test_nan_block_warns_and_the_nuclei_around_it_are_found(trained, tmp_path, monkeypatch,
                                                           caplog):
    ckpt, _ = trained
    monkeypatch.setattr(predict_module, "segment_at_scale", threshold_segment)
    (tmp_path / "in").mkdir()
    data = write_nan(tmp_path / "in/holes.tif")
    filled = np.where(np.isfinite(data), data, data[np.isfinite(data)].min())
    tifffile.imwrite(tmp_path / "in/filled.tif", filled)
    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(tmp_path / "in/blank.png")
    summary = predict(predict_cfg(ckpt, tmp_path / "in", tmp_path / "out"))
    assert "holes.tif: 259 NaN/inf pixels" in caplog.text
    holes = np.asarray(Image.open(tmp_path / "out/labels/holes.png"))
    np.testing.assert_array_equal(holes, np.asarray(Image.open(tmp_path / "out/labels/filled.png")))
    assert holes.max() > 2
    assert not np.asarray(Image.open(tmp_path / "out/labels/blank.png")).any()
    rows = {r["image"]: r for r in read_csv(tmp_path / "out/summary.csv")}
    assert rows["blank"]["nuclei"] == "0"
    assert summary["images"] == 3


def test_unreadable_file_is_skipped_listed_and_the_rest_finished(trained, tmp_path, caplog):
    ckpt, _ = trained
    (tmp_path / "in").mkdir()
    field, _ = nuclei_field()
    Image.fromarray((field // 257).astype(np.uint8)).save(tmp_path / "in/good.png")
    (tmp_path / "in/empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        summary = predict(predict_cfg(ckpt, tmp_path / "in", tmp_path / "out"))
    assert summary["images"] == 1
    assert summary["failed"] == 1
    assert "1 of 2 images skipped: empty" in caplog.text
    assert "cannot read image" in (tmp_path / "out/tables/empty.error.txt").read_text()
    assert [r["ImageId"] for r in read_csv(tmp_path / "out/submission.csv")][0] == "good"
    assert (tmp_path / "out/summary.csv").is_file()
    (tmp_path / "in/good.png").unlink()
    (tmp_path / "in/zero.png").write_bytes(b"")
    with pytest.raises(ImageFileError, match="none of the 2 images could be segmented; the "
                       "first: cannot read image .*empty.png"):
        predict(predict_cfg(ckpt, tmp_path / "in", tmp_path / "out2"))


class Bright(nn.Module):
    """A stand-in network: the first channel's intensity above 0.5 is a nucleus."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return (x[:, :1] - 0.5) * 40


def test_diameter_rescales_to_the_training_scale_and_maps_labels_back():
    field, _ = nuclei_field()
    pre = {"mode": "crop", "img_size": 64, "in_channels": 1, "normalize": "minmax",
           "invert_bright": False, "diameter": 10.0, "multiple": 16}
    options = {"min_size": 1, "split": False, "use_contours": False}
    _, native = segment_at_scale(Bright(), field[..., None], pre, {}, options)
    big = resize(field[..., None], (192, 192), "linear")  # nuclei twice as large
    model = Bright()
    _, mapped = segment_at_scale(model, big, pre, {}, options, diameter=20.0)
    assert model.shapes == [(96, 96)]  # the network saw nuclei at the training scale
    assert mapped.shape == (192, 192)  # labels on the image's own grid
    assert set(np.unique(mapped)) == set(range(mapped.max() + 1))  # nearest: no new values
    back = resize(mapped, (96, 96), "nearest")
    overlap = ((back > 0) & (native > 0)).sum() / ((back > 0) | (native > 0)).sum()
    assert overlap > 0.9
    with pytest.raises(ValueError, match="diameter=20: the checkpoint records no nucleus"):
        segment_at_scale(Bright(), big, {**pre, "diameter": None}, {}, options, diameter=20.0)


def test_shards_split_ids_stably_and_completely():
    ids = [f"img{k}" for k in range(40)]
    shards = [{i for i in ids if in_shard(i, f"{s}/3")} for s in range(3)]
    assert set().union(*shards) == set(ids)
    assert sum(map(len, shards)) == 40
    assert all(len(s) >= 5 for s in shards)
    assert shards[1] == {i for i in reversed(ids) if in_shard(i, "1/3")}
    with pytest.raises(ValueError, match="shard=3/2; use i/n"):
        in_shard("a", "3/2")


@pytest.mark.slow
def test_two_shards_through_submitit_equal_one_process(trained, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    ckpt, _ = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    field, _ = nuclei_field()
    for k in range(4):
        Image.fromarray((np.roll(field, 9 * k, axis=0) // 257).astype(np.uint8)).save(
            inputs / f"p{k}.png")
    write_ome(inputs / "ome.ome.tif")
    write_stack(inputs / "stack.tif", planes=2)
    common = [f"ckpt_path={ckpt}", f"input={inputs}", "channel=DAPI", "instances.min_size=1"]
    out = run_cli(["-m", "shard=0/2,1/2", "hydra/launcher=submitit_local",
                   f"output={tmp_path / 'sharded'}", *common], tmp_path, module="cellseg.predict")
    assert out.returncode == 0, failure(out)
    predict(predict_cfg(ckpt, inputs, tmp_path / "single", "channel=DAPI"))
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    labels = sorted(p.name for p in (single / "labels").iterdir())
    assert labels == ["ome.png", "p0.png", "p1.png", "p2.png", "p3.png", "stack.tif"]
    for name in labels:
        assert (sharded / "labels" / name).read_bytes() == (single / "labels" / name).read_bytes()
    for table in ("submission.csv", "measurements.csv", "summary.csv"):
        assert read_csv(sharded / table) == read_csv(single / table), table
    (sharded / "summary.csv").unlink()
    predict(predict_cfg(ckpt, inputs, sharded, "merge_only=true"))
    assert read_csv(sharded / "summary.csv") == read_csv(single / "summary.csv")


def test_too_small_images_are_skipped_by_name_and_a_failing_redo_leaves_no_stale_rows(
    trained, tmp_path, monkeypatch
):
    ckpt, _ = trained
    monkeypatch.setattr(predict_module, "segment_at_scale", threshold_segment)
    (tmp_path / "in").mkdir()
    field, _ = nuclei_field()
    Image.fromarray(field).save(tmp_path / "in/cells.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in/tiny.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "in/dot.png")  # constant too
    out = tmp_path / "out"
    summary = predict(predict_cfg(ckpt, tmp_path / "in", out))
    assert (summary["images"], summary["failed"]) == (1, 2)
    assert "tiny.png is 8x8 pixels, smaller than the network's size multiple 16" in (
        out / "tables/tiny.error.txt").read_text()
    assert (out / "tables/dot.error.txt").is_file()
    assert {r["image"] for r in read_csv(out / "summary.csv")} == {"cells"}
    # cells.png replaced by a file that now fails: its old outputs and rows must go
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "in/cells.png")
    with pytest.raises(ImageFileError, match="none of the 3 images could be segmented"):
        predict(predict_cfg(ckpt, tmp_path / "in", out, "overwrite=true"))
    assert not list((out / "labels").iterdir())
    assert not (out / "tables/cells.summary.csv").exists()
