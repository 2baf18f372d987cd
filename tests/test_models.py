"""The shipped model, naming a model (model=), the checkpoint reader and fine-tuning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from cellseg import checkpoint
from cellseg.errors import UserError
from cellseg.files import read_image
from cellseg.metrics import InstanceScores
from cellseg.models import DEFAULT_MODEL, shipped_path
from cellseg.samples import sample_labels_path, sample_path
from helpers import REAL_DATA, compose_cfg, needs_real_data, run_cli

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out

POOL = REAL_DATA.parents[1] / "dsb2018-pool"
needs_pool = pytest.mark.skipif(not POOL.is_dir(), reason=f"the pool is not at {POOL}")


@pytest.fixture(scope="module")
def shipped():
    return checkpoint.load(DEFAULT_MODEL)


def sample_score(model, diameter="auto") -> dict[str, float]:
    """The model's instance scores on the packaged sample image."""
    from cellseg.checkpoint import instance_options
    from cellseg.inference import segment_at_scale

    image, truth = read_image(sample_path()), read_image(sample_labels_path())[..., 0]
    options = instance_options({}, {"postprocess": model.postprocess})
    labels = segment_at_scale(model.net, image, model.preprocessing(), {}, options, diameter)[1]
    return {k: float(v) for k, v in InstanceScores()(truth.astype(np.int32), labels).items()}


def test_the_shipped_model_carries_what_a_checkpoint_carries(shipped):
    info = shipped.info
    assert shipped_path(DEFAULT_MODEL).stat().st_size < 10 * 2**20
    assert info["format"] == 2
    assert info["command"].startswith("python -m cellseg.train experiment=general")
    assert len(info["train_ids_sha256"]) == 64
    assert info["images"]["train"] > 300
    assert info["images"]["test"] == 10
    pre = shipped.preprocessing()
    assert (pre["mode"], pre["in_channels"], pre["invert_bright"]) == ("crop", 3, True)
    assert 10 < pre["diameter"] < 40  # px: the median DSB nucleus
    assert shipped.postprocess["instances"]["threshold"] > 0
    assert set(info["scores"]["test"]) >= {"map", "ap50_pooled", "iou_nuclei"}
    # weights only: what the file is for needs no pickled code
    raw = torch.load(shipped_path(DEFAULT_MODEL), weights_only=True)
    assert "optimizer_states" not in raw


def test_the_shipped_model_segments_the_sample_image(shipped):
    scores = sample_score(shipped)
    assert scores["ap50"] > 0.75, scores  # 89 annotated nuclei, most of them found alone


@needs_real_data
def test_the_shipped_model_scores_on_the_test_images_what_its_card_says(shipped, tmp_path):
    from cellseg.eval import evaluate

    cfg = compose_cfg("eval", [f"data_root={REAL_DATA}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics, rows = evaluate(cfg)
    assert len(rows) == 10
    claimed = shipped.info["scores"]["test"]
    for k in ("map", "ap50_pooled", "iou_nuclei"):
        assert metrics[k] == pytest.approx(claimed[k], abs=0.01), k


def test_a_model_name_that_is_neither_shipped_nor_a_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"model=nucleii: no such file and no shipped model"):
        checkpoint.resolve("nucleii")
    other = tmp_path / "weights.h5"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match=r"cellseg reads \.ckpt \(\.pth\), model\.pt"):
        checkpoint.resolve(str(other))
    assert checkpoint.resolve(None) == (shipped_path(DEFAULT_MODEL), "checkpoint")


def test_model_and_ckpt_path_together_are_refused():
    cfg = compose_cfg("predict", ["model_name=nuclei", "ckpt_path=x.ckpt", "input=a", "output=b"])
    with pytest.raises(UserError, match="pass model= alone"):
        checkpoint.named(cfg)


def test_an_exported_file_predicts_what_its_checkpoint_predicts(trained, tmp_path):
    from cellseg.export import write_onnx, write_torchscript
    from cellseg.inference import probabilities

    ckpt, _ = trained
    model = checkpoint.load(ckpt)
    meta = {"preprocess": model.preprocessing(), "postprocess": {"instances": {"min_size": 3}}}
    image = read_image(sample_path())
    expected = probabilities(model.net, image, model.preprocessing(), {})
    for path in (write_torchscript(model.module.net, tmp_path / "model.pt", meta),
                 write_onnx(model.module.net, tmp_path / "model.onnx", meta)):
        exported = checkpoint.load(path)
        assert exported.kind == {".pt": "torchscript", ".onnx": "onnx"}[path.suffix]
        assert exported.preprocessing() == model.preprocessing()
        assert exported.postprocess == {"instances": {"min_size": 3}}
        got = probabilities(exported.net, image, exported.preprocessing(), {})
        np.testing.assert_allclose(got, expected, atol=1e-4)
        with pytest.raises(UserError, match="exported"):
            exported.module  # noqa: B018 (export and fine-tuning need the checkpoint)


def test_the_predicting_network_is_the_trained_modules_without_lightning(shipped):
    """Prediction runs checkpoint.TrainedNet, its batch norms folded into the convolutions;
    export and fine-tuning the SegmentationModule built from the same file: both give the same
    logits."""
    x = torch.rand(1, 3, 64, 96)
    assert type(shipped.net).__name__ == "TrainedNet"
    assert not [m for m in shipped.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [m for m in shipped.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        torch.testing.assert_close(shipped.net(x), shipped.module(x))
    assert type(shipped.module).__name__ == "SegmentationModule"


def test_weights_stored_in_half_load_as_float32_and_segment_alike(shipped, tmp_path):
    """A wider shipped network keeps its 10 MB with float16 weights (scripts/ship_model.py):
    the file halves, the networks built from it are float32, and the logits move by float16's
    rounding alone."""
    raw = checkpoint.read(shipped.path)
    halved = checkpoint.weights_in_half(raw)
    assert halved["state_dict"]["net.head.weight"].dtype == torch.float16
    assert raw["state_dict"]["net.head.weight"].dtype == torch.float32  # the original untouched
    torch.save(halved, tmp_path / "half.pth")
    assert (tmp_path / "half.pth").stat().st_size < 0.55 * shipped.path.stat().st_size
    half = checkpoint.load(tmp_path / "half.pth")
    assert {p.dtype for p in half.net.parameters()} == {torch.float32}
    assert {p.dtype for p in half.module.parameters()} == {torch.float32}  # fine-tuning's
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        full, rounded = shipped.net(x), half.net(x)
    assert 0 < (full - rounded).abs().max() < 0.05
    assert sample_score(half)["ap50"] == pytest.approx(sample_score(shipped)["ap50"], abs=0.02)


def test_predict_imports_neither_lightning_nor_torchvision():
    """270 + 160 MB a predict or a block worker would carry for nothing."""
    import subprocess
    import sys

    heavy = ("lightning", "torchvision", "torchmetrics")
    code = (f"import sys, cellseg.predict, cellseg.blocks; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_checkpoint_of_format_1_still_reads(trained, tmp_path):
    ckpt, _ = trained
    raw = torch.load(ckpt, weights_only=True)
    assert raw["cellseg"]["format"] == 2
    assert "commit" in raw["cellseg"]
    del raw["cellseg"]  # written before 2026-12-02
    torch.save(raw, tmp_path / "old.ckpt")
    old = checkpoint.load(tmp_path / "old.ckpt")
    assert old.info["format"] == 1
    assert old.preprocessing() == checkpoint.load(ckpt).preprocessing()


def test_predict_without_a_model_uses_the_shipped_one_and_says_so_first(tmp_path):
    folder = tmp_path / "My Images é"  # a biologist's folder name, as the shell passes it
    folder.mkdir()
    (folder / "a.png").write_bytes(sample_path().read_bytes())
    out = run_cli([f"input={folder}", f"output={tmp_path / 'out'}"], tmp_path, "cellseg.predict")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "] " in line]
    assert "model: nuclei (the shipped model" in lines[0], lines[:3]
    labels = read_image(tmp_path / "out/labels/a.png")[..., 0]
    assert 60 < labels.max() < 120  # 89 annotated nuclei


def test_diameter_auto_finds_the_size_of_magnified_nuclei(shipped, caplog):
    from cellseg.checkpoint import instance_options
    from cellseg.datasets import resize
    from cellseg.inference import estimate_diameter

    image = read_image(sample_path())
    options = instance_options({}, {"postprocess": shipped.postprocess})
    pre = shipped.preprocessing()
    native = estimate_diameter(shipped.net, image, pre, {}, options)
    larger = estimate_diameter(shipped.net, resize(image, (768, 768), "linear"), pre, {}, options)
    assert 8 < native < 30
    assert larger / native == pytest.approx(3.0, rel=0.25)


def test_finetune_from_the_shipped_model_runs_end_to_end_and_keeps_its_input(tmp_path, caplog):
    from cellseg.train import train

    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images/a.png").write_bytes(sample_path().read_bytes())
    (root / "masks/a.png").write_bytes(sample_labels_path().read_bytes())
    common = ["experiment=finetune", f"data.root={root}", "trainer.max_epochs=1",
              "trainer.limit_train_batches=2", "callbacks.progress_bar=null",
              "callbacks.image_grid=null", "data.crops_per_image=4"]
    cfg = compose_cfg("train", common)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="cellseg"):
        train(cfg)
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert f"Score the model on annotated images it did not see: python -m cellseg.eval " \
        f"model={last} data=folder data.root=DIR split=all" in caplog.text
    assert "Final scores" not in caplog.text  # no empty line of scores: none was held back
    tuned = checkpoint.load(last)
    shipped = checkpoint.load(DEFAULT_MODEL)
    assert tuned.preprocessing()["normalize"] == shipped.preprocessing()["normalize"]
    assert tuned.info["command"]  # the fine-tuning run records its own provenance
    assert tuned.postprocess["split"] == "train"
    # the size diameter=auto scales to is now the fine-tuning images' own, and the log says so
    shipped_size = shipped.data["diameter"]
    assert f"The pretrained model's training nuclei: {shipped_size:.1f} px across" in caplog.text
    assert f"median {tuned.data['diameter']:.1f} px across" in caplog.text
    assert abs(tuned.data["diameter"] - shipped_size) > 5  # the sample's nuclei: about 10 px
    assert "trainer.precision=mixed: " in caplog.text  # what mixed became on this machine
    changed = [k for k, v in tuned.module.net.state_dict().items()
               if not torch.equal(v, shipped.module.net.state_dict()[k])]
    assert changed  # it trained, from the shipped weights (the same shapes)

    from cellseg.eval import evaluate

    with pytest.raises(UserError, match=r"the test split of .*last.ckpt holds no images .* "
                       r"data=folder data.root=DIR split=all"):
        evaluate(compose_cfg("eval", [f"model_name={last}"]))

    refused = compose_cfg("train", [*common, "model.net.in_channels=1"])
    with pytest.raises(UserError, match=r"model.net.in_channels=1 but pretrained=nuclei has 3"):
        train(refused)


def test_train_roots_add_training_images_and_never_test_images(tmp_path, caplog):
    from cellseg.datamodule import NucleiDataModule
    from cellseg.synthetic import generate

    generate(tmp_path / "main", n_images=10, size=64, seed=0)
    extra = tmp_path / "extra"
    generate(extra, n_images=12, size=64, seed=1)  # 22 images in all: a progress line
    alone = NucleiDataModule(str(tmp_path / "main"), mode="crop", crop_size=32, val_size=0.1)
    both = NucleiDataModule(str(tmp_path / "main"), mode="crop", crop_size=32, val_size=0.1,
                            train_roots=[str(extra)])
    with caplog.at_level(logging.INFO, logger="cellseg"):
        alone.setup(), both.setup()
    assert "Reading main and extra: 22 of 22" in caplog.text  # every folder named
    assert both.splits["test"] == alone.splits["test"]  # the test images are root's alone
    pooled = both.splits["train"] + both.splits["val"]
    assert sum(i.startswith("extra/") for i in pooled) == 12
    assert len(both.splits["val"]) == 2  # 10 % of the 20 training-side images
    assert len(both.datasets["train"].pairs) == len(both.splits["train"])


@needs_pool
def test_a_folder_layout_root_in_train_roots_reads_its_instance_labels(tmp_path):
    from cellseg.datasets import training_sources

    sources = training_sources([POOL])
    assert len(sources) == 300
    assert sources[0].id.startswith("dsb2018-pool/")
    sample = sources[0].read()
    assert sample.id == sources[0].id
    assert sample.labels.max() > 1


@needs_pool
def test_the_stardist_peer_trains_on_the_shipped_models_own_split(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts/stardist_pool.py"
    spec = importlib.util.spec_from_file_location("stardist_pool", script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    peer.write_split(str(POOL.parent), str(tmp_path / "split.json"))
    split = json.loads((tmp_path / "split.json").read_text())
    shipped = checkpoint.load(DEFAULT_MODEL).data["splits"]
    for name in ("train", "val", "test"):
        assert sorted(e["id"] for e in split[name]) == sorted(
            i.split("/")[-1] for i in shipped[name]), name
    assert [len(split[k]) for k in ("train", "val", "test")] == [306, 34, 10]
    assert all(Path(e["image"]).is_file() for e in split["val"] + split["test"])


def test_exported_preparation_is_read_from_old_files_too(trained, tmp_path):
    from cellseg.export import write_torchscript

    ckpt, _ = trained
    model = checkpoint.load(ckpt)
    path = write_torchscript(model.module.net, tmp_path / "model.pt", model.preprocessing())
    assert checkpoint.load(path).preprocessing() == model.preprocessing()  # before 2026-12
    files = {"cellseg": ""}
    torch.jit.load(str(path), _extra_files=files)
    assert json.loads(files["cellseg"])["normalize"] == "percentile"


def test_hydra_args_quote_spaces_and_rename_model():
    from cellseg.cli import hydra_args

    args = hydra_args(["input=/Users/me/My Images", "model=nuclei", "seed=1", "-m"],
                      {"model": "model_name"})
    assert args == ["input='/Users/me/My Images'", "model_name=nuclei", "seed=1", "-m"]
    assert hydra_args(["data.root=/d/Zellkerne Übersicht"]) == [
        "data.root='/d/Zellkerne Übersicht'"]
    assert hydra_args(["x=[1, 2]", "y=${a b}"]) == ["x=[1, 2]", "y=${a b}"]


def test_no_model_logs_a_line_naming_the_shipped_file():
    line = checkpoint.load(None).first_line()
    assert line.startswith("model: nuclei (the shipped model), checkpoint ")
    assert Path(line.split()[-1]) == shipped_path(DEFAULT_MODEL)
    # a model named by its path: the path once
    path = shipped_path(DEFAULT_MODEL)
    assert checkpoint.load(path).first_line() == f"model: {path}, checkpoint"


@pytest.mark.parametrize("name", ["model.pt", "model.onnx", "package.bioimageio.zip"])
def test_a_damaged_exported_file_is_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(UserError, match=rf"model={path}: (cannot read it as a|a zip without)"):
        checkpoint.load(path)
