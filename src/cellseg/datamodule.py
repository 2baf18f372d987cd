"""LightningDataModule: read a dataset once, split it reproducibly, serve augmented batches.

The split reproduces ``sklearn.model_selection.train_test_split(ids, test_size=0.2,
random_state=0)`` over the sorted ids (40 train / 10 test for 50 images). As in the study the
test images also serve as validation set unless ``val_size`` > 0 splits one off the training ids.
Images are decoded, converted to ``in_channels`` and normalised once in ``setup`` and kept in
memory, so epochs cost only augmentation and compute; with ``cache=False`` (datasets larger than
memory) each item is read and prepared from disk when it is loaded. Two geometries:

- ``resize``: every image and target resized to ``img_size`` (the study: 64x64);
- ``crop``: native resolution; training on random ``crop_size`` crops (smaller images
  reflect-padded), validation and test on whole images one at a time, padded to the network's
  size multiple and scored on the original pixels only.

The checkpoint describes its data (Lightning's own mechanism): the :class:`DataOptions` are saved
as ``datamodule_hyper_parameters`` and ``state_dict()`` holds the split ids and the training
nuclei's median diameter; :mod:`cellseg.checkpoint` reads both.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
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
    all_sources,
    image_kind,
    iter_samples,
    make_splits,
    prepare_image,
    resize,
)
from cellseg.errors import UserError
from cellseg.targets import (
    centre_offsets,
    check_target_channels,
    equivalent_diameters,
    redraw_contours,
    targets_from_labels,
    touching_weights,
)

log = logging.getLogger(__name__)


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
    ``repeats`` visits each image several times per epoch (several random crops): one count
    for all, or one per image (:func:`crop_counts`);
    ``pad_multiple`` reflect-pads whole images for the network and reports their true size;
    ``labels_channel``: the target's last channel holds the instance labels, which are dropped;
    after a transform the contour channel is first redrawn from them (a zoomed or rotated
    contour would otherwise be resampled: broken lines when zoomed out, doubled when zoomed in);
    ``offsets`` appends the centre offsets drawn from them (:func:`~cellseg.targets.
    centre_offsets`; drawn after the transform, which would turn them the wrong way and, two
    channels more, cost 4x the time);
    ``touching_weight`` > 0 adds the transformed item's loss ``weight`` map from them
    (:func:`~cellseg.targets.touching_weights`).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        transform=None,
        repeats: int | Sequence[int] = 1,
        pad_multiple: int | None = None,
        labels_channel: bool = False,
        touching_weight: float = 0.0,
        offsets: bool = False,
    ) -> None:
        if offsets and not labels_channel:
            raise ValueError("centre offsets are drawn from the labels: pass labels_channel=True")
        self.pairs, self.transform, self.pad_multiple = pairs, transform, pad_multiple
        self.offsets = offsets
        n = len(pairs)
        if isinstance(repeats, int):  # image i at i, i + n, i + 2n, ...
            self.order = np.tile(np.arange(n), repeats)
        else:
            self.order = np.repeat(np.arange(n), repeats)
        self.labels_channel, self.touching_weight = labels_channel, touching_weight

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.pairs[self.order[index]]
        if self.transform is not None:
            out = self.transform(image=image, mask=target)
            image, target = out["image"], out["mask"]
        item = {}
        if self.labels_channel:
            labels, target = target[..., -1].astype(np.int32), target[..., :-1]
            if self.transform:  # untransformed targets keep the contours drawn in prepare()
                target = redraw_contours(target, labels)
                if self.touching_weight:
                    weights = touching_weights(labels, self.touching_weight)
                    item["weight"] = torch.from_numpy(weights)
            if self.offsets:
                target = np.concatenate([target, centre_offsets(labels)], axis=-1)
        size = image.shape[:2]
        if self.pad_multiple:
            image, target = pad_to_multiple(image, target, self.pad_multiple)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1))),
            "size": torch.tensor(size),
            **item,
        }


def pad_to_multiple(image: np.ndarray, target: np.ndarray, multiple: int):
    """Reflect-pad the image (zero-pad the target) at the bottom and right to a multiple."""
    h, w = image.shape[:2]
    pad = ((0, -h % multiple), (0, -w % multiple), (0, 0))
    return np.pad(image, pad, mode="reflect"), np.pad(target, pad)


def crop_counts(
    sizes: Sequence[float],
    crops_per_image: int,
    power: float = 1.0,
    kinds: Sequence[str] | None = None,
) -> list[int]:
    """Each image's crops per epoch when the epoch's ``crops_per_image * len(sizes)`` crops are
    shared out in proportion to the images' sizes (their areas, or the nuclei they hold) to the
    ``power``, at least one per image.

    By area with ``power=1``: every pixel about as likely to be seen, so every annotated nucleus
    weighs about the same where nuclei are about as dense; ``0``: as many per image (every image,
    and so every kind of image, weighs the same); ``0.5`` between the two (a 1024x1024 field gets
    4x a 256x256 one's crops). By the nuclei an image holds: every nucleus weighs the same
    however crowded, so dense fields, where touching nuclei must be split, get more crops.
    With ``kinds`` (one per image, e.g. colour / grey) each kind first gets the share of the
    crops its number of images earns, then shares it out among its images as above: a rare kind
    of small images is not drowned out by a few large fields of another.
    """
    if kinds is not None:
        counts = [0] * len(sizes)
        for kind in set(kinds):
            members = [i for i, k in enumerate(kinds) if k == kind]
            shares = crop_counts([sizes[i] for i in members], crops_per_image, power)
            for i, n in zip(members, shares, strict=True):
                counts[i] = n
        return counts
    weights = [float(a) ** power for a in sizes]
    total, weight_sum = crops_per_image * len(sizes), sum(weights)
    if weight_sum == 0:  # by nuclei, and none annotated: as many per image
        return [crops_per_image] * len(sizes)
    return [max(1, round(total * w / weight_sum)) for w in weights]


def augmentation(steps: dict[str, A.BasicTransform | None]) -> A.Compose:
    """The training pipeline of ``configs/augmentation``: its named steps in order, those set to
    null left out (the configs extend each other by name; Hydra merges dicts, not lists)."""
    return A.Compose([step for step in steps.values() if step is not None])


class PhotonNoise(A.ImageOnlyTransform):
    """Shot noise of a dim exposure (``augmentation=nuclei_optics``): the normalised image, 1 at
    its brightest nuclei, taken as the mean of a Poisson count of ``photons`` at 1, drawn
    log-uniformly from ``photons_range`` (10: a dim live-cell exposure; 1,000: hardly any noise).
    albumentations' ``GaussNoise`` adds noise of one level everywhere, and its ``ShotNoise``
    assumes a photograph's gamma of 2.2; a microscope's counts are linear and their noise grows
    with the signal. A grey crop gets one count a pixel and stays grey, unless an earlier step
    has tinted it: the recipes' ``GaussNoise`` draws its noise per channel."""

    def __init__(self, photons_range: Sequence[float] = (10.0, 1000.0), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.photons_range = (float(photons_range[0]), float(photons_range[1]))

    def get_params(self) -> dict[str, float]:
        low, high = np.log(self.photons_range)
        return {"photons": float(np.exp(self.py_random.uniform(low, high)))}

    def apply(self, img: np.ndarray, photons: float, **params: Any) -> np.ndarray:
        grey = img.ndim == 3 and all(np.array_equal(img[..., 0], img[..., c])
                                     for c in range(1, img.shape[-1]))
        signal = img[..., :1] if grey else img  # a grey image stays grey: one count a pixel
        counts = self.random_generator.poisson(np.clip(signal, 0.0, 1.0) * photons)
        noisy = np.minimum(counts.astype(np.float32) / np.float32(photons), 1.0)
        return np.repeat(noisy, img.shape[-1], axis=-1) if grey else noisy

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("photons_range",)


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


@dataclass(frozen=True)
class DataOptions:
    """The data options (``configs/data``, set as ``data.<name>=``), checked once, here. Saved in
    every checkpoint as its ``datamodule_hyper_parameters``: primitives only (weights_only)."""

    root: str
    layout: str = "dsb2018"  # dsb2018 (Kaggle) | folder | synthetic
    mode: str = "resize"  # resize (the study) | crop (native resolution)
    img_size: int = 64  # resize: the side every image is resized to
    crop_size: int = 256  # crop: the side of the training crops
    crops_per_image: int = 1  # crop: crops an epoch per training image (on average, by area)
    crops_by_area: bool = False  # share the epoch's crops out by image area
    area_power: float = 1.0  # ... to this power of the area (or of the nuclei count)
    crops_by_nuclei: bool = False  # ... by the number of nuclei an image holds, not its area
    crops_by_kind: bool = False  # ... colour and grey images first by their numbers
    in_channels: int = 3
    target_channels: int = 1  # = model.net.out_channels
    normalize: str = "percentile"  # percentile | scale | minmax
    invert_bright: bool = False  # brightfield (light background) images inverted
    test_size: float = 0.2
    val_size: float = 0.0
    split_seed: int = 0
    batch_size: int = 16  # the global batch, shared out over DDP processes
    num_workers: int = 0
    persistent_workers: bool = False
    pin_memory: bool = False
    seed: int = 0  # the augmentation streams
    synthetic: dict = field(default_factory=dict)  # layout=synthetic: cellseg.synthetic's options
    cache: bool = True  # decode and prepare every image once (false: from disk on every load)
    channel: int | str | None = None  # the nuclei channel of multi-channel files (index or name)
    touching_weight: float = 0.0  # crop: loss weight added where two nuclei touch
    train_roots: list = field(default_factory=list)  # more folders, training side only

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", str(self.root))
        object.__setattr__(self, "synthetic", dict(self.synthetic or {}))
        object.__setattr__(self, "train_roots", [str(r) for r in self.train_roots or []])
        if self.mode not in ("resize", "crop"):
            raise UserError(f"data.mode={self.mode!r}; use resize (the study) or crop (native)")
        needs = [  # (set, what it needs, the option that gives it)
            (self.crops_by_area and self.mode != "crop",
             "data.crops_by_area=true shares out training crops by image area", "data.mode=crop"),
            (self.area_power != 1.0 and not self.crops_by_area,
             f"data.area_power={self.area_power} shares out crops by area to that power",
             "data.crops_by_area=true"),
            (self.crops_by_nuclei and not self.crops_by_area,
             "data.crops_by_nuclei=true shares out crops by the nuclei each image holds instead "
             "of its area", "data.crops_by_area=true"),
            (self.crops_by_kind and not self.crops_by_area,
             "data.crops_by_kind=true gives colour and grey images crops by their numbers, then "
             "by area within each", "data.crops_by_area=true"),
            (bool(self.touching_weight) and (self.mode != "crop" or self.target_channels < 2),
             f"data.touching_weight={self.touching_weight} weighs the contour, distance and "
             "offset channels where nuclei touch in training crops",
             "data.mode=crop and model.net.out_channels=2 or more"),
        ]
        for unmet, what, fix in needs:
            if unmet:
                raise UserError(f"{what}; it needs {fix}")
        check_target_channels(self.target_channels)
        if self.target_channels == 5 and self.mode != "crop":
            raise UserError(
                "model.net.out_channels=5 predicts centre offsets, drawn from each training "
                "crop's nuclei; it needs data.mode=crop (experiment=native)"
            )

    @classmethod
    def of(cls, options: dict[str, Any]) -> DataOptions:
        """The options from keyword arguments; an unknown name is refused in one line."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"data.{unknown[0]} is no data option; the options are "
                            f"{', '.join(f.name for f in fields(cls))} (docs/configuration.md)")
        return cls(**options)


class NucleiDataModule(L.LightningDataModule):
    """Train / val / test loaders over one nucleus dataset: reading, splitting and loading.
    Its options (``data.*``) are a :class:`DataOptions`; the targets come from
    :mod:`cellseg.targets`."""

    def __init__(
        self, root: str | Path, *, augmentation: A.BaseCompose | None = None, **options: Any
    ) -> None:
        super().__init__()
        self.options = DataOptions.of({"root": root, **options})
        # the checkpoint's description of its data
        self.save_hyperparameters(asdict(self.options), logger=False)
        self.augmentation = augmentation
        self.train_areas: list[int] = []  # pixels of each training image, in split order
        self.train_kinds: list[str] = []  # colour (stained) or grey, in split order
        self.splits: dict[str, list[str]] = {}
        self.diameter: float | None = None
        self.multiple: int | None = None  # the network's size multiple, see set_multiple
        self.datasets: dict[str, NucleiDataset] = {}

    @property
    def root(self) -> Path:
        """The dataset's folder (``data.root``)."""
        return Path(self.options.root)

    def set_multiple(self, multiple: int) -> None:
        """Take the network's size multiple: ``img_size`` / ``crop_size`` must be one, and
        whole validation/test images are padded to it. ``setup`` takes it from the trainer's
        model; call this to check the geometry before a trainer exists."""
        resize_mode = self.options.mode == "resize"
        opt = self.options
        name, size = ("img_size", opt.img_size) if resize_mode else ("crop_size", opt.crop_size)
        if size % multiple:
            fit = max(multiple, size // multiple * multiple)
            raise UserError(
                f"data.{name}={size} is not a multiple of {multiple}, the network's size multiple "
                f"(2^levels of model.net.channels); choose e.g. data.{name}={fit}"
            )
        self.multiple = multiple

    def state_dict(self) -> dict[str, Any]:
        """The split ids and the training nuclei's median diameter, saved in checkpoints."""
        return {"splits": self.splits, "diameter": self.diameter}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (resuming a run keeps its split)."""
        if self.splits and state_dict.get("splits") and state_dict["splits"] != self.splits:
            log.warning(
                "the checkpoint's split differs from this data config's (data.test_size, "
                "data.val_size, data.split_seed or the images changed); the new split is used"
            )
            return
        self.splits = state_dict.get("splits") or self.splits
        self.diameter = state_dict.get("diameter", self.diameter)

    def prepare_data(self) -> None:
        if self.options.layout == "synthetic":
            synthetic.generate(self.root, **self.options.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and hasattr(getattr(module, "net", None), "multiple"):
            self.set_multiple(module.net.multiple)
        sources = self.sources()
        extra = [i for i in sources if "/" in i]  # the train_roots' images: prefixed ids
        own = sorted(set(sources) - set(extra))
        opt = self.options
        self.splits = make_splits(own, opt.test_size, opt.val_size, opt.split_seed, extra)
        train, val, test = (self.splits[k] for k in ("train", "val", "test"))
        self.log_split()
        diameters, areas, nuclei, kinds, train_ids = [], {}, {}, {}, set(train)

        def measure(sample: Sample) -> None:  # once, at the geometry the network sees
            diameters.append(equivalent_diameters(self.training_labels(sample.labels)))
            areas[sample.id] = sample.labels.size
            nuclei[sample.id] = len(diameters[-1])
            kinds[sample.id] = image_kind(sample.image)

        def prepare(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
            if sample.id in train_ids:
                measure(sample)
            return self.prepare(sample)

        if opt.cache:  # decoded and prepared once; epochs cost only augmentation and compute
            needed = [sources[i] for i in sorted({*train, *val, *test})]
            folders = [self.root.name, *(Path(r).name for r in opt.train_roots)]
            samples = iter_samples(needed, f"Reading {' and '.join(folders)}")
            prepared = {s.id: prepare(s) for s in samples}
            pairs = {name: [prepared[i] for i in ids] for name, ids in self.splits.items()}
        else:
            for sample in iter_samples([sources[i] for i in train], "Measuring nuclei"):
                measure(sample)
            pairs = {
                name: Streamed([sources[i] for i in ids], self.prepare)
                for name, ids in self.splits.items()
            }
        all_diameters = np.concatenate(diameters) if diameters else np.zeros(0)
        self.diameter = float(np.median(all_diameters)) if all_diameters.size else None
        said = self.trainer is None or self.trainer.is_global_zero
        if self.diameter and opt.mode == "crop" and said:  # resized images: no nucleus size
            log.info("Training nuclei: %d, median %.1f px across (the checkpoint records it: "
                     "diameter=auto scales images to nuclei of that size)", all_diameters.size,
                     self.diameter)
        self.train_areas = [areas[i] for i in train]
        self.train_nuclei = [nuclei[i] for i in train]
        self.train_kinds = [kinds[i] for i in train]
        for name, split_pairs in pairs.items():
            self.datasets[name] = self.make_dataset(name, split_pairs)

    def sources(self) -> dict[str, Source]:
        """Every sample of ``root`` and the ``train_roots`` by id, found but not decoded."""
        opt = self.options
        return all_sources(self.root, opt.layout, opt.channel, opt.train_roots)

    def log_split(self) -> None:
        """Say which images validate (and so choose the 'best' checkpoint)."""
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        s = self.splits
        n = len({i for ids in s.values() for i in ids})
        where = ", ".join(map(str, [self.root, *self.options.train_roots]))
        sizes = f"{n} images in {where} ({len(s['train'])} train, {len(s['test'])} test)"
        if not s["val"] and not s["test"]:
            log.info("Data: %s; every image trains (data.test_size=0, data.val_size=0): the "
                     "last weights are the model", sizes)
        elif s["val"] == s["test"]:
            log.info(
                "Data: %s; validation = the test split (data.val_size=0, as the study): "
                "choose checkpoints with test_ckpt=last, or set data.val_size", sizes
            )
        else:
            log.info(
                "Data: %s; validation: %d images held out from training (data.val_size=%s)",
                sizes, len(s["val"]), self.options.val_size,
            )

    def make_dataset(self, split: str, pairs: Sequence) -> NucleiDataset:
        opt = self.options
        if opt.mode == "resize":
            transform = self.augmentation if split == "train" else None
            if transform is not None:
                transform.set_random_seed(self.options.seed)
            return NucleiDataset(pairs, transform)
        if split != "train":
            return NucleiDataset(
                pairs, pad_multiple=self.multiple, labels_channel=True, offsets=self.offsets
            )
        crop = [
            A.PadIfNeeded(opt.crop_size, opt.crop_size, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(opt.crop_size, opt.crop_size),
        ]
        extra = [self.augmentation] if self.augmentation is not None else []
        transform = A.Compose(crop + extra, seed=self.options.seed)
        repeats = self.options.crops_per_image
        if self.options.crops_by_area:
            kinds = self.train_kinds if self.options.crops_by_kind else None
            by = "the nuclei they hold" if opt.crops_by_nuclei else "image area"
            sizes = self.train_nuclei if opt.crops_by_nuclei else self.train_areas
            repeats = crop_counts(sizes, opt.crops_per_image, opt.area_power, kinds)
            if self.trainer is None or self.trainer.is_global_zero:
                log.info("Training crops shared out by %s (to the power %g): %d an epoch, "
                         "%d to %d per image", by, self.options.area_power, sum(repeats),
                         min(repeats), max(repeats))
                if kinds:
                    colour = sum(n for n, k in zip(repeats, kinds, strict=True) if k == "colour")
                    log.info("... by kind first: %d of them to the %d colour (stained) images, "
                             "%d to the %d grey ones", colour, kinds.count("colour"),
                             sum(repeats) - colour, kinds.count("grey"))
        return NucleiDataset(
            pairs, transform, repeats=repeats, labels_channel=True,
            touching_weight=self.options.touching_weight, offsets=self.offsets,
        )

    @property
    def offsets(self) -> bool:
        """Whether the targets end with the centre offsets, drawn after the transform."""
        return self.options.target_channels == 5

    def training_labels(self, labels: np.ndarray) -> np.ndarray:
        """Instance labels at the geometry the network sees: native, or resized to img_size."""
        opt = self.options
        return labels if opt.mode == "crop" else resize(labels, opt.img_size, "nearest")

    def prepare(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Model input (H, W, C) and float32 {0, 1} targets (H, W, K) at training geometry;
        in crop mode the instance labels follow as one more channel (see ``NucleiDataset``)."""
        self.check_size(sample)
        opt = self.options
        image = prepare_image(sample.image, opt.in_channels, opt.normalize, opt.invert_bright)
        if self.options.mode == "crop":  # the labels ride along (last channel, see NucleiDataset)
            # the centre offsets are drawn from them after the transform
            targets = targets_from_labels(sample.labels, min(self.options.target_channels, 3))
            labels = sample.labels[..., None].astype(np.float32)  # exact up to 2**24 nuclei
            return image, np.concatenate([targets, labels], axis=-1)
        # area-averaged foreground thresholded at 0.5: the fairest binary mask at low resolution;
        # contours come from the nearest-resized labels so they stay one pixel wide
        foreground = resize((sample.labels > 0).astype(np.float32), self.options.img_size) > 0.5
        small_labels = self.training_labels(sample.labels)
        targets = targets_from_labels(small_labels, self.options.target_channels)
        targets[..., 0] = foreground
        targets[..., 1:] *= foreground[..., None]
        return resize(image, self.options.img_size), targets

    def check_size(self, sample: Sample) -> None:
        """Refuse images smaller than the network's size multiple (nothing to learn there)."""
        minimum = self.multiple or 1
        if min(sample.labels.shape) < minimum:
            h, w = sample.labels.shape
            raise UserError(
                f"image {sample.id} in {self.root} is {h}x{w} pixels, below the network's size "
                f"multiple {minimum}; remove it from the dataset"
            )

    def device_batch_size(self) -> int:
        """``batch_size`` is the global batch (the study's 16 however many processes train);
        each of the trainer's ``world_size`` processes loads its share."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.options.batch_size % world:
            raise UserError(
                f"data.batch_size={self.options.batch_size} (the global batch) does not split over "
                f"{world} processes; choose a multiple of {world}"
            )
        return self.options.batch_size // world

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """Under DDP each process gets its share of the ids: for training Lightning adds a
        shuffling DistributedSampler; validation and test use one that repeats no image (the
        default pads with repeats), so the scores equal the single-process ones."""
        whole_images = self.options.mode == "crop" and split != "train"
        dataset = self.datasets[split]
        sampler = None
        if split != "train" and self.trainer is not None and self.trainer.world_size > 1:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            if len(dataset) < world:
                raise UserError(
                    f"the {split} split has {len(dataset)} images for {world} processes; "
                    "use fewer devices or a larger split (data.test_size, data.val_size)"
                )
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=1 if whole_images else self.device_batch_size(),
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.options.num_workers,
            persistent_workers=self.options.persistent_workers and self.options.num_workers > 0,
            pin_memory=self.options.pin_memory,
            worker_init_fn=seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
