"""Network widths for the shipped model: parameters, fp32 file size, training seconds per
1,000 crops of 128 px (batch 16, the recipe's loss and targets) and whole-image prediction
megapixels/s, on this machine (docs/model.md).

    python scripts/width_table.py [BASE ...]        (BASE: the first level's channels; 16 16 ...)
"""

from __future__ import annotations

import sys
import time

import torch

from cellseg.module import SegmentationModule, segmentation_loss
from cellseg.unet import count_parameters


def network(base: int) -> SegmentationModule:
    net = {"in_channels": 3, "out_channels": 3, "channels": [base * 2**i for i in range(4)],
           "bottleneck": base * 16, "batch_norm": True}
    return SegmentationModule(net=net, loss="dice_bce")


def train_seconds(model: SegmentationModule, steps: int = 6) -> float:
    """Seconds a training step of 16 crops takes (the median of ``steps``, after a warm-up)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(16, 3, 128, 128), (torch.rand(16, 3, 128, 128) > 0.5).float()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = segmentation_loss("dice_bce", model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def predict_mps(model: SegmentationModule) -> float:
    """Megapixels/s of the network on a 1024x1024 image (inference mode)."""
    model.eval()
    x = torch.rand(1, 3, 1024, 1024)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(2):
            model(x)
    return 2 * 1024 * 1024 / 1e6 / (time.perf_counter() - start)


def main(bases: list[int]) -> None:
    print("| width (channels) | parameters | fp32 MB | training s / 1,000 crops | predict MP/s |")
    print("|---|---|---|---|---|")
    for base in bases:
        model = network(base)
        n = count_parameters(model)
        step = train_seconds(model.train())
        mps = predict_mps(model)
        print(f"| {base}-{base * 16} | {n:,} | {4 * n / 2**20:.1f} | {step * 1000 / 16:.0f} | "
              f"{mps:.2f} |", flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [16, 24, 32])
