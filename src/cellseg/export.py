"""Models leave cellseg: ``python -m cellseg.export [model=...] image=... output=DIR``.

Writes into ``output``:
- ``model.pt``: the network in TorchScript;
- ``model.onnx``: the network in ONNX (opset 17), dynamic batch, height and width;
- ``<name>.bioimageio.zip``: a bioimage.io model package (format 0.5) for Fiji (deepImageJ),
  QuPath, ilastik and napari, with the weights as ``pytorch_state_dict`` (architecture:
  ``cellseg/unet.py``) and the two files above as its children.

``model.pt`` and ``model.onnx`` take float32 (N, C, H, W) images prepared as cellseg prepares
them (channels, normalisation, inversion: recorded as JSON under the key ``cellseg`` in their
metadata) with H and W multiples of the network's size multiple, and return logits (apply a
sigmoid for probabilities). The package applies normalisation and sigmoid itself.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import tifffile
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from cellseg import checkpoint, config_dir
from cellseg.backends import ONNX_OPSET, onnx_bytes, plain_network, torchscript
from cellseg.checkpoint import options_text, tuned_instances
from cellseg.cli import one_line_errors, run
from cellseg.datasets import normalize, read_image, to_channels
from cellseg.errors import UserError
from cellseg.targets import TARGET_NAMES
from cellseg.tune import DEFAULTS

log = logging.getLogger(__name__)

CITATIONS = [
    {
        "text": "Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
        "Segmentation. MICCAI 2015.",
        "doi": "10.1007/978-3-319-24574-4_28",
    },
    {
        "text": "Caicedo et al. Nucleus segmentation across imaging experiments: the 2018 Data "
        "Science Bowl. Nature Methods 2019 (BBBC038, Broad Bioimage Benchmark Collection).",
        "doi": "10.1038/s41592-019-0612-7",
    },
]
TAGS = ["nuclei", "fluorescence", "2d", "unet", "instance-segmentation", "cellseg"]
PERCENTILES = (1.0, 99.8)  # datasets.normalize's "percentile"


def write_torchscript(net: nn.Module, path: Path, meta: dict) -> Path:
    """``model.pt``: the traced network; ``meta`` (its ``preprocess`` and ``postprocess``,
    :mod:`cellseg.checkpoint` reads them) in the extra file ``cellseg``."""
    torch.jit.save(torchscript(net), str(path), _extra_files={"cellseg": json.dumps(meta)})
    return path


def write_onnx(net: nn.Module, path: Path, meta: dict) -> Path:
    """``model.onnx``: the network, ``meta`` in the metadata property ``cellseg``."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes(net))
    onnx.helper.set_model_props(proto, {"cellseg": json.dumps(meta)})
    onnx.save(proto, str(path))
    return path


def min_side(net: nn.Module) -> int:
    """The package's smallest input side: something must remain between the output halos."""
    return 2 * halo(net) + net.multiple


def centre_crop(image: np.ndarray, net: nn.Module, side: int) -> np.ndarray:
    """The centre of an image, at most ``side`` pixels and a multiple of the network's size
    multiple per side."""
    m = net.multiple
    h, w = (min(s, max(side, min_side(net))) // m * m for s in image.shape[:2])
    if min(h, w) < min_side(net):
        raise UserError(
            f"image is {image.shape[0]}x{image.shape[1]} pixels, the package needs at least "
            f"{min_side(net)} a side; pass a larger image=..."
        )
    y, x = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[y : y + h, x : x + w]


def raw_tensor(image: np.ndarray, in_channels: int) -> np.ndarray:
    """A stored image as the package's raw input: float32 (1, C, H, W), the model's channels."""
    return to_channels(image, in_channels).astype(np.float32).transpose(2, 0, 1)[None]


def package_probabilities(net: nn.Module, image: np.ndarray, pre: dict) -> np.ndarray:
    """What the package computes for a stored image: channels, normalisation (on the stored
    dtype, as cellseg does), network, sigmoid; (1, K, H, W)."""
    x = normalize(to_channels(image, pre["in_channels"]), pre["normalize"]).transpose(2, 0, 1)
    with torch.no_grad():
        return torch.sigmoid(plain_network(net)(torch.from_numpy(x[None]))).numpy()


def halo(net: nn.Module) -> int:
    """Pixels to drop at tile edges: twice the size multiple (32 px for the 4-level U-Net,
    what ``inference.overlap`` blends by default)."""
    return 2 * net.multiple


def preprocessing_steps(method: str) -> list[Any]:
    """cellseg's normalisation in the spec's terms (per image, over channels, y and x)."""
    from bioimageio.spec.model import v0_5

    axes = [v0_5.AxisId("channel"), v0_5.AxisId("y"), v0_5.AxisId("x")]
    clip = v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=0.0, max=1.0))
    if method == "percentile":
        lo, hi = PERCENTILES
    elif method == "minmax":
        lo, hi = 0.0, 100.0
    elif method == "scale":  # the dtype's maximum: 8-bit images assumed
        return [v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=1 / 255))]
    else:
        raise UserError(f"unknown normalisation {method!r}; use percentile, scale or minmax")
    scale = v0_5.ScaleRangeKwargs(axes=axes, min_percentile=lo, max_percentile=hi)
    return [v0_5.ScaleRangeDescr(kwargs=scale), clip]


def documentation(pre: dict, recipe: dict, out_channels: int, name: str) -> str:
    """The package's documentation page: what it does, what the spec cannot say, the recipe."""
    tuned = recipe.get("postprocess") or {}
    seeds = (tuned.get("instances") or {}).get("seed_threshold", DEFAULTS["seed_threshold"])
    invert = (
        "The model was trained with brightfield images inverted (`invert_bright`: an image "
        "whose mean after normalisation exceeds 0.5 is replaced by 1 - image). The "
        "bioimage.io format has no conditional step: **invert light-background images "
        "yourself** before running the model (fluorescence images need nothing)."
        if pre.get("invert_bright")
        else "Images are used as they are (no brightfield inversion)."
    )
    resize = (
        f"The model was trained on images resized to {pre['img_size']}x{pre['img_size']}; "
        "cellseg resizes whole images to that size before predicting. The package runs at the "
        "image's own scale: resize your images so nuclei look as in training."
        if pre.get("mode") == "resize"
        else "It was trained at the images' native resolution: no resizing."
    )
    contour = (
        "Channel 1 (`contour`) marks nucleus boundaries: subtract it from the foreground, or "
        "use it as watershed barriers, to split touching nuclei."
        if out_channels > 1
        else ""
    )
    if out_channels > 2:
        contour += (
            " Channel 2 (`distance`) is each nucleus's distance to its own border, scaled to 1 "
            f"at its centre: its cores (above {seeds:g}) seed a watershed that floods down it."
        )
    if out_channels > 3:
        contour += (
            " Channels 3 and 4 (`offset_row`, `offset_col`) are each pixel's row and column "
            "offset from its nucleus's centre, scaled per nucleus to [0, 1] (0.5 at the centre): "
            "where one falls from about 1 to 0 two nuclei touch."
        )
    if tuned:
        kind = {"val": "validation", "train": "training"}.get(tuned.get("split"), "held-out")
        instances = f"{options_text(tuned['instances'])}, tuned on the run's {kind} images"
        if "min_score" in tuned["instances"]:
            instances += (" (`min_score`: objects whose mean foreground probability is lower "
                          "are dropped)")
        instances += "."
    else:
        instances = (f"threshold {DEFAULTS['threshold']}, objects under {DEFAULTS['min_size']} "
                     "pixels dropped (not tuned after training).")
    return f"""# {name}

A U-Net (trained with cellseg) that segments cell nuclei in 2-D microscopy images,
trained on the 2018 Data Science Bowl images (BBBC038).

## Input
An image with {pre["in_channels"]} channel(s) (grayscale is repeated to RGB, RGBA loses its
alpha), any height and width that are multiples of the network's size multiple (larger images
are tiled by the consumer). Preprocessing: cellseg's `normalize: {pre["normalize"]}` (for
`percentile`: per image, the {PERCENTILES[0]}th and {PERCENTILES[1]}th percentiles over all
channels map to 0 and 1, then clipped to [0, 1]).

{invert}

{resize}

## Output
Per-pixel probabilities (sigmoid of the network's logits), channel 0 = `foreground`.
{contour} cellseg turns them into instances with a watershed (`cellseg.instances`): {instances}

## Other formats
`model.pt` (TorchScript) and `model.onnx` output logits for prepared float32 input; their
metadata (`cellseg`) records the preparation.

## Validation
`bioimageio test` runs the test image (a real image of the training data) through every weight
format and compares with the output cellseg computed; cellseg's scores on its test split:
see `scores` below (from `cellseg.eval`, when given to the export).

## Training
```
{json.dumps(recipe, indent=2)}
```
"""


def cover_image(image: np.ndarray, probabilities: np.ndarray, options: dict) -> np.ndarray:
    """Image beside image with predicted nucleus outlines (2:1, as bioimage.io shows covers),
    the nuclei found with the instance ``options``."""
    from cellseg.instances import labels_from_probs
    from cellseg.predict import overlay

    labels = labels_from_probs(np.moveaxis(probabilities, 0, -1), **options)
    return np.concatenate([overlay(image, np.zeros_like(labels)), overlay(image, labels)], axis=1)


def training_recipe(model: nn.Module, ckpt_path: Path, metrics_path: str | None) -> dict:
    """Network, loss, experiment, data and scores of the run that wrote the checkpoint (the
    run's own config when it is beside the checkpoint, as Hydra left it)."""
    hp = model.hparams
    recipe: dict[str, Any] = {
        "checkpoint": ckpt_path.name,
        "net": dict(hp.net or {}),
        "loss": hp.loss,
    }
    run_config = ckpt_path.resolve().parents[1] / ".hydra/config.yaml"
    if run_config.is_file():
        cfg = OmegaConf.load(run_config)
        recipe["experiment"] = cfg.get("name")
        recipe["data"] = {
            k: cfg.data.get(k) for k in ("layout", "mode", "test_size") if k in cfg.data
        }
        recipe["epochs"] = cfg.get("trainer", {}).get("max_epochs")
        recipe["seed"] = cfg.get("seed")
    overrides = run_config.with_name("overrides.yaml")
    if overrides.is_file():
        recipe["overrides"] = list(OmegaConf.load(overrides))
    if tuned_instances(model):  # tuned after training, as eval and predict use it
        recipe["postprocess"] = dict(model.postprocess)  # options, images tuned on, scores
    if metrics_path:
        metrics = json.loads(Path(metrics_path).read_text())
        recipe["scores"] = {k: metrics[k] for k in ("iou", "dice", "map", "ap50") if k in metrics}
    return recipe


def build_package(
    model: nn.Module, pre: dict, crop: np.ndarray, out: Path, cfg: DictConfig, recipe: dict,
    files: Path,
) -> Path:
    """Write the package's files into ``files`` (a temporary folder) and zip them into ``out``;
    returns the zip's path.

    ``crop``: a real image (see :func:`centre_crop`), the package's test input and cover.
    """
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5

    from cellseg import unet

    net = model.net
    raw = raw_tensor(crop, pre["in_channels"])
    probs = package_probabilities(net, crop, pre)
    np.save(files / "test_input.npy", raw)
    np.save(files / "test_output.npy", probs)
    tifffile.imwrite(files / "sample_input.tif", raw)  # what viewers show beside the model
    tifffile.imwrite(files / "sample_output.tif", probs)
    cover = cover_image(crop, probs[0], (recipe.get("postprocess") or {}).get("instances", {}))
    Image.fromarray(cover).save(files / "cover.png")
    torch.save(plain_network(net).state_dict(), files / "weights.pt")
    shutil.copy(unet.__file__, files / "unet.py")
    shutil.copy(out / "model.pt", files / "model.pt")
    shutil.copy(out / "model.onnx", files / "model.onnx")
    doc = documentation(pre, recipe, net.head.out_channels, cfg.name)
    (files / "documentation.md").write_text(doc)

    in_id, (y, x) = v0_5.TensorId("image"), (v0_5.AxisId("y"), v0_5.AxisId("x"))
    # the smallest input keeps something between the output halos
    size = v0_5.ParameterizedSize(min=min_side(net), step=net.multiple)
    channels = [v0_5.Identifier(f"channel{i}") for i in range(pre["in_channels"])]
    inputs = v0_5.InputTensorDescr(
        id=in_id,
        axes=[
            v0_5.BatchAxis(),
            v0_5.ChannelAxis(channel_names=channels),
            v0_5.SpaceInputAxis(id=y, size=size),
            v0_5.SpaceInputAxis(id=x, size=size),
        ],
        test_tensor=v0_5.FileDescr(source=files / "test_input.npy"),
        sample_tensor=v0_5.FileDescr(source=files / "sample_input.tif"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing_steps(pre["normalize"]),
    )
    out_names = [v0_5.Identifier(c) for c in TARGET_NAMES[: net.head.out_channels]]
    outputs = v0_5.OutputTensorDescr(
        id=v0_5.TensorId("probabilities"),
        axes=[
            v0_5.BatchAxis(),
            v0_5.ChannelAxis(channel_names=out_names),
            *(
                v0_5.SpaceOutputAxisWithHalo(
                    id=a, halo=halo(net), size=v0_5.SizeReference(tensor_id=in_id, axis_id=a)
                )
                for a in (y, x)
            ),
        ],
        test_tensor=v0_5.FileDescr(source=files / "test_output.npy"),
        sample_tensor=v0_5.FileDescr(source=files / "sample_output.tif"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[v0_5.SigmoidDescr()],
    )
    version = v0_5.Version(torch.__version__.split("+")[0])
    state_dict = v0_5.PytorchStateDictWeightsDescr(
        source=files / "weights.pt",
        architecture=v0_5.ArchitectureFromFileDescr(
            source=files / "unet.py",
            callable=v0_5.Identifier("UNet"),
            # init: the weights replace it; Keras's truncated normal took 4 s per construction
            kwargs={**(model.hparams.net or {}), "init": "torch"},
        ),
        pytorch_version=version,
    )
    descr = v0_5.ModelDescr(
        name=cfg.name,
        description=cfg.description,
        authors=[v0_5.Author(**a) for a in OmegaConf.to_container(cfg.authors, resolve=True)],
        cite=[v0_5.CiteEntry(text=c["text"], doi=v0_5.Doi(c["doi"])) for c in CITATIONS],
        license=v0_5.LicenseId(cfg.license),
        tags=TAGS,
        documentation=v0_5.FileDescr(source=files / "documentation.md"),
        covers=[v0_5.FileDescr(source=files / "cover.png")],
        inputs=[inputs],
        outputs=[outputs],
        weights=v0_5.WeightsDescr(
            pytorch_state_dict=state_dict,
            torchscript=v0_5.TorchscriptWeightsDescr(
                source=files / "model.pt", parent="pytorch_state_dict", pytorch_version=version
            ),
            onnx=v0_5.OnnxWeightsDescr(
                source=files / "model.onnx", parent="pytorch_state_dict", opset_version=ONNX_OPSET
            ),
        ),
        config=v0_5.Config(cellseg={"preprocess": pre, "training": recipe}),
        timestamp=v0_5.Datetime(datetime.now(timezone.utc)),
    )
    slug = re.sub(r"[^a-z0-9]+", "-", cfg.name.lower()).strip("-")
    return save_bioimageio_package(descr, output_path=out / f"{slug}.bioimageio.zip")


def export(cfg: DictConfig) -> dict[str, Path]:
    """Write model.pt, model.onnx and the bioimage.io package; returns their paths."""
    loaded = checkpoint.load(checkpoint.named(cfg))
    log.info(loaded.first_line())
    model, ckpt = loaded.module, loaded.path
    pre = loaded.preprocessing(cfg.get("preprocess"))
    meta = {"preprocess": pre, "postprocess": loaded.postprocess}
    crop = centre_crop(read_image(cfg.image), model.net, cfg.test_side)
    out = Path(cfg.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "torchscript": write_torchscript(model.net, out / "model.pt", meta),
        "onnx": write_onnx(model.net, out / "model.onnx", meta),
    }
    recipe = training_recipe(model, ckpt, cfg.get("metrics"))
    with tempfile.TemporaryDirectory(prefix="cellseg-package-") as files:
        paths["bioimageio"] = build_package(model, pre, crop, out, cfg, recipe, Path(files))
    log.info("exported %s", ", ".join(str(p) for p in paths.values()))
    return paths


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    run(main, {"model": "model_name"})
