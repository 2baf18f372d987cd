"""Models leave cellseg: TorchScript, ONNX, the bioimage.io package and the predict backends."""

from __future__ import annotations

import gc
import json
import os
import socket
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

pytest.importorskip("onnxruntime", reason="pip install 'cellseg[export]'")

from cellseg.backends import network  # noqa: E402
from cellseg.checkpoint import (  # noqa: E402
    load_model,  # noqa: E402
    options_text,
    tuned_instances,
)
from cellseg.datasets import prepare_image, read_samples  # noqa: E402
from cellseg.export import documentation, export  # noqa: E402
from cellseg.inference import predict_tensor  # noqa: E402
from cellseg.predict import predict  # noqa: E402
from helpers import compose_cfg  # noqa: E402


@pytest.fixture(scope="module")
def model_and_image(trained):
    ckpt, root = trained
    model = load_model(str(ckpt))
    image = prepare_image(read_samples(root, "dsb2018")[0].image)
    return model, torch.from_numpy(image).permute(2, 0, 1)


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_backends_match_pytorch_within_1e_4(model_and_image, backend):
    model, image = model_and_image
    net = network(model, backend)
    with torch.no_grad():
        batch = torch.stack([image, image.flip(-1)])  # batch 2 of a real image
        assert (net(batch) - model(batch)).abs().max() < 1e-4
    odd = image[:, 3:53, 5 : 75 - 10]  # 50x60: predict_tensor pads it to 64x64
    for x in (image, odd):
        expected = predict_tensor(model, x)
        got = predict_tensor(net, x)
        assert got.shape == expected.shape == (2, *x.shape[1:])
        assert (got - expected).abs().max() < 1e-4


def test_an_unknown_backend_is_refused(model_and_image):
    with pytest.raises(
        ValueError,
        match="backend=.tensorrt.; use one of pytorch, pytorch-bf16, torchscript, onnxruntime, "
        "onnxruntime-int8",
    ):
        network(model_and_image[0], "tensorrt")


def test_int8_is_calibrated_on_the_training_images_and_close_to_fp32(model_and_image, trained):
    model, image = model_and_image
    net = network(model, "onnxruntime-int8")
    assert net.backend == "onnxruntime-int8"
    with torch.no_grad():
        expected = torch.sigmoid(predict_tensor(model, image))
        got = torch.sigmoid(predict_tensor(net, image))
    assert got.shape == expected.shape
    assert 0 < (got - expected).abs().max()  # quantized: not the same numbers
    assert ((got > 0.5) == (expected > 0.5)).float().mean() > 0.97
    moved = trained[1].parent / "not_there"
    refusal = f"calibrates on the checkpoint's training images and {moved} is not there"
    with pytest.raises(ValueError, match=refusal):
        network(model, "onnxruntime-int8", data_root=moved)


def test_predict_with_onnxruntime_writes_the_same_labels(trained, tmp_path):
    ckpt, root = trained
    image = sorted(root.glob("*/images/*.png"))[0]
    labels = {}
    for backend in ("pytorch", "onnxruntime"):
        out = tmp_path / backend
        cfg = compose_cfg(
            "predict",
            [f"ckpt_path={ckpt}", f"input={image}", f"output={out}", f"backend={backend}"],
        )
        assert predict(cfg)["images"] == 1
        labels[backend] = np.asarray(Image.open(out / "labels" / f"{image.stem}.png"))
    assert labels["pytorch"].max() > 0
    np.testing.assert_array_equal(labels["pytorch"], labels["onnxruntime"])


@pytest.fixture(scope="module")
def small_trained(tmp_path_factory):
    """A trained 2-level U-Net (size multiple 4): small enough that bioimage.io's test of all
    three weight formats at three sizes and two batch sizes stays fast."""
    from cellseg.train import train
    from helpers import make_cfg

    tmp = tmp_path_factory.mktemp("small")
    cfg = make_cfg(
        tmp,
        [
            "model.net.channels=[8,16]",
            "model.net.bottleneck=32",
            "model.net.out_channels=3",  # foreground, contour, distance
            "trainer.max_epochs=1",
            "test=false",
            "data.val_size=0.25",  # validation images: the post-processing is tuned
        ],
    )
    train(cfg)
    return tmp / "out/checkpoints/last.ckpt", sorted(tmp.glob("data/synthetic/*/images/*.png"))[0]


def test_export_writes_three_formats_and_the_package_passes_bioimageio_test(
    small_trained, tmp_path, monkeypatch
):
    from bioimageio.core import test_model

    connections = []  # offline: export and the zoo's test must not reach for the network

    def refuse(*args):
        connections.append(args[-1] if len(args) == 2 else args[0])  # (sock, address) or host
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)

    ckpt, image = small_trained
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"iou": 0.5, "map": 0.25, "images": 2}))
    cfg = compose_cfg(
        "export",
        [f"ckpt_path={ckpt}", f"image={image}", f"output={tmp_path}", f"metrics={metrics}"],
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    paths = export(cfg)
    assert sorted(p.name for p in paths.values()) == [
        "cellseg-nuclei-u-net.bioimageio.zip",
        "model.onnx",
        "model.pt",
    ]
    assert not (tmp_path / "package").exists()  # the package's loose files are not left over
    # the preparation travels inside both files
    import onnx

    props = {p.key: p.value for p in onnx.load(str(paths["onnx"])).metadata_props}
    assert json.loads(props["cellseg"])["preprocess"]["normalize"] == "percentile"
    files = {"cellseg": ""}
    torch.jit.load(str(paths["torchscript"]), _extra_files=files)
    assert json.loads(files["cellseg"])["preprocess"]["in_channels"] == 3
    assert json.loads(files["cellseg"])["postprocess"]["instances"] == tuned_instances(ckpt)
    from cellseg import checkpoint

    packaged = checkpoint.load(paths["bioimageio"])  # model= takes the zip as it is
    assert packaged.kind == "bioimageio"
    assert packaged.preprocessing() == checkpoint.load(ckpt).preprocessing()
    assert packaged.postprocess["instances"] == tuned_instances(ckpt)

    with zipfile.ZipFile(paths["bioimageio"]) as z:
        names = set(z.namelist())
        import yaml

        rdf = yaml.safe_load(z.read("rdf.yaml"))
        doc = z.read("documentation.md").decode()
    assert {"weights.pt", "model.pt", "model.onnx", "unet.py", "cover.png"} <= names
    assert {"test_input.npy", "test_output.npy", "sample_input.tif", "sample_output.tif"} <= names
    assert {"nuclei", "fluorescence", "2d", "unet", "instance-segmentation"} <= set(rdf["tags"])
    assert rdf["format_version"].startswith("0.5.")
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert rdf["weights"]["onnx"]["opset_version"] >= 17
    steps = [p for p in rdf["inputs"][0]["preprocessing"] if p["id"] != "ensure_dtype"]
    assert [p["id"] for p in steps] == ["scale_range", "clip"]
    assert (steps[0]["kwargs"]["min_percentile"], steps[0]["kwargs"]["max_percentile"]) == (1, 99.8)
    space = rdf["inputs"][0]["axes"][2]["size"]
    assert (space["min"], space["step"]) == (20, 4)  # 2 halos of 8 + the size multiple 4
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["foreground", "contour", "distance"]
    training = rdf["config"]["cellseg"]["training"]
    assert training["scores"] == {"iou": 0.5, "map": 0.25}
    assert (training["loss"], training["net"]["channels"]) == ("bce", [8, 16])
    # the post-processing the checkpoint was tuned with travels with it, as eval uses it
    tuned = tuned_instances(ckpt)
    assert "min_score" in tuned
    assert training["postprocess"]["instances"] == tuned
    assert training["postprocess"]["split"] == "val"
    assert f"{options_text(tuned)}, tuned on the run's validation images" in doc
    assert f"its cores (above {tuned['seed_threshold']:g}) seed a watershed" in doc
    assert rdf["authors"][0]["name"] == os.environ.get("USER", "cellseg user")  # resolved

    gc.freeze()  # bioimageio.core collects garbage after each model: skip the suite's objects
    try:
        summary = test_model(paths["bioimageio"])
    finally:
        gc.unfreeze()
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    warnings = [(w.loc, w.msg) for d in summary.details for w in d.warnings]
    assert not any("FAIR" in msg for _, msg in warnings), warnings  # all fields a zoo asks for
    assert connections == []
    formats = {d.name for d in summary.details if d.name.startswith("Reproduce test outputs")}
    assert len(formats) == 3  # every weight format ran the test image


def test_the_documentation_names_the_post_processing_and_the_images_it_was_tuned_on():
    pre = {"invert_bright": False, "mode": "crop", "img_size": 64, "in_channels": 3,
           "normalize": "percentile"}
    untuned = documentation(pre, {}, 1, "m")
    assert "threshold 0.5, objects under 10 pixels dropped (not tuned after training)." in untuned
    tuned = {"instances": {"threshold": 0.6, "min_size": 20}, "split": "train"}
    doc = documentation(pre, {"postprocess": tuned}, 1, "m")
    assert "threshold=0.6 min_size=20, tuned on the run's training images." in doc


def test_export_refuses_an_image_smaller_than_the_package_minimum(small_trained, tmp_path):
    ckpt, _ = small_trained
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(tiny)
    cfg = compose_cfg("export", [f"ckpt_path={ckpt}", f"image={tiny}", f"output={tmp_path}"])
    with pytest.raises(ValueError, match="12x40 pixels, the package needs at least 20 a side"):
        export(cfg)


def test_bench_backend_table_times_and_scores_each_backend(trained):
    from cellseg.bench import BACKEND_COLUMNS, backend_table, markdown

    ckpt, root = trained
    rows = backend_table(str(ckpt), "synthetic", str(root), ["pytorch", "onnxruntime"], 1)
    assert [r["backend"] for r in rows] == ["pytorch", "onnxruntime"]
    assert {r["images"] for r in rows} == {2}  # the test split of 10 images
    assert rows[0]["megapixels"] == 2 * 64 * 64 / 1e6
    assert rows[0]["speedup"] == 1.0
    assert rows[0]["map_change"] == 0.0
    assert abs(rows[1]["map_change"]) < 1e-3  # ONNX Runtime keeps the score
    assert rows[1]["speedup"] == rows[1]["predict_mpx_s"] / rows[0]["predict_mpx_s"]
    assert markdown(rows, BACKEND_COLUMNS, ".4f").count("\n") == 4
