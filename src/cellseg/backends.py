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

BACKENDS = ("pytorch", "torchscript", "onnxruntime")
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


class OnnxNetwork:
    """An ONNX Runtime session called like the network: (N, C, H, W) tensor -> logits tensor."""

    def __init__(self, model: bytes | str, device: str | torch.device = "cpu") -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(model, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def network(
    model: nn.Module, backend: str = "pytorch", device: str | torch.device = "cpu"
) -> Callable[[Tensor], Tensor]:
    """The callable that runs ``model``'s network with ``backend``."""
    if backend == "pytorch":
        return model
    if backend == "torchscript":
        return torchscript(model.net).to(device)
    if backend == "onnxruntime":
        return OnnxNetwork(onnx_bytes(model.net), device)
    raise ValueError(f"backend={backend!r}; use one of {', '.join(BACKENDS)}")
