"""``cellseg.eval`` and ``cellseg.predict`` on a tiny trained checkpoint."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellseg.checkpoint import checkpoint_data
from cellseg.datasets import read_samples
from cellseg.eval import evaluate, write_outputs
from cellseg.predict import find_inputs, predict, rle_by_label, rle_decode
from helpers import compose_cfg, failure, predict_cfg

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out


def eval_cfg(ckpt, *overrides):
    return compose_cfg("eval", [f"ckpt_path={ckpt}", *overrides])


def test_eval_scores_the_test_split_at_native_resolution(trained, tmp_path):
    ckpt, root = trained
    metrics, rows = evaluate(eval_cfg(ckpt))  # the checkpoint's data and test ids
    assert metrics["images"] == len(rows) == 2  # 10 images, 20 % test
    assert [r["id"] for r in rows] == checkpoint_data(ckpt)["splits"]["test"]
    iou = metrics["iou"]  # pooled pixel counts: dice follows from iou exactly
    assert metrics["dice"] == pytest.approx(2 * iou / (1 + iou), abs=1e-5)
    assert metrics["dice"] > iou
    for k in ("map", "ap50"):  # averaged over the images
        assert metrics[k] == pytest.approx(np.mean([r[k] for r in rows]), abs=1e-6)
    assert {r["height"] for r in rows} == {64}  # the native size, not a training size
    write_outputs(tmp_path, metrics, rows)
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == 2
    with open(tmp_path / "per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_scores_the_foreground_of_the_nuclei_found_as_other_tools_are_scored(trained):
    ckpt, _ = trained
    found = []
    metrics, rows = evaluate(
        eval_cfg(ckpt, "instances.min_size=40"),  # drops small nuclei: labels differ from fg
        on_image=lambda sample, fg, labels: found.append((sample.labels > 0, fg > 0.5, labels > 0)),
    )
    def iou(pairs):
        return sum((p & t).sum() for t, p in pairs) / sum((p | t).sum() for t, p in pairs)
    by_labels = iou([(t, lab) for t, _, lab in found])
    assert metrics["iou_nuclei"] == pytest.approx(by_labels, abs=1e-6)
    assert metrics["iou"] == pytest.approx(iou([(t, fg) for t, fg, _ in found]), abs=1e-6)
    per_image = [iou([(t, lab)]) for t, _, lab in found]
    assert [r["iou_nuclei"] for r in rows] == pytest.approx(per_image, abs=1e-6)
    assert by_labels != pytest.approx(metrics["iou"], abs=1e-3)  # two different scores


def test_eval_on_all_images_with_tta(trained):
    ckpt, root = trained
    metrics, rows = evaluate(eval_cfg(ckpt, "split=all", "inference.tta=true"))
    assert len(rows) == metrics["images"] == 10
    assert {r["height"] for r in rows} == {64}
    assert metrics["map"] == pytest.approx(np.mean([r["map"] for r in rows]), abs=1e-6)


def test_eval_refuses_a_file_that_is_not_a_checkpoint(trained, tmp_path):
    _, root = trained
    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.ckpt is not a cellseg checkpoint"):
        evaluate(eval_cfg(bogus))
    with pytest.raises(ValueError, match="missing.ckpt: no such file and no shipped model"):
        evaluate(eval_cfg(tmp_path / "missing.ckpt"))


def test_rle_of_all_labels_in_one_pass_decodes_to_each_mask():
    from skimage.measure import label

    rng = np.random.default_rng(0)
    labels = label(rng.random((37, 23)) > 0.6).astype(np.int32)
    encoded = rle_by_label(labels)
    assert sorted(encoded) == list(range(1, labels.max() + 1))
    for k, rle in encoded.items():
        np.testing.assert_array_equal(rle_decode(rle, labels.shape), labels == k)
    assert rle_by_label(np.zeros((4, 4), np.int32)) == {}


def test_rle_matches_the_kaggle_convention_and_round_trips():
    mask = np.array([[1, 0], [1, 1]], bool)  # column-major pixels 1, 2 (column 0) and 4
    assert rle_by_label(mask.astype(np.uint8)) == {1: "1 2 4 1"}
    rng = np.random.default_rng(0)
    random_mask = rng.random((7, 5)) > 0.5
    (rle,) = rle_by_label(random_mask.astype(np.uint8)).values()
    np.testing.assert_array_equal(rle_decode(rle, (7, 5)), random_mask)



def test_predict_writes_masks_labels_overlays_and_submission(trained, tmp_path):
    ckpt, root = trained
    out = tmp_path / "pred"
    summary = predict(predict_cfg(ckpt, root, out))
    ids = sorted(find_inputs(root))
    assert summary["images"] == len(ids) == 10
    for sub in ("masks", "labels", "overlays"):
        assert sorted(p.stem for p in (out / sub).glob("*.png")) == ids
    labels = np.asarray(Image.open(out / "labels" / f"{ids[0]}.png"))
    assert labels.dtype == np.uint16
    assert labels.shape == (64, 64)
    mask = np.asarray(Image.open(out / "masks" / f"{ids[0]}.png"))
    assert set(np.unique(mask)) <= {0, 255}
    with open(out / "submission.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["ImageId"] == ids[0]]
    rebuilt = np.zeros_like(labels)
    for k, r in enumerate(rows, start=1):
        if r["EncodedPixels"]:
            rebuilt[rle_decode(r["EncodedPixels"], labels.shape)] = k
    np.testing.assert_array_equal(rebuilt > 0, labels > 0)
    assert len(rows) == max(labels.max(), 1)


def test_predict_resumes_and_never_overwrites_unless_asked(trained, tmp_path):
    ckpt, root = trained
    out = tmp_path / "pred"
    predict(predict_cfg(ckpt, root, out))
    first = sorted((out / "labels").glob("*.png"))
    first[0].unlink()  # as if interrupted before the last image
    stamp = first[1].stat().st_mtime_ns
    summary = predict(predict_cfg(ckpt, root, out))
    assert summary["images"] == 1
    assert summary["skipped"] == 9
    assert first[0].is_file()
    assert first[1].stat().st_mtime_ns == stamp
    assert predict(predict_cfg(ckpt, root, out, "overwrite=true"))["images"] == 10


def test_predict_refuses_to_write_into_its_input(trained):
    ckpt, root = trained
    with pytest.raises(ValueError, match="inside the input folder"):
        predict(predict_cfg(ckpt, root, root / "predictions"))


def test_predict_single_file_and_flat_folder(trained, tmp_path):
    ckpt, root = trained
    sample = read_samples(root, "dsb2018")[0]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(sample.image).save(flat / "a.png")
    Image.fromarray(sample.image[..., 0]).save(flat / "gray.png")  # grayscale works too
    assert predict(predict_cfg(ckpt, flat, tmp_path / "o1"))["images"] == 2
    assert predict(predict_cfg(ckpt, flat / "a.png", tmp_path / "o2"))["images"] == 1


def test_eval_and_predict_command_lines(trained, tmp_path):
    import os
    import subprocess
    import sys

    ckpt, root = trained
    env = {**os.environ, "CELLSEG_ROOT": str(tmp_path)}

    def run(module, *args):
        cmd = [sys.executable, "-m", module, f"ckpt_path={ckpt}", *args]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, failure(out)
        return out

    out = run("cellseg.eval")
    assert "map" in out.stdout
    assert "all" in out.stdout
    assert f"Scoring the test split (2 images) of {root}: the checkpoint's training data" in (
        out.stdout + out.stderr
    )
    (run_dir,) = (tmp_path / "logs/eval/runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["images"] == 2
    run("cellseg.predict", f"input={root}", f"output={tmp_path / 'pred'}")
    assert len(list((tmp_path / "pred/labels").glob("*.png"))) == 10


@pytest.mark.slow
def test_predicting_a_4096_image_whole_stays_under_2_5_gb(tmp_path):
    """The shipped (native) model on the largest plane predict still takes whole."""
    import resource

    from helpers import run_cli

    (tmp_path / "in").mkdir()
    from cellseg.samples import sample_path

    # the sample's 89 nuclei 256 times (noise made 314,101 specks, beyond 16-bit labels)
    image = np.tile(np.asarray(Image.open(sample_path("nuclei"))), (16, 16))
    Image.fromarray(image).save(tmp_path / "in/big.png")
    out = run_cli([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "diameter=null"],
                  tmp_path, module="cellseg.predict")
    assert out.returncode == 0, failure(out)
    assert (tmp_path / "out/labels/big.png").is_file()
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert peak_mb < 2560, f"peak resident memory {peak_mb:.0f} MB (about 1.6 GB measured)"


def test_eval_scores_the_runs_own_split_whatever_its_own_defaults(cfg_factory):
    from cellseg.datasets import make_splits
    from cellseg.train import train

    cfg = cfg_factory("data.val_size=0.2", "data.split_seed=3", "trainer.max_epochs=1")
    train(cfg)
    ckpt = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    ids = sorted(p.name for p in Path(cfg.data.root).iterdir() if p.is_dir())
    run_splits = make_splits(ids, 0.2, 0.2, 3)
    assert checkpoint_data(ckpt)["splits"] == run_splits
    assert run_splits["test"] != make_splits(ids, 0.2, 0.0, 0)["test"]  # eval's old guess
    _, rows = evaluate(eval_cfg(ckpt))
    assert [r["id"] for r in rows] == run_splits["test"]
    _, rows = evaluate(eval_cfg(ckpt, "split=val"))
    assert [r["id"] for r in rows] == run_splits["val"]


def test_preprocessing_comes_from_the_checkpoint(trained):
    from cellseg.checkpoint import load_model, preprocessing

    ckpt, root = trained
    model = load_model(ckpt)
    pre = preprocessing(model)
    assert {k: pre[k] for k in ("mode", "img_size", "in_channels", "multiple", "channel")} == {
        "mode": "resize", "img_size": 64, "in_channels": 3, "multiple": 16, "channel": None
    }
    # the training split's nuclei, at 64 px as stored and as trained: median equivalent diameter
    train = {s.id: s for s in read_samples(root, "dsb2018")}
    areas = [np.unique(train[i].labels, return_counts=True)[1][1:]
             for i in checkpoint_data(model)["splits"]["train"]]
    assert pre["diameter"] == pytest.approx(np.median(np.sqrt(4 * np.concatenate(areas) / np.pi)))
    assert checkpoint_data(model)["hparams"]["root"] == str(root)
    assert preprocessing(model, {"img_size": 128})["img_size"] == 128  # an override wins


def test_an_old_checkpoint_works_through_its_preprocess_or_an_override(trained, tmp_path):
    from cellseg.checkpoint import load_model, preprocessing

    ckpt, root = trained
    raw = torch.load(ckpt, weights_only=True)
    for key in ("datamodule_hyper_parameters", "NucleiDataModule"):
        del raw[key]
    old = {"mode": "resize", "img_size": 64, "in_channels": 3, "normalize": "percentile",
           "invert_bright": False}
    raw["hyper_parameters"]["preprocess"] = old
    torch.save(raw, tmp_path / "old.ckpt")
    model = load_model(tmp_path / "old.ckpt")
    assert preprocessing(model) == {**old, "channel": None, "multiple": 16, "diameter": None}
    del raw["hyper_parameters"]["preprocess"]
    torch.save(raw, tmp_path / "older.ckpt")
    with pytest.raises(ValueError, match="records no mode, img_size"):
        preprocessing(load_model(tmp_path / "older.ckpt"))
    assert preprocessing(load_model(tmp_path / "older.ckpt"), old)["img_size"] == 64
    with pytest.raises(ValueError, match="records no training data .* pass the data to score"):
        evaluate(eval_cfg(tmp_path / "old.ckpt"))
    cfg = eval_cfg(tmp_path / "old.ckpt", "data=synthetic", f"data.root={root}")
    assert evaluate(cfg)[0]["images"] == 2  # the split recomputed from data.test_size


def test_eval_of_moved_or_other_data_scores_the_ids_or_says_what_is_missing(trained, tmp_path):
    import shutil

    ckpt, root = trained
    test_ids = checkpoint_data(ckpt)["splits"]["test"]
    for folder in (p for p in root.iterdir() if p.is_dir()):
        shutil.copytree(folder, tmp_path / "moved" / folder.name)
        if folder.name not in test_ids:
            shutil.copytree(folder, tmp_path / "other" / folder.name)
    _, rows = evaluate(eval_cfg(ckpt, f"data_root={tmp_path / 'moved'}"))
    assert [r["id"] for r in rows] == test_ids
    with pytest.raises(ValueError, match="2 of the checkpoint's 2 test images are not in"):
        evaluate(eval_cfg(ckpt, "data=synthetic", f"data.root={tmp_path / 'other'}"))
    assert evaluate(eval_cfg(ckpt, f"data_root={tmp_path / 'other'}", "split=all"))[0][
        "images"] == 8


@pytest.mark.parametrize("channels", [[8, 16, 32], [4, 8, 16, 32, 64]])
def test_three_and_five_level_networks_train_crop_evaluate_and_predict(cfg_factory, channels):
    from cellseg.train import train

    cfg = cfg_factory(
        f"model.net.channels=[{','.join(map(str, channels))}]", "model.net.bottleneck=64",
        "data.mode=crop", "data.crop_size=32", "data.synthetic.size=72", "trainer.max_epochs=1",
    )
    train(cfg)  # validation pads 72 to the multiple (72 for 8, 96 for 32)
    ckpt = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    metrics, rows = evaluate(eval_cfg(ckpt))
    assert metrics["images"] == 2
    assert {(r["height"], r["width"]) for r in rows} == {(72, 72)}
    out = Path(cfg.paths.output_dir) / "pred"
    assert predict(predict_cfg(ckpt, cfg.data.root, out, "inference.tile_size=64",
                           "inference.overlap=16"))["images"] == 10
    assert np.asarray(Image.open(next((out / "labels").glob("*.png")))).shape == (72, 72)


def test_images_below_the_networks_multiple_are_refused(trained):
    from cellseg.checkpoint import load_model, preprocessing
    from cellseg.inference import segment

    ckpt, _ = trained
    model = load_model(ckpt)
    with pytest.raises(ValueError, match="is 8x40 pixels, smaller than the network's size"):
        segment(model, np.zeros((8, 40, 3), np.uint8), preprocessing(model), {}, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_eval_and_predict_on_cuda(trained, tmp_path):
    ckpt, root = trained
    cpu, _ = evaluate(eval_cfg(ckpt))
    cuda, _ = evaluate(eval_cfg(ckpt, "device=cuda"))
    assert cuda["iou"] == pytest.approx(cpu["iou"], abs=0.01)
    assert predict(predict_cfg(ckpt, root, tmp_path / "p", "device=cuda"))["images"] == 10
