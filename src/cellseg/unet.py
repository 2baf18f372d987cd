"""The study's U-Net as a plain ``nn.Module`` (no Lightning inside).

Encoder: per level two 3x3 ReLU convolutions then 2x2 max-pooling (16, 32, 64, 128 channels);
bottleneck: two 3x3 convolutions at 256 channels; decoder: a 3x3 stride-2 transposed
convolution (ReLU), concatenation with the matching encoder output, two 3x3 convolutions;
head: a 3x3 transposed convolution to ``out_channels`` logits. With the defaults it has
2,158,833 parameters for RGB input, exactly as the Keras original.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def conv_block(in_ch: int, out_ch: int, batch_norm: bool = False) -> nn.Sequential:
    """Two 3x3 'same' convolutions, each followed by (optional batch norm and) ReLU."""
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net mapping (N, in_channels, H, W) images to (N, out_channels, H, W) logits."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        bottleneck: int = 256,
        batch_norm: bool = False,
        init: str = "torch",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.multiple = 2 ** len(channels)
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for c in channels:
            self.encoders.append(conv_block(c_prev, c, batch_norm))
            c_prev = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_block(c_prev, bottleneck, batch_norm)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        c_prev = bottleneck
        for c in reversed(channels):
            # 'same' stride-2 transposed convolution as in Keras: output exactly twice the input.
            self.ups.append(
                nn.Sequential(
                    nn.ConvTranspose2d(c_prev, c, 3, stride=2, padding=1, output_padding=1),
                    nn.ReLU(inplace=True),
                )
            )
            self.decoders.append(conv_block(2 * c, c, batch_norm))
            c_prev = c
        self.head = nn.ConvTranspose2d(c_prev, out_channels, 3, padding=1)
        initialize(self, init)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the network cannot take."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}; "
                "set model.net.in_channels to the images' channel count"
            )
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(
                f"UNet input sides must be multiples of {self.multiple}, got {h}x{w}; "
                f"choose data.img_size / data.crop_size as a multiple of {self.multiple} "
                "(whole-image prediction pads automatically)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def fold_batch_norm(net: UNet) -> UNet:
    """``net`` (in eval mode) with each batch norm folded into the convolution before it, in
    place: the running statistics and affine become the convolution's weights and bias, the
    batch norm an identity. The same function to float rounding, one pass over each
    activation less (docs/performance.md#batch-norm-folded-for-prediction); for prediction
    only, as training would update statistics that no longer exist."""
    if net.training:
        raise ValueError("fold_batch_norm folds the running statistics: call net.eval() first")
    for block in [*net.encoders, net.bottleneck, *net.decoders]:
        for i in range(len(block) - 1):
            conv, norm = block[i], block[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                block[i] = fuse_conv_bn_eval(conv, norm)
                block[i + 1] = nn.Identity()
    return net


def initialize(model: nn.Module, scheme: str) -> None:
    """Initialise convolution weights: ``torch`` (PyTorch's default), or Keras's
    ``glorot_uniform`` (its default) / ``he_normal``, both with zero biases."""
    if scheme == "torch":
        return
    if scheme not in ("glorot_uniform", "he_normal"):
        raise ValueError(f"unknown init {scheme!r}; use torch, glorot_uniform or he_normal")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if scheme == "he_normal":
                # Keras he_normal: truncated normal, std sqrt(2 / fan_in); weight[0] spans Keras's
                # fan_in for both layer types (in x k x k, transposed: out x k x k)
                fan_in = m.weight[0].numel()
                std = (2.0 / fan_in) ** 0.5 / 0.87962566103423978  # Keras: truncation-corrected
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
