"""The whole predict at the speed of its network: no work done twice, outputs on demand."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from cellseg import checkpoint, inference, threads
from cellseg.samples import sample_path
from helpers import compose_cfg

SAMPLE = sample_path("nuclei")


def predict_to(input_path, output, *overrides: str) -> dict:
    from cellseg.predict import predict

    return predict(compose_cfg("predict", [f"input={input_path}", f"output={output}",
                                           *overrides]))


def shipped_settings() -> tuple:
    """The shipped network, its preparation, and fixed inference and instance settings."""
    model = checkpoint.load(None, "cpu")
    options = {"min_score": 0.9, "seed_threshold": 0.4, "contour_threshold": 0.4}
    settings = {"tile_size": 1024, "overlap": 32, "batch_size": 1, "tta": False}
    return model.network(), model.preprocessing(), settings, options


@pytest.mark.parametrize("side", [512, 384])
def test_auto_segments_nuclei_within_the_training_zoom_once_with_the_same_labels(monkeypatch, side):
    net, pre, settings, options = shipped_settings()
    # the sample's nuclei (about 10 px) 2x (the model's training size) and 1.5x as large
    image = np.asarray(Image.open(SAMPLE).resize((side, side), Image.BILINEAR))[..., None]
    calls = []
    real = inference.predict_tensor
    monkeypatch.setattr(inference, "predict_tensor",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    foreground, labels = inference.segment_at_scale(net, image, pre, settings, options, "auto")
    assert len(calls) == 1  # the estimating pass's result is the result
    direct = inference.segment_rescaled(net, image, pre, settings, options, None)
    assert np.array_equal(labels, direct[1])
    assert np.array_equal(foreground, direct[0])
    assert labels.max() > 50


def test_auto_segments_a_rescaled_image_twice_at_the_scale_its_estimate_settled_on(
    monkeypatch, caplog
):
    net, pre, settings, options = shipped_settings()
    # nuclei about 7.5 px: well below the training zoom (0.5-2x of about 20 px)
    image = np.asarray(Image.open(SAMPLE).resize((192, 192), Image.BILINEAR))[..., None]
    passes = []
    with caplog.at_level(logging.INFO, logger="cellseg.inference"):
        scale, found = inference.choose_scale(net, image, pre, settings, options, "auto",
                                              passes=passes, name="small.png z1")
    assert [seen for seen, *_ in passes] == [1.0, scale]  # settled on the second pass's scale
    assert 2.2 < scale < 3.6
    # the line names its image (images run side by side) and the factor used
    (line,) = [r.getMessage() for r in caplog.records if "nuclei about" in r.getMessage()]
    assert line.startswith(f"small.png z1: nuclei about {found:.1f} px across")
    assert f"rescaled by {scale:.3g}" in line
    wanted = pre["diameter"] / found
    assert ("the estimate asks" in line) == (abs(wanted - scale) > 5e-3 * wanted)
    calls = []
    real = inference.predict_tensor
    monkeypatch.setattr(inference, "predict_tensor",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    foreground, labels = inference.segment_at_scale(net, image, pre, settings, options, "auto")
    assert len(calls) == 2  # as it is, then rescaled: no third pass a few per cent away
    direct = inference.segment_rescaled(net, image, pre, settings, options, scale)
    assert np.array_equal(labels, direct[1])
    assert labels.max() > 40


def test_outputs_labels_alone_writes_no_mask_overlay_or_table(tmp_path):
    from cellseg.errors import UserError

    out = predict_to(SAMPLE, tmp_path / "out", "outputs=labels", "diameter=null")  # one name
    assert (tmp_path / "out/labels/nuclei.png").is_file()
    written = [p.name for d in ("masks", "overlays", "tables") for p in (tmp_path / "out" / d)
               .iterdir()]
    assert written == []
    assert not (tmp_path / "out/measurements.csv").exists()
    assert out["submission_rows"] == out["nuclei"] > 50
    with pytest.raises(UserError, match="overlay is not one of"):
        predict_to(SAMPLE, tmp_path / "again", "outputs=[labels,overlay]")


def test_images_side_by_side_match_one_at_a_time_and_leave_large_ones_to_blocks(tmp_path,
                                                                                 caplog):
    # asked when the test runs, not when it is collected: other cellseg jobs come and go
    if threads.share() < 2:
        pytest.skip("side by side needs 2 cores free for this process")
    import torch
    import zarr

    folder = tmp_path / "in"
    folder.mkdir()
    image = np.asarray(Image.open(SAMPLE))
    for k in range(3):
        Image.fromarray(np.ascontiguousarray(np.rot90(image, k))).save(folder / f"turn{k}.png")
    Image.fromarray(np.tile(image, (2, 2))).save(folder / "large.png")  # 512^2: block-wise
    common = ["diameter=null", "blocks.above=300", "blocks.size=256"]
    threads_before = torch.get_num_threads()
    one = predict_to(folder, tmp_path / "one", "cluster.workers=1", *common)
    with caplog.at_level(logging.INFO):
        two = predict_to(folder, tmp_path / "two", "cluster.workers=2", *common)
    assert "2 images side by side, 1 PyTorch thread each" in caplog.text
    assert torch.get_num_threads() == threads_before
    assert one["images"] == two["images"] == 4
    assert one["nuclei"] == two["nuclei"]
    for k in range(3):
        a, b = (np.asarray(Image.open(tmp_path / run / f"labels/turn{k}.png"))
                for run in ("one", "two"))
        assert a.max() == b.max() > 50
        assert (a == b).mean() > 0.999  # the network's sums run on 1 thread, not 2
    large = [np.asarray(zarr.open_array(tmp_path / run / "labels/large.ome.zarr/0", mode="r"))
             for run in ("one", "two")]
    assert large[0].max() == large[1].max() > 200
    rows = [(tmp_path / run / "summary.csv").read_text().splitlines() for run in ("one", "two")]
    assert [r.split(",")[:4] for r in rows[0]] == [r.split(",")[:4] for r in rows[1]]


def test_a_stack_is_sized_once_on_its_middle_plane_and_every_plane_segmented_alike(
    tmp_path, caplog
):
    import tifffile

    net, pre, settings, options = shipped_settings()
    small = np.asarray(Image.open(SAMPLE).convert("L"))  # nuclei about 10 px: enlarged ~2x
    large = np.asarray(Image.fromarray(small).resize((512, 512), Image.BILINEAR))[128:384, 128:384]
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in/zs.tif", np.stack([large, small, small]),
                     metadata={"axes": "ZYX"})
    with caplog.at_level(logging.INFO, logger="cellseg"):
        predict_to(tmp_path / "in", tmp_path / "out")
    sized = [r.getMessage() for r in caplog.records if "nuclei about" in r.getMessage()]
    (line,) = sized  # sized once, on the middle plane
    assert line.startswith("zs.tif z1: nuclei about")
    assert "zs.tif: every plane segmented rescaled by" in caplog.text
    # predict's own settings, to segment the planes here as it did
    cfg = compose_cfg("predict", [f"input={tmp_path}", f"output={tmp_path}"])
    settings = dict(cfg.inference)
    options = checkpoint.instance_options(cfg.instances,
                                          {"postprocess": checkpoint.load(None).postprocess})
    scale, _ = inference.choose_scale(net, small[..., None], pre, settings, options, "auto")
    assert 1.6 < scale < 2.6
    labels = tifffile.imread(tmp_path / "out/labels/zs.tif")
    # the large nuclei of plane 0, alone segmented as they are, are enlarged with the stack
    alone = inference.segment_rescaled(net, large[..., None], pre, settings, options, None)[1]
    with_stack = inference.segment_rescaled(net, large[..., None], pre, settings, options,
                                            scale)[1]
    assert np.array_equal(labels[0], with_stack)
    assert not np.array_equal(labels[0], alone)


def test_a_stack_too_small_to_segment_is_skipped_with_its_reason(tmp_path):
    import tifffile

    (tmp_path / "in").mkdir()
    planes = np.full((3, 8, 8), 9, np.uint8) + np.eye(8, dtype=np.uint8)  # not constant
    tifffile.imwrite(tmp_path / "in/tiny.tif", planes, metadata={"axes": "ZYX"})
    (tmp_path / "in/a.png").write_bytes(SAMPLE.read_bytes())
    summary = predict_to(tmp_path / "in", tmp_path / "out")  # sized before its planes: no crash
    assert (summary["images"], summary["failed"]) == (1, 1)
    assert "smaller than the network's size multiple" in (
        tmp_path / "out/tables/tiny.error.txt").read_text()
