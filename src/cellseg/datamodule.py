"""LightningDataModule: read a dataset once, split it reproducibly, serve augmented batches.

The split reproduces ``sklearn.model_selection.train_test_split(ids, test_size=0.2,
random_state=0)`` over the sorted ids (40 train / 10 test for 50 images). As in the study the
test images also serve as validation set unless ``val_size`` > 0 splits one off the training ids.
Images are decoded, converted to ``in_channels`` and normalised once in ``setup`` and kept in
memory, so epochs cost only augmentation and compute; with ``cache=False`` (datasets larger than
memory) each item is read and prepared from disk when it is loaded. Two geometries:

- ``resize``: every image and target resized to ``img_size`` (the study: 64x64);
- ``crop``: native resolution; training on random ``crop_size`` crops (smaller images
  reflect-padded), validation and test on whole images one at a time, padded to a multiple of
  16 and scored on the original pixels only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cellseg import synthetic
from cellseg.datasets import (
    Sample,
    Source,
    iter_samples,
    list_sources,
    prepare_image,
    resize,
    targets_from_labels,
)


def split_ids(ids: list[str], test_size: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split like ``train_test_split(ids, test_size=test_size, random_state=seed)``."""
    n = len(ids)
    n_test = math.ceil(test_size * n) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"a test fraction of {test_size} leaves no train or test image of {n}")
    order = np.random.RandomState(seed).permutation(n)
    return [ids[i] for i in order[n_test:]], [ids[i] for i in order[:n_test]]


class Streamed(Sequence):
    """Samples read from disk and prepared on every access (``data.cache=false``), for
    datasets larger than memory: ``prepare(source.read())`` per item."""

    def __init__(self, sources: list[Source], prepare: Callable[[Sample], Any]) -> None:
        self.sources, self.prepare = sources, prepare

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.prepare(self.sources[index].read())


class NucleiDataset(Dataset):
    """Prepared ((H, W, C) image, (H, W, K) target) pairs -> tensors, optionally augmented.

    ``pairs`` is a list held in memory or a ``Streamed`` sequence that reads each from disk;
    ``repeats`` visits each image several times per epoch (several random crops);
    ``pad_multiple`` reflect-pads whole images for the network and reports their true size.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        transform=None,
        repeats: int = 1,
        pad_multiple: int | None = None,
    ) -> None:
        self.pairs, self.transform = pairs, transform
        self.repeats, self.pad_multiple = repeats, pad_multiple

    def __len__(self) -> int:
        return len(self.pairs) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.pairs[index % len(self.pairs)]
        if self.transform is not None:
            out = self.transform(image=image, mask=target)
            image, target = out["image"], out["mask"]
        size = image.shape[:2]
        if self.pad_multiple:
            image, target = pad_to_multiple(image, target, self.pad_multiple)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1))),
            "size": torch.tensor(size),
            "index": index % len(self.pairs),
        }


def pad_to_multiple(image: np.ndarray, target: np.ndarray, multiple: int):
    """Reflect-pad the image (zero-pad the target) at the bottom and right to a multiple."""
    h, w = image.shape[:2]
    pad = ((0, -h % multiple), (0, -w % multiple), (0, 0))
    return np.pad(image, pad, mode="reflect"), np.pad(target, pad)


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
        crop_size: int = 256,
        crops_per_image: int = 1,
        in_channels: int = 3,
        target_channels: int = 1,
        normalize: str = "percentile",
        invert_bright: bool = False,
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
        cache: bool = True,
        channel: int | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("resize", "crop"):
            raise ValueError(f"data.mode={mode!r}; use resize (the study) or crop (native)")
        size_name, size = ("img_size", img_size) if mode == "resize" else ("crop_size", crop_size)
        if size % 16:
            raise ValueError(f"data.{size_name}={size} must be a multiple of 16 (the U-Net's)")
        self.root = Path(root)
        self.layout, self.mode = layout, mode
        self.img_size, self.crop_size, self.crops_per_image = img_size, crop_size, crops_per_image
        self.in_channels, self.target_channels = in_channels, target_channels
        self.normalize, self.invert_bright = normalize, invert_bright
        self.test_size, self.val_size, self.split_seed = test_size, val_size, split_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = pin_memory
        self.augmentation, self.seed = augmentation, seed
        self.synthetic = synthetic or {}
        self.cache = cache
        self.channel = channel  # the nuclei channel of multi-channel files (index or name)
        self.splits: dict[str, list[str]] = {}
        self.datasets: dict[str, NucleiDataset] = {}

    def prepare_data(self) -> None:
        if self.layout == "synthetic":
            synthetic.generate(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        sources = {s.id: s for s in list_sources(self.root, self.layout, self.channel)}
        train, test = split_ids(sorted(sources), self.test_size, self.split_seed)
        val = test
        if self.val_size:
            train, val = split_ids(train, self.val_size, self.split_seed)
        self.splits = {"train": train, "val": val, "test": test}
        if self.cache:  # decoded and prepared once; epochs cost only augmentation and compute
            needed = [sources[i] for i in sorted({*train, *val, *test})]
            samples = iter_samples(needed, f"Reading {self.root.name}")
            prepared = {s.id: self.prepare(s) for s in samples}
            pairs = {name: [prepared[i] for i in ids] for name, ids in self.splits.items()}
        else:
            pairs = {
                name: Streamed([sources[i] for i in ids], self.prepare)
                for name, ids in self.splits.items()
            }
        for name, split_pairs in pairs.items():
            self.datasets[name] = self.make_dataset(name, split_pairs)

    def make_dataset(self, split: str, pairs: Sequence) -> NucleiDataset:
        if self.mode == "resize":
            transform = self.augmentation if split == "train" else None
            if transform is not None:
                transform.set_random_seed(self.seed)
            return NucleiDataset(pairs, transform)
        if split != "train":
            return NucleiDataset(pairs, pad_multiple=16)
        crop = [
            A.PadIfNeeded(self.crop_size, self.crop_size, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(self.crop_size, self.crop_size),
        ]
        extra = [self.augmentation] if self.augmentation is not None else []
        transform = A.Compose(crop + extra, seed=self.seed)
        return NucleiDataset(pairs, transform, repeats=self.crops_per_image)

    def prepare(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Model input (H, W, C) and float32 {0, 1} targets (H, W, K) at training geometry."""
        image = prepare_image(sample.image, self.in_channels, self.normalize, self.invert_bright)
        if self.mode == "crop":
            return image, targets_from_labels(sample.labels, self.target_channels)
        # area-averaged foreground thresholded at 0.5: the fairest binary mask at low resolution;
        # contours come from the nearest-resized labels so they stay one pixel wide
        foreground = resize((sample.labels > 0).astype(np.float32), self.img_size) > 0.5
        small_labels = resize(sample.labels, self.img_size, "nearest")
        targets = targets_from_labels(small_labels, self.target_channels)
        targets[..., 0] = foreground
        targets[..., 1:] *= foreground[..., None]
        return resize(image, self.img_size), targets

    def device_batch_size(self) -> int:
        """``batch_size`` is the global batch (the study's 16 however many processes train);
        each of the trainer's ``world_size`` processes loads its share."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} (the global batch) does not split over "
                f"{world} processes; choose a multiple of {world}"
            )
        return self.batch_size // world

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """Under DDP each process gets its share of the ids: for training Lightning adds a
        shuffling DistributedSampler; validation and test use one that repeats no image (the
        default pads with repeats), so the scores equal the single-process ones."""
        whole_images = self.mode == "crop" and split != "train"
        dataset = self.datasets[split]
        sampler = None
        if split != "train" and self.trainer is not None and self.trainer.world_size > 1:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            if len(dataset) < world:
                raise ValueError(
                    f"the {split} split has {len(dataset)} images for {world} processes; "
                    "use fewer devices or a larger split (data.test_size, data.val_size)"
                )
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=1 if whole_images else self.device_batch_size(),
            shuffle=shuffle,
            sampler=sampler,
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
