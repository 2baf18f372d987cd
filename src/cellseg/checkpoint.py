"""The one reader of a model: a shipped model's name, a ``.ckpt``, or a file ``cellseg.export``
wrote (TorchScript ``model.pt``, ONNX ``model.onnx``, a ``*.bioimageio.zip``).

Every consumer (predict, eval, export, fine-tuning, the napari widget) calls :func:`load` and
gets a :class:`Model`: the network as a callable, its input preparation, the post-processing
tuned after training and what its file says about its training data and provenance.

Formats: cellseg's own keys carry a version in ``checkpoint["cellseg"]["format"]``
(:data:`cellseg.module.CHECKPOINT_FORMAT`). Readable, each tested: format 2 (2026-12: the
``cellseg`` key with commit and command); format 1 (no ``cellseg`` key: the datamodule's
description, split ids and diameter, from 2026-11); and the first checkpoints, without a data
description, through their ``preprocess`` hyperparameter or ``preprocess=`` given by the user
(eval then needs ``data=``). Exported files carry ``{"preprocess", "postprocess"}``; those
written before 2026-12 the preprocess dict alone.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg.errors import UserError
from cellseg.models import DEFAULT_MODEL, MODELS, shipped_path
from cellseg.unet import UNet, fold_batch_norm

log = logging.getLogger(__name__)
PREPROCESS_KEYS = ("mode", "img_size", "in_channels", "normalize", "invert_bright")
DATAMODULE = "NucleiDataModule"  # the datamodule's state key (its class's qualname)
EXPORTED = {".pt": "torchscript", ".onnx": "onnx", ".zip": "bioimageio"}


def resolve(name: str | Path | None) -> tuple[Path, str]:
    """The file a model name stands for and its kind (checkpoint, torchscript, onnx,
    bioimageio): a shipped model's name (``nuclei``), or a path; None: the default model."""
    name = DEFAULT_MODEL if name in (None, "") else str(name)
    if name in MODELS:
        return shipped_path(name), "checkpoint"
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(
            f"model={name}: no such file and no shipped model of that name; name a .ckpt, a "
            f"file cellseg.export wrote (model.pt, model.onnx, *.bioimageio.zip) or one of "
            f"{', '.join(MODELS)}"
        )
    if path.suffix in (".ckpt", ".pth"):  # a run's checkpoint, or a shipped model's file
        return path, "checkpoint"
    if path.suffix in EXPORTED:
        return path, EXPORTED[path.suffix]
    raise UserError(
        f"model={path}: cellseg reads .ckpt (.pth), model.pt (TorchScript), model.onnx and "
        "*.bioimageio.zip files; pass one of those"
    )


def read(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict (``torch.load(weights_only=True)``); one line for any other file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass <run>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors (KeyError: 101 ...) say nothing useful
        raise UserError(
            f"ckpt_path={path} is not a cellseg checkpoint (torch.load cannot read it); pass a "
            ".ckpt written by python -m cellseg.train, e.g. <run>/checkpoints/last.ckpt"
        ) from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(
        checkpoint
    ):
        raise UserError(
            f"{path} is a torch file but not a cellseg checkpoint (no state_dict and "
            "hyper_parameters); pass a .ckpt written by python -m cellseg.train"
        )
    return checkpoint


def weights_in_half(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with its float32 weights stored as float16 (half the file: a shipped
    model's wider network fits its 10 MB so). Loading casts them back into the network's
    float32 parameters; batch norm's running statistics stay float32, as a small variance
    would lose its digits in float16."""
    def half(key: str, value: Any) -> Any:
        running = key.endswith(("running_mean", "running_var"))
        return value.half() if value.dtype == torch.float32 and not running else value

    weights = {k: half(k, v) for k, v in checkpoint["state_dict"].items()}
    return {**checkpoint, "state_dict": weights}


def describe_data(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The data description in a checkpoint: the datamodule's hyperparameters, split ids and
    median training nucleus diameter (empty for checkpoints that predate them)."""
    state = checkpoint.get(DATAMODULE) or {}
    return {
        "hparams": dict(checkpoint.get("datamodule_hyper_parameters") or {}),
        "splits": dict(state.get("splits") or {}),
        "diameter": state.get("diameter"),
    }


def describe(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a person asks of a checkpoint: format, provenance, data, tuned options, scores."""
    own = dict(checkpoint.get("cellseg") or {"format": 1})
    data = describe_data(checkpoint)
    return {
        **own,
        "net": dict((checkpoint.get("hyper_parameters") or {}).get("net") or {}),
        "epoch": checkpoint.get("epoch"),
        "data": data["hparams"],
        "diameter": data["diameter"],
        "images": {k: len(v) for k, v in data["splits"].items()},
        "postprocess": checkpoint.get("postprocess") or {},
    }


def preprocessing(
    model: nn.Module, override: dict | None = None, data: dict | None = None
) -> dict[str, Any]:
    """The dict :func:`cellseg.inference.segment` consumes, from a SegmentationModule's
    checkpoint; ``override``'s keys win (logged).

    Keys: ``mode``, ``img_size``, ``in_channels``, ``normalize``, ``invert_bright`` (the
    datamodule's hyperparameters), ``channel`` (the input channel chosen, None for all),
    ``multiple`` (the network's size multiple, ``UNet.multiple``) and ``diameter`` (the training
    split's median equivalent nucleus diameter in pixels at the geometry the network saw them:
    native px in crop mode, resized px in resize mode; None for old checkpoints). Checkpoints
    older than the data description fall back to the model's ``preprocess`` hyperparameter.
    ``data`` is a :func:`checkpoint_data` dict for a model that was not loaded from its file.
    """
    data = data or checkpoint_data(model)
    hp = data["hparams"]
    if hp:
        pre = {k: hp[k] for k in PREPROCESS_KEYS}
        pre["channel"] = hp.get("channel")
    else:
        pre = dict(model.hparams.get("preprocess") or {})
        if pre:
            log.info("the checkpoint predates cellseg's data description: using its preprocess")
    pre.setdefault("channel", None)
    pre.update(multiple=model.net.multiple, diameter=data["diameter"])
    if override:
        log.info("preprocess overridden: %s", dict(override))
        pre.update(override)
    missing = [k for k in PREPROCESS_KEYS if k not in pre]
    if missing:
        raise UserError(
            f"the checkpoint records no {', '.join(missing)}; pass them, e.g. 'preprocess={{mode: "
            "resize, img_size: 64, in_channels: 3, normalize: percentile, invert_bright: false}'"
        )
    return pre


def tuned_instances(checkpoint: str | Path | Mapping | nn.Module) -> dict[str, Any]:
    """The instance options tuned after training that a checkpoint (a model loaded from it, the
    file, or its dict) holds; ``{}`` when it holds none (tuning refused, or written before
    cellseg tuned)."""
    if isinstance(checkpoint, nn.Module):  # TrainedNet, SegmentationModule
        checkpoint = {"postprocess": getattr(checkpoint, "postprocess", {})}
    elif not isinstance(checkpoint, Mapping):
        checkpoint = read(checkpoint)
    return dict((checkpoint.get("postprocess") or {}).get("instances") or {})


def options_text(options: Mapping) -> str:
    """``threshold=0.4 min_size=20 ...``: instance options as a person reads them."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in options.items())


def instance_options(
    instances_cfg: Mapping, checkpoint: str | Path | Mapping | nn.Module
) -> dict[str, Any]:
    """The options eval and predict pass to ``segment``: the checkpoint's tuned values, each
    replaced by the user's where ``instances_cfg`` sets one (not null); both are logged."""
    tuned = tuned_instances(checkpoint)
    given = {k: v for k, v in dict(instances_cfg).items() if v is not None}
    if tuned:
        log.info("Post-processing tuned after training: %s", options_text(tuned))
    else:
        log.info("The checkpoint holds no tuned post-processing: instances' defaults are used")
    for k in sorted(tuned.keys() & given.keys()):
        if given[k] != tuned[k]:
            log.info("instances.%s=%s overrides the tuned %s", k, given[k], tuned[k])
    return {**tuned, **given}


def checkpoint_data(source: nn.Module | str | Path) -> dict[str, Any]:
    """What a checkpoint says about its training data: ``{"hparams": the datamodule's
    arguments (root, layout, mode, img_size, normalize, test_size, ...), "splits": {"train",
    "val", "test": ids}, "diameter": median training nucleus diameter in px or None}``, of a
    model from :func:`load_model` or a checkpoint path."""
    if isinstance(source, nn.Module):
        return getattr(source, "data_description", None) or describe_data({})
    return describe_data(read(source))


def load_model(name: str | Path | None, device: str | torch.device = "cpu") -> nn.Module:
    """The trained SegmentationModule a checkpoint or shipped model's name stands for."""
    return load(name, device).module


class TrainedNet(nn.Module):
    """A checkpoint's network ready to predict, without Lightning (whose import costs a predict
    270 MB and seconds): the UNet with its weights (batch norm folded into the convolutions,
    :func:`~cellseg.unet.fold_batch_norm`), the memory format it trained in, and what
    the checkpoint says beside them (``hparams``, ``data_description``, ``postprocess``) under
    the names a SegmentationModule loaded from the same file has."""

    def __init__(self, checkpoint: dict[str, Any]) -> None:
        super().__init__()
        self.hparams = dict(checkpoint["hyper_parameters"])
        self.net = UNet(**(self.hparams.get("net") or {}))
        weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()
                   if k.startswith("net.")}
        self.net.load_state_dict(weights)
        fold_batch_norm(self.net.eval())
        channels_last = self.hparams.get("channels_last", True)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.data_description = describe_data(checkpoint)
        self.postprocess = checkpoint.get("postprocess") or {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))


@dataclass
class Model:
    """A model ready to use: ``net`` maps (N, C, H, W) float32 to (N, K, H, W) logits."""

    name: str  # as the user named it (or the default's name)
    path: Path
    kind: str  # checkpoint | torchscript | onnx | bioimageio
    net: Any  # a TrainedNet (checkpoints) or a backends.Network
    data: dict[str, Any]  # describe_data(): hparams, splits, diameter
    postprocess: dict[str, Any]  # the checkpoint's "postprocess": tuned options and scores
    info: dict[str, Any] = field(default_factory=dict)  # describe()
    preprocess_saved: dict[str, Any] = field(default_factory=dict)  # exported files' own
    device: str | torch.device = "cpu"
    _module: nn.Module | None = field(default=None, repr=False)

    @property
    def module(self) -> nn.Module:
        """The trained SegmentationModule (checkpoints only: export and fine-tuning need it),
        built from the file on first use: prediction runs :class:`TrainedNet` alone."""
        if self.kind != "checkpoint":
            raise UserError(
                f"model={self.name} is an exported {self.kind} file; this needs the checkpoint "
                "it was exported from (.ckpt) or a shipped model's name"
            )
        if self._module is None:
            self._module = segmentation_module(read(self.path), self.device)
        return self._module

    def preprocessing(self, override: dict | None = None) -> dict[str, Any]:
        """See :func:`preprocessing`."""
        if self.preprocess_saved:
            pre = {**self.preprocess_saved}
            if override:
                log.info("preprocess overridden: %s", dict(override))
                pre.update(override)
            return pre
        return preprocessing(self.net, override, self.data)

    def network(self, backend: str = "pytorch", device: str = "cpu", data_root=None):
        """The callable that runs the network: ``backend`` for checkpoints; an exported file
        runs with its own runtime (``backend`` must be left at pytorch)."""
        from cellseg.backends import network

        if self.kind == "checkpoint":
            return network(self.net, backend, device, data_root)
        if backend != "pytorch":
            raise UserError(
                f"backend={backend}: model={self.name} is an exported {self.kind} file and runs "
                "with its own runtime; leave backend unset"
            )
        return self.net

    def first_line(self) -> str:
        """Which model runs, for the first line of a run's log."""
        return model_line(self.name, self.kind, self.path)


def model_line(name: str, kind: str, path: Path, hint: str = "") -> str:
    """``model: NAME (the shipped model), KIND PATH``, the path left out where the name is it;
    ``hint`` follows "the shipped model" (predict: how to name another)."""
    shipped = f" (the shipped model{hint})" if name in MODELS else ""
    same = Path(str(name)).expanduser().resolve() == Path(path).resolve()
    return f"model: {name}{shipped}, {kind}" + ("" if same else f" {path}")


def named(cfg: Any) -> str | None:
    """The model a predict / eval / export config names: ``model=`` (``model_name`` in the
    config, since ``model`` is training's config group) or the older ``ckpt_path=``."""
    name, old = cfg.get("model_name"), cfg.get("ckpt_path")
    if name and old:
        raise UserError(f"model={name} and ckpt_path={old} both name a model; pass model= alone")
    return name or old


def load(name: str | Path | None = None, device: str | torch.device = "cpu") -> Model:
    """The model ``name`` stands for (see :func:`resolve`) on ``device``, in eval mode."""
    path, kind = resolve(name)
    label = DEFAULT_MODEL if name in (None, "") else str(name)
    if kind == "checkpoint":
        return load_checkpoint(path, label, device)
    return load_exported(path, label, kind, device)


def load_checkpoint(path: Path, name: str, device: str | torch.device = "cpu") -> Model:
    """A ``.ckpt`` (or a shipped model) as a :class:`Model` around its :class:`TrainedNet`."""
    checkpoint = read(path)
    net = TrainedNet(checkpoint).to(device).eval()
    if not net.data_description["hparams"]:
        log.warning("%s predates cellseg's data description: pass preprocess= (see "
                    "docs/troubleshooting.md)", path)
    return Model(name, path, "checkpoint", net, net.data_description, net.postprocess,
                 describe(checkpoint), device=device)


def segmentation_module(checkpoint: dict[str, Any], device: str | torch.device = "cpu"):
    """The SegmentationModule (Lightning) a checkpoint's dict holds, in eval mode."""
    from cellseg.module import SegmentationModule

    module = SegmentationModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module.to(device).eval()


def load_exported(path: Path, name: str, kind: str, device: str | torch.device) -> Model:
    """A TorchScript, ONNX or bioimage.io file that cellseg.export wrote, with the input
    preparation and tuned post-processing it carries."""
    from cellseg.backends import Network, onnx_session

    try:
        script, saved = _read_exported(path, kind, device)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file breaks the runtimes
        raise UserError(f"model={path}: cannot read it as a {kind} file that cellseg.export "
                        f"wrote ({type(err).__name__}: {err}); export it again") from err
    if not saved:
        raise UserError(f"model={path}: the file carries no cellseg preparation; export it "
                        "again with python -m cellseg.export")
    pre = saved.get("preprocess", saved)  # files before 2026-12 held the preprocess dict alone
    postprocess = saved.get("postprocess") or {}
    geometry = _Geometry(pre["multiple"], pre["in_channels"])
    if script is not None:
        net = Network(lambda x: script(x.to(device)), geometry, kind)
    else:
        session = onnx_session(path.read_bytes(), device)
        net = Network(session, geometry, kind)
    data = {"hparams": {}, "splits": {}, "diameter": pre.get("diameter")}
    return Model(name, path, kind, net, data, postprocess, {"format": "exported"}, pre)


def _read_exported(path: Path, kind: str, device) -> tuple[Any, dict]:
    """The TorchScript module (None for ONNX) and the ``cellseg`` metadata of an exported file."""
    extra = {"cellseg": ""}
    if kind == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return None, json.loads(props.get("cellseg", "{}"))
    if kind == "bioimageio":
        with zipfile.ZipFile(path) as archive:
            if "model.pt" not in archive.namelist():
                raise UserError(f"model={path}: a zip without model.pt; pass a "
                                "*.bioimageio.zip that cellseg.export wrote")
            source = io.BytesIO(archive.read("model.pt"))
    else:
        source = str(path)
    script = torch.jit.load(source, map_location=device, _extra_files=extra)
    return script, json.loads(extra["cellseg"] or "{}")


@dataclass
class _Geometry:
    """What backends.Network reads of a network: its size multiple and input channels."""

    multiple: int
    in_channels: int
