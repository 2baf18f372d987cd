"""LightningDataModule: read a dataset once, split it reproducibly, serve augmented batches.

The split reproduces ``sklearn.model_selection.train_test_split(ids, test_size=0.2,
random_state=0)`` over the sorted ids (40 train / 10 test for 50 images). As in the study the
test images also serve as validation set unless ``val_size`` > 0 splits one off the training ids.
Images are decoded, converted to ``in_channels``, normalised and (in ``resize`` mode) resized
once in ``setup``; the cached arrays are small, so epochs cost only augmentation and compute.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cellseg import synthetic
from cellseg.datasets import Sample, normalize, read_samples, to_channels


def split_ids(ids: list[str], test_size: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split like ``train_test_split(ids, test_size=test_size, random_state=seed)``."""
    n = len(ids)
    n_test = math.ceil(test_size * n) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"a test fraction of {test_size} leaves no train or test image of {n}")
    order = np.random.RandomState(seed).permutation(n)
    return [ids[i] for i in order[n_test:]], [ids[i] for i in order[:n_test]]


def resize(array: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize an (H, W[, C]) array to size x size (area averaging, or nearest for labels)."""
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    out = cv2.resize(array, (size, size), interpolation=interpolation)
    return out[..., None] if array.ndim == 3 and out.ndim == 2 else out


class NucleiDataset(Dataset):
    """Normalised float32 (H, W, C) images and {0, 1} masks -> tensors, with augmentation."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], transform=None):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.images[index], self.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None].float(),
            "index": index,
        }


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own numpy, random and albumentations streams.

    albumentations 2 keeps its generator inside ``Compose``; every worker receives a copy of
    the same state, so without this all workers would draw the same augmentations.
    """
    info = get_worker_info()
    seed = info.seed % 2**32  # differs per worker and per epoch, reproducible under a seed
    np.random.seed(seed)
    random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(seed)


class NucleiDataModule(L.LightningDataModule):
    """Train / val / test loaders over one nucleus dataset."""

    def __init__(
        self,
        root: str,
        layout: str = "dsb2018",
        mode: str = "resize",
        img_size: int = 64,
        in_channels: int = 3,
        normalize: str = "percentile",
        test_size: float = 0.2,
        val_size: float = 0.0,
        split_seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        augmentation: A.BaseCompose | None = None,
        seed: int = 0,
        synthetic: dict | None = None,
    ) -> None:
        super().__init__()
        if mode != "resize":
            raise ValueError(f"data.mode={mode!r} is not supported yet; use resize")
        if img_size % 16:
            raise ValueError(f"data.img_size={img_size} must be a multiple of 16 (the U-Net's)")
        self.root = Path(root)
        self.layout, self.mode, self.img_size = layout, mode, img_size
        self.in_channels, self.normalize = in_channels, normalize
        self.test_size, self.val_size, self.split_seed = test_size, val_size, split_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = pin_memory
        self.augmentation, self.seed = augmentation, seed
        self.synthetic = synthetic or {}
        self.samples: dict[str, Sample] = {}
        self.splits: dict[str, list[str]] = {}
        self.datasets: dict[str, NucleiDataset] = {}

    def prepare_data(self) -> None:
        if self.layout == "synthetic":
            synthetic.generate(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.samples = {s.id: s for s in read_samples(self.root, self.layout)}
        train, test = split_ids(sorted(self.samples), self.test_size, self.split_seed)
        val = test
        if self.val_size:
            train, val = split_ids(train, self.val_size, self.split_seed)
        self.splits = {"train": train, "val": val, "test": test}
        if self.augmentation is not None:
            self.augmentation.set_random_seed(self.seed)
        for name, ids in self.splits.items():
            images, masks = zip(*(self.prepare(self.samples[i]) for i in ids), strict=True)
            transform = self.augmentation if name == "train" else None
            self.datasets[name] = NucleiDataset(list(images), list(masks), transform)

    def prepare(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 (H, W, C) image and float32 {0, 1} mask at training geometry."""
        image = normalize(to_channels(sample.image, self.in_channels), self.normalize)
        mask = (sample.labels > 0).astype(np.float32)
        # area-averaged mask thresholded at 0.5: the fairest binary mask at low resolution
        image = resize(image, self.img_size)
        mask = (resize(mask, self.img_size) > 0.5).astype(np.float32)
        return image, mask

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
