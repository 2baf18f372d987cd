"""The network as a callable for whole-image prediction: PyTorch, TorchScript or ONNX Runtime.

Each backend maps a float32 (N, C, H, W) tensor to (N, K, H, W) logits, so
``inference.predict_tensor`` (padding, tiles, blending, test-time augmentation) runs unchanged
whichever one makes the call.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

BACKENDS = ("pytorch", "pytorch-bf16", "torchscript", "onnxruntime")
ONNX_OPSET = 17


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


class Network:
    """A network run by another runtime, called like the U-Net (and knowing its geometry)."""

    def __init__(self, run: Callable[[Tensor], Tensor], net: nn.Module, backend: str) -> None:
        self.run, self.backend = run, backend
        self.multiple, self.in_channels = net.multiple, net.in_channels

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(x)


def network(
    model: nn.Module, backend: str = "pytorch", device: str | torch.device = "cpu"
) -> Callable[[Tensor], Tensor]:
    """The callable that runs ``model``'s network with ``backend``."""
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
    raise ValueError(f"backend={backend!r}; use one of {', '.join(BACKENDS)}")
