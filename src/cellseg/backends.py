"""The network as a callable for whole-image prediction: PyTorch, TorchScript or ONNX Runtime.

Each backend maps a float32 (N, C, H, W) tensor to (N, K, H, W) logits, so
``inference.predict_tensor`` (padding, tiles, blending, test-time augmentation) runs unchanged
whichever one makes the call. ``onnxruntime-int8`` quantizes the network to int8 (static,
per-channel weights), calibrated on crops of the checkpoint's training images: its outputs
differ from the others' (measured in ``cellseg.bench``).
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cellseg.errors import UserError

BACKENDS = ("pytorch", "pytorch-bf16", "torchscript", "onnxruntime", "onnxruntime-int8")
ONNX_OPSET = 17
CALIBRATION_CROPS, CALIBRATION_SIDE = 16, 128

log = logging.getLogger(__name__)


def plain_network(model: nn.Module) -> nn.Module:
    """A copy of the trained U-Net, fp32, standard memory layout, eval mode (what is exported)."""
    net = copy.deepcopy(getattr(model, "net", model))
    return net.float().to(memory_format=torch.contiguous_format).eval()


def example_input(net: nn.Module) -> Tensor:
    """A small input of the network's channels and size multiple, for tracing and export."""
    side = 4 * net.multiple
    return torch.rand(1, net.in_channels, side, side)


def torchscript(net: nn.Module) -> torch.jit.ScriptModule:
    """The network traced to TorchScript: any batch, any multiple of ``net.multiple`` in size."""
    with warnings.catch_warnings():  # the input checks' Python branches are traced as constants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        return torch.jit.trace(plain_network(net), example_input(net))


def onnx_bytes(net: nn.Module) -> bytes:
    """The network as an ONNX model (opset 17) with dynamic batch, height and width."""
    net = plain_network(net)
    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        # dynamo=False: the dynamo exporter took 22 s against 2 s for this network (torch 2.14)
        torch.onnx.export(
            net,
            (example_input(net),),
            buffer,
            input_names=["image"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamic_axes={"image": axes, "logits": axes},
            dynamo=False,
        )
    return buffer.getvalue()


def onnx_session(model: bytes | str, device: str | torch.device = "cpu") -> Callable:
    """An ONNX Runtime session as a function: (N, C, H, W) tensor -> logits tensor."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(model, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        array = x.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(session.run(None, {name: array})[0])

    return run


def int8_onnx(model: bytes, crops: list[np.ndarray]) -> bytes:
    """The ONNX model quantized to int8 (QDQ, per-channel weights, uint8 activations), its
    activation ranges calibrated (min/max) on ``crops``, float32 (1, C, H, W) arrays."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Crops(CalibrationDataReader):
        def __init__(self) -> None:
            self.crops = iter(crops)

        def get_next(self) -> dict | None:
            crop = next(self.crops, None)
            return None if crop is None else {"image": crop}

    with tempfile.TemporaryDirectory() as tmp:
        plain, ready, quantized = (Path(tmp) / f"{n}.onnx" for n in ("plain", "ready", "int8"))
        plain.write_bytes(model)
        quant_pre_process(str(plain), str(ready), skip_symbolic_shape=True)
        quantize_static(str(ready), str(quantized), Crops(), quant_format=QuantFormat.QDQ,
                        per_channel=True)
        return quantized.read_bytes()


def calibration_crops(model: nn.Module, root: str | Path | None = None) -> list[np.ndarray]:
    """Random (seeded) crops of the checkpoint's training images, prepared as for prediction:
    ``CALIBRATION_CROPS`` of ``CALIBRATION_SIDE`` px or, from smaller images, the largest
    multiple of the network's size multiple they hold."""
    from cellseg.checkpoint import checkpoint_data, preprocessing
    from cellseg.datasets import list_sources, prepare_image

    data = checkpoint_data(model)
    hp, pre = data["hparams"], preprocessing(model)
    root = Path(root or hp.get("root") or "")
    if not hp or not root.is_dir():
        raise UserError(
            f"backend=onnxruntime-int8 calibrates on the checkpoint's training images and "
            f"{'the checkpoint names none' if not hp else f'{root} is not there'}; "
            "use backend=onnxruntime (or data_root=<its dataset>)"
        )
    train = set(data["splits"].get("train", []))
    sources = [s for s in list_sources(root, hp["layout"], pre["channel"]) if s.id in train]
    rng = np.random.default_rng(0)
    crops = []
    for source in (sources[i] for i in rng.permutation(len(sources))):
        x = prepare_image(
            source.read().image, pre["in_channels"], pre["normalize"], pre["invert_bright"]
        )
        (h, w), multiple = x.shape[:2], model.net.multiple
        side = min(CALIBRATION_SIDE, h, w) // multiple * multiple
        if side:
            y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = x[y0 : y0 + side, x0 : x0 + side].transpose(2, 0, 1)
            crops.append(np.ascontiguousarray(crop[None], dtype=np.float32))
        if len(crops) == CALIBRATION_CROPS:
            break
    if not crops:
        raise UserError(f"{root} holds none of the checkpoint's training images to calibrate "
                         "backend=onnxruntime-int8 on; use backend=onnxruntime")
    return crops


class Network:
    """A network run by another runtime, called like the U-Net (and knowing its geometry)."""

    def __init__(self, run: Callable[[Tensor], Tensor], net: nn.Module, backend: str) -> None:
        self.run, self.backend = run, backend
        self.multiple, self.in_channels = net.multiple, net.in_channels

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(x)


def network(
    model: nn.Module,
    backend: str = "pytorch",
    device: str | torch.device = "cpu",
    data_root: str | Path | None = None,
) -> Callable[[Tensor], Tensor]:
    """The callable that runs ``model``'s network with ``backend``; ``data_root``: where the
    checkpoint's dataset is now, if it moved (int8 calibrates on its training images)."""
    if backend == "pytorch":
        return model
    if backend == "pytorch-bf16":  # bf16 autocast: fast only with AVX512-BF16/AMX or a GPU

        def bf16(x: Tensor) -> Tensor:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                return model(x)

        return Network(bf16, model.net, backend)
    if backend == "torchscript":
        return Network(torchscript(model.net).to(device), model.net, backend)
    if backend == "onnxruntime":
        return Network(onnx_session(onnx_bytes(model.net), device), model.net, backend)
    if backend == "onnxruntime-int8":
        crops = calibration_crops(model, data_root)
        log.info("int8 network calibrated on %d crops of the checkpoint's training images",
                 len(crops))
        quantized = int8_onnx(onnx_bytes(model.net), crops)
        return Network(onnx_session(quantized, device), model.net, backend)
    raise UserError(f"backend={backend!r}; use one of {', '.join(BACKENDS)}")
