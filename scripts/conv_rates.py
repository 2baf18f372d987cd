"""Where bf16 training falls short of the matrix units: each convolution of the U-Net timed alone,
forward and backward, at the recipes' training size, in fp32 and bf16, next to the machine's
matrix-multiply rate (docs/performance.md, "bf16 training and the matrix units").

    python scripts/conv_rates.py [SIZE] [BATCH] [WIDTH]   (defaults 128 16 16: the native recipes)

Each convolution is found in the network itself (a forward hook records its input's shape), so
the table follows the network's geometry. "all" is the convolutions' FLOPs over their summed
time: the rate the network's convolutions reach one after the other, without the rest of a step
(batch norm, activations, pooling, the optimizer), whose share of a whole bf16 training step
(``torch.profiler``, self time by kind of operator) the last line gives.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from cellseg.bench import matmul_gflops, timed
from cellseg.unet import UNet

PRECISIONS = ("32-true", "bf16-mixed")


def conv_inputs(net: nn.Module, size: int, batch: int) -> list[tuple[str, nn.Module, tuple]]:
    """(name, layer, input shape) of every convolution, from one forward pass."""
    found, hooks = [], []
    for name, layer in net.named_modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            hooks.append(layer.register_forward_hook(
                lambda m, args, out, name=name: found.append((name, m, tuple(args[0].shape)))))
    with torch.no_grad():
        net(torch.rand(batch, net.in_channels, size, size))
    for hook in hooks:
        hook.remove()
    return found


def step_of(layer: nn.Module, shape: tuple, precision: str):
    """One forward and backward pass of ``layer`` alone (channels-last, as training runs)."""
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.rand(shape).to(memory_format=torch.channels_last).requires_grad_()

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            return layer(x)

    grad = torch.rand_like(forward())  # the output's gradient, as the layer above would send

    def step():
        forward().backward(grad)

    return step


def flops(layer: nn.Module, shape: tuple) -> int:
    """FLOPs of one forward and backward pass (``torch.utils.flop_counter``, as the bench)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_of(layer, shape, "32-true")()
    return counter.get_total_flops()


def seconds(layer: nn.Module, shape: tuple, precision: str) -> float:
    (median,) = timed([step_of(layer, shape, precision)], warmup=3, repeats=15)
    return median


def step_shares(net: nn.Module, size: int, batch: int, steps: int = 10) -> dict[str, float]:
    """Shares of a whole bf16 training step's time (forward, Dice+BCE-like loss, backward, fused
    Adam; channels-last, batch norm) by kind of operator, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    net = net.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    x = torch.rand(batch, net.in_channels, size, size).to(memory_format=torch.channels_last)
    target = (torch.rand(batch, 3, size, size) > 0.5).float()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        kind = ("convolutions" if "conv" in name else "batch norm" if "batch_norm" in name
                else "bf16 casts and copies" if name in ("aten::copy_", "aten::_to_copy")
                else "optimizer" if "adam" in name.lower() else "other")
        shares[kind] = shares.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def main(size: int = 128, batch: int = 16, width: int = 16) -> None:
    net = UNet(3, 3, channels=[width * 2**k for k in range(4)], bottleneck=width * 16)
    layers = conv_inputs(net.eval(), size, batch)
    print(f"U-Net {width}-{width * 16} channels, batch {batch} of {size} px, "
          f"{torch.get_num_threads()} threads")
    rates = {p: matmul_gflops(p, 2048, 3, 10) for p in PRECISIONS}
    print("matmul 2048²: " + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items()))
    print("| layer | channels | side | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / matmul |")
    print("|---|---|---|---|---|---|")
    total = {p: 0.0 for p in PRECISIONS}
    work = 0.0
    for name, layer, shape in layers:
        f = flops(layer, shape)
        s = {p: seconds(layer, shape, p) for p in PRECISIONS}
        work += f
        for p in PRECISIONS:
            total[p] += s[p]
        bf16 = f / s["bf16-mixed"] / 1e9
        print(f"| {name} | {shape[1]}→{layer.out_channels} | {shape[-1]} | "
              f"{f / s['32-true'] / 1e9:.0f} | {bf16:.0f} | {bf16 / rates['bf16-mixed']:.2f} |",
              flush=True)
    bf16 = work / total["bf16-mixed"] / 1e9
    print(f"| all | | | {work / total['32-true'] / 1e9:.0f} | {bf16:.0f} | "
          f"{bf16 / rates['bf16-mixed']:.2f} |")
    net = UNet(3, 3, channels=[width * 2**k for k in range(4)], bottleneck=width * 16,
               batch_norm=True)
    print("a whole bf16 training step, self time by kind: " + ", ".join(
        f"{kind} {share:.0%}" for kind, share in step_shares(net, size, batch).items()))


if __name__ == "__main__":
    if len(sys.argv) > 4:
        raise SystemExit(__doc__)
    main(*map(int, sys.argv[1:]))
