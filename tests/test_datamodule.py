"""Split, batches and per-worker augmentation streams."""

import logging
import shutil

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cellseg.datamodule import NucleiDataModule, NucleiDataset, seed_worker
from cellseg.datasets import split_ids
from helpers import REAL_DATA, needs_real_data


def test_split_reproduces_sklearn_and_is_40_10():
    from sklearn.model_selection import train_test_split

    ids = [f"id{i:02d}" for i in range(50)]
    train, test = split_ids(ids, 0.2, 0)
    assert (train, test) == tuple(train_test_split(ids, test_size=0.2, random_state=0))
    assert len(train) == 40
    assert len(test) == 10
    assert not set(train) & set(test)


@needs_real_data
def test_sample50s_ids_are_the_real_data_measured_on_and_split_40_10():
    from cellseg.datasets import SAMPLE50_IDS, sample50_split

    listed = SAMPLE50_IDS.read_text().split()
    assert listed == sorted(p.name for p in REAL_DATA.iterdir() if p.is_dir())
    assert len(listed) == 50
    split = sample50_split()
    assert split["test"] == split_ids(listed, 0.2, 0)[1]
    assert "c75139ef0546d2240b37afb3219eb74a06b7977818697d5c3138796472483af3" in split["test"]


def test_sample50_is_read_from_a_larger_folder_and_missing_images_are_named(tmp_path):
    """A script scores sample50's 10 test images even from the whole stage1_train (670 ids):
    the split comes from its id list, never from the folder."""
    from cellseg.datasets import read_sample50, sample50_split
    from cellseg.errors import UserError
    from cellseg.synthetic import write_sample

    split = sample50_split()
    rng = np.random.default_rng(0)
    for i in [*split["train"], *split["test"], "an_image_of_the_full_set"]:
        labels = np.zeros((16, 16), np.int32)
        labels[4:9, 4:9] = 1
        write_sample(tmp_path, i, rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), labels)
    samples, got = read_sample50(tmp_path)
    assert got == split
    assert sorted(samples) == sorted(split["train"] + split["test"])
    gone = split["test"][3]
    shutil.rmtree(tmp_path / gone)
    with pytest.raises(UserError, match=f"lacks 1 of sample50's 50 images .e.g. {gone}"):
        read_sample50(tmp_path)


@pytest.fixture(scope="module")
def synthetic_dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    dm = NucleiDataModule(
        str(root), layout="synthetic", synthetic={"n_images": 20, "size": 64}, batch_size=4
    )
    dm.prepare_data()
    dm.setup()
    return dm


def test_study_split_validates_on_the_test_images(synthetic_dm):
    s = synthetic_dm.splits
    assert len(s["train"]) == 16
    assert len(s["test"]) == 4
    assert s["val"] == s["test"]
    assert not set(s["train"]) & set(s["test"])


def test_val_size_splits_validation_off_train(tmp_path):
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 20, "size": 64},
        val_size=0.25,
    )
    dm.prepare_data()
    dm.setup()
    s = dm.splits
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (12, 4, 4)
    assert not set(s["val"]) & (set(s["train"]) | set(s["test"]))


def test_batches_have_training_geometry(synthetic_dm):
    batch = next(iter(synthetic_dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, 64, 64)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}


def test_training_size_must_be_a_multiple_of_the_networks(tmp_path):
    with pytest.raises(ValueError, match=r"data.img_size=60 is not a multiple of 16.*img_size=48"):
        NucleiDataModule(str(tmp_path), img_size=60).set_multiple(16)
    with pytest.raises(ValueError, match=r"data.crop_size=48 is not a multiple of 32"):
        NucleiDataModule(str(tmp_path), mode="crop", crop_size=48).set_multiple(32)
    NucleiDataModule(str(tmp_path), mode="crop", crop_size=40).set_multiple(8)


def test_two_workers_draw_different_augmentations():
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    mask = np.zeros((32, 32, 1), np.float32)
    transform = A.Compose([A.Affine(rotate=(-180, 180), p=1.0)], seed=0)
    dataset = NucleiDataset([(image, mask)] * 4, transform)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    out = [b["image"][0] for b in loader]  # items 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[2], out[3])


def test_augmentation_keeps_masks_binary(tmp_path):
    from hydra.utils import instantiate

    from helpers import compose_cfg

    aug = instantiate(compose_cfg("train", ["augmentation=nuclei"]).augmentation, _convert_="all")
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 10, "size": 64},
        augmentation=aug,
    )
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["image"].shape[-2:] == (64, 64)


def test_crop_mode_trains_on_crops_and_evaluates_whole_padded_images(tmp_path):
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 10, "size": 72},
        mode="crop", crop_size=48, crops_per_image=3, batch_size=4, target_channels=2,
    )
    dm.set_multiple(16)
    dm.prepare_data()
    dm.setup()
    assert len(dm.datasets["train"]) == 8 * 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 48, 48)
    assert batch["mask"].shape == (4, 2, 48, 48)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 3, 80, 80)  # 72 padded to a multiple of 16
    assert val["size"].tolist() == [[72, 72]]
    assert val["mask"][..., 72:, :].sum() == 0  # padding is never foreground


def test_crop_mode_pads_images_smaller_than_the_crop(tmp_path):
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 5, "size": 40},
        mode="crop", crop_size=64, batch_size=2, test_size=0.4,
    )
    dm.prepare_data()
    dm.setup()
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 64, 64)


def test_contour_targets_separate_touching_nuclei():
    from cellseg.targets import targets_from_labels

    labels = np.zeros((10, 12), np.int32)
    labels[2:8, 1:6] = 1
    labels[2:8, 6:11] = 2  # touching at columns 5 | 6
    t = targets_from_labels(labels, 2)
    assert t.shape == (10, 12, 2)
    assert t[4, 5, 1] == 1
    assert t[4, 6, 1] == 1
    assert t[4, 3, 1] == 0
    assert t[4, 3, 0] == 1
    assert (t[..., 1] <= t[..., 0]).all()


def test_invert_bright_turns_brightfield_dark():
    from cellseg.datasets import prepare_image

    bright = np.full((16, 16, 3), 230, np.uint8)
    bright[4:8, 4:8] = 60  # a dark nucleus on a light background
    x = prepare_image(bright, 3, "percentile", invert_bright=True)
    assert x[5, 5].mean() > 0.9
    assert x[0, 0].mean() < 0.1


def test_streaming_serves_the_same_batches_as_the_cache(tmp_path):
    """data.cache=false reads each item from disk when loaded: same splits, same tensors."""
    common = dict(layout="synthetic", synthetic={"n_images": 10, "size": 64}, batch_size=4)
    cached = NucleiDataModule(str(tmp_path / "s"), **common)
    streamed = NucleiDataModule(str(tmp_path / "s"), cache=False, **common)
    for dm in (cached, streamed):
        dm.prepare_data()
        dm.setup("fit")
    assert streamed.splits == cached.splits
    assert not isinstance(streamed.datasets["train"].pairs, list)  # nothing held in memory
    for split in ("train", "test"):
        for a, b in zip(cached.loader(split), streamed.loader(split), strict=True):
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["mask"], b["mask"])


def test_equivalent_diameters_of_label_images():
    from cellseg.targets import equivalent_diameters

    labels = np.zeros((10, 10), np.int32)
    labels[:4, :4] = 1  # 16 px: the disk of 16 px has diameter sqrt(64 / pi)
    labels[6:, 6:] = 3  # label 2 absent: no object of area 0
    np.testing.assert_allclose(equivalent_diameters(labels), [np.sqrt(64 / np.pi)] * 2)
    assert equivalent_diameters(np.zeros((3, 3), np.int32)).size == 0


def test_checkpoint_state_holds_the_split_and_the_resized_nuclei_diameter(synthetic_dm):
    from cellseg.checkpoint import describe_data

    state = synthetic_dm.state_dict()
    assert state["splits"] == synthetic_dm.splits
    assert state["diameter"] > 0
    restored = NucleiDataModule(**synthetic_dm.hparams)
    restored.load_state_dict(state)
    assert restored.splits == synthetic_dm.splits
    assert restored.diameter == state["diameter"]
    assert "augmentation" not in synthetic_dm.hparams  # primitives only
    checkpoint = {"datamodule_hyper_parameters": dict(synthetic_dm.hparams),
                  "NucleiDataModule": state}
    assert describe_data(checkpoint)["splits"] == synthetic_dm.splits
    assert describe_data({}) == {"hparams": {}, "splits": {}, "diameter": None}


def test_an_image_below_the_networks_multiple_is_refused_naming_it(tmp_path):
    from PIL import Image

    for stem, size in (("ok", 32), ("tiny", 1)):
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir(exist_ok=True)
            Image.fromarray(np.zeros((size, size), np.uint8)).save(tmp_path / sub / f"{stem}.png")
    dm = NucleiDataModule(str(tmp_path), layout="folder", test_size=0.5)
    dm.set_multiple(16)
    with pytest.raises(ValueError, match="image tiny in .* is 1x1 pixels, below the network's"):
        dm.setup()


def test_own_data_holds_out_validation_from_training_by_default():
    from helpers import compose_cfg

    assert compose_cfg("train", ["data=folder"]).data.val_size == 0.2
    assert compose_cfg("train", ["data=dsb2018"]).data.val_size == 0.0  # the study


def test_zoomed_crops_have_contours_redrawn_one_pixel_wide(tmp_path):
    """Scale augmentation zooms the instance labels, then draws the contours: zoomed in 2x a
    resampled contour would be two pixels wide, zoomed out 0.5x it would break into dots."""
    import albumentations as A
    from skimage.segmentation import find_boundaries

    for scale in (0.5, 2.0):
        zoom = A.Affine(scale=scale, mask_interpolation=0, p=1.0)
        dm = NucleiDataModule(
            str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 6, "size": 96},
            mode="crop", crop_size=64, batch_size=2, target_channels=3, augmentation=zoom,
        )
        dm.prepare_data()
        dm.setup()
        image, target = dm.datasets["train"].pairs[0]
        assert target.shape[-1] == 4  # foreground, contours, distance + the labels
        out = A.Compose([zoom], seed=0)(image=image, mask=target)["mask"]
        labels = out[..., -1].astype(int)
        resampled = out[..., 1]
        item = dm.datasets["train"]
        item.transform = A.Compose([zoom], seed=0)
        redrawn = item[0]["mask"].numpy()
        assert redrawn.shape == (3, 96, 96)
        expected = find_boundaries(labels, mode="inner") & (labels > 0)
        np.testing.assert_array_equal(redrawn[1], expected)
        assert (redrawn[1] != resampled).sum() > 20  # the resampled contour was wrong
        np.testing.assert_array_equal(redrawn[0], labels > 0)


def test_centre_offsets_are_drawn_from_each_rotated_crops_own_nuclei(tmp_path):
    """model.net.out_channels=5: the offsets are drawn after the transform (a rotated offset
    would point the wrong way), for training crops and whole validation images alike."""
    from cellseg.targets import centre_offsets

    turn = A.Compose([A.RandomRotate90(p=1.0)], seed=0)
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 6, "size": 96},
        mode="crop", crop_size=64, batch_size=2, target_channels=5, augmentation=turn,
    )
    dm.set_multiple(16)
    dm.prepare_data()
    dm.setup()
    image, target = dm.datasets["train"].pairs[0]
    assert target.shape[-1] == 4  # foreground, contours, distance + the labels; no offsets
    item = dm.datasets["train"]
    item.transform = A.Compose([A.RandomRotate90(p=1.0)], seed=0)
    labels = item.transform(image=image, mask=target)["mask"][..., -1].astype(int)
    assert not np.array_equal(labels, target[..., -1])  # turned
    mask = item[0]["mask"].numpy()
    assert mask.shape == (5, 96, 96)
    np.testing.assert_array_equal(np.moveaxis(mask[3:], 0, -1), centre_offsets(labels))
    whole = dm.datasets["val"][0]["mask"]
    assert whole.shape[0] == 5
    assert whole[3:][:, whole[0] == 0].eq(0.5).all()
    with pytest.raises(ValueError, match="out_channels=5 predicts centre offsets.*data.mode=crop"):
        NucleiDataModule(str(tmp_path / "s"), mode="resize", target_channels=5)
    for channels in (4, 6):  # refused when the data module is made, before any training step
        with pytest.raises(ValueError, match=f"out_channels={channels}; use 1 .* or 5"):
            NucleiDataModule(str(tmp_path / "s"), mode="crop", target_channels=channels)


def test_touching_weight_gives_training_crops_a_loss_weight_map(tmp_path):
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 6, "size": 96},
        mode="crop", crop_size=64, batch_size=2, target_channels=2, touching_weight=9.0,
    )
    dm.prepare_data()
    dm.setup()
    train = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    assert all(item["weight"].shape == (64, 64) for item in train)
    assert {float(v) for item in train for v in item["weight"].unique()} == {1.0, 10.0}
    assert "weight" not in dm.datasets["test"][0]  # whole images are scored unweighted
    for wrong in ({"mode": "resize", "target_channels": 2}, {"mode": "crop"}):
        with pytest.raises(ValueError, match="touching_weight=9.0 .* needs data.mode=crop and"):
            NucleiDataModule(str(tmp_path / "s"), touching_weight=9.0, **wrong)


def epoch_crops(root, caplog, **options) -> tuple[NucleiDataModule, list[int]]:
    """A folder datamodule of 32-px crops, 4 an image on average, one image in five for test,
    set up (its log in ``caplog``), and the crops each training image gets an epoch."""
    dm = NucleiDataModule(str(root), layout="folder", mode="crop", crop_size=32,
                          crops_per_image=4, test_size=0.2, **options)
    with caplog.at_level(logging.INFO):
        dm.setup()
    counts = np.bincount(dm.datasets["train"].order, minlength=len(dm.splits["train"]))
    return dm, counts.tolist()


def test_crops_by_area_share_the_epochs_crops_out_by_image_size(tmp_path, caplog):
    """One 128² and three 32² training images, 4 x 4 crops an epoch: by area 16 x 16,384 /
    19,456 = 13.47 and 16 x 1,024 / 19,456 = 0.84 each, rounded; per image (the default) 4 each."""
    from PIL import Image

    from cellseg.datamodule import crop_counts

    assert crop_counts([16384, 1024, 1024, 1024], 4) == [13, 1, 1, 1]
    assert crop_counts([1000, 1], 2) == [4, 1]  # every image keeps at least one crop
    # by the square root of the area: 16 x 128 / 224 = 9.14 and 16 x 32 / 224 = 2.29
    assert crop_counts([16384, 1024, 1024, 1024], 4, power=0.5) == [9, 2, 2, 2]
    assert crop_counts([16384, 1024, 1024, 1024], 4, power=0) == [4, 4, 4, 4]
    assert crop_counts([0, 0, 0], 4) == [4, 4, 4]  # by nuclei with none annotated
    for stem, size in (("e", 128), ("a", 32), ("b", 32), ("c", 32), ("d", 32)):  # c: test
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir(exist_ok=True)
            labels = np.zeros((size, size), np.uint8)
            labels[4:12, 4:12] = 255
            Image.fromarray(labels).save(tmp_path / sub / f"{stem}.png")
    _, per_image = epoch_crops(tmp_path, caplog)
    by_area, counts = epoch_crops(tmp_path, caplog, crops_by_area=True)
    train = by_area.splits["train"]
    assert by_area.train_areas == [128 * 128 if i == "e" else 32 * 32 for i in train]
    assert counts == [13 if i == "e" else 1 for i in train]
    assert per_image == [4] * len(train)
    assert "by image area (to the power 1): 16 an epoch, 1 to 13 per image" in caplog.text
    with pytest.raises(ValueError, match="crops_by_area=true .* needs data.mode=crop"):
        NucleiDataModule(str(tmp_path), crops_by_area=True, mode="resize")
    with pytest.raises(ValueError, match="area_power=0.5 .* needs data.crops_by_area=true"):
        NucleiDataModule(str(tmp_path), area_power=0.5, mode="crop")


def test_crops_by_nuclei_give_crowded_images_more_crops(tmp_path, caplog):
    """Four 32² training images of 1, 1, 1 and 9 nuclei, 4 x 4 crops an epoch: by area 4 each;
    by the nuclei they hold 16 x 9 / 12 = 12 to the crowded one and 16 / 12 = 1.3 -> 1 to the
    others. Without crops by area the option is refused."""
    from PIL import Image

    for stem in "abcde":  # c: test
        labels = np.zeros((32, 32), np.uint8)
        for n in range(9 if stem == "e" else 1):
            row, col = divmod(n, 3)
            labels[1 + 10 * row:9 + 10 * row, 1 + 10 * col:9 + 10 * col] = n + 1
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir(exist_ok=True)
            Image.fromarray(labels * 20).save(tmp_path / sub / f"{stem}.png")
    _, by_area = epoch_crops(tmp_path, caplog, crops_by_area=True)
    by_nuclei, counts = epoch_crops(tmp_path, caplog, crops_by_area=True, crops_by_nuclei=True)
    train = by_nuclei.splits["train"]
    assert by_nuclei.train_nuclei == [9 if i == "e" else 1 for i in train]
    assert counts == [12 if i == "e" else 1 for i in train]
    assert by_area == [4] * len(train)
    assert "by the nuclei they hold (to the power 1): 15 an epoch, 1 to 12" in caplog.text
    with pytest.raises(ValueError, match="crops_by_nuclei=true .* needs data.crops_by_area=true"):
        NucleiDataModule(str(tmp_path), crops_by_nuclei=True, mode="crop")


def test_crops_by_kind_give_colour_and_grey_images_crops_by_their_numbers(tmp_path, caplog):
    """Three grey images (one 128², two 32²) and one colour 32² one, 4 x 4 crops an epoch: by
    kind the colour image earns 4 (its own share, 1 of 4 images) where by area alone it got 1
    of 1,024 / 19,456; the grey ones share 12 by area: 12 x 16,384 / 18,432 = 10.7 -> 11."""
    from PIL import Image

    from cellseg.datamodule import crop_counts
    from cellseg.datasets import image_kind

    kinds = ["grey", "grey", "grey", "colour"]
    assert crop_counts([16384, 1024, 1024, 1024], 4, kinds=kinds) == [11, 1, 1, 4]
    assert crop_counts([16384, 1024, 1024, 1024], 4) == [13, 1, 1, 1]
    grey, stained = np.full((8, 8, 3), 90, np.uint8), np.full((8, 8, 3), 90, np.uint8)
    stained[..., 0] = 160  # pink: the channels differ
    kinds_of = [image_kind(grey), image_kind(stained), image_kind(grey[..., 0])]
    assert kinds_of == ["grey", "colour", "grey"]
    for stem, size in (("e", 128), ("a", 32), ("b", 32), ("c", 32), ("d", 32)):  # c: test
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        image = np.full((size, size, 3), 90, np.uint8)
        if stem == "d":
            image[..., 0] = 160
        labels = np.zeros((size, size), np.uint8)
        labels[4:12, 4:12] = 255
        Image.fromarray(image).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(labels).save(tmp_path / "masks" / f"{stem}.png")
    dm, counts = epoch_crops(tmp_path, caplog, crops_by_area=True, crops_by_kind=True)
    train = dm.splits["train"]
    assert dm.train_kinds == ["colour" if i == "d" else "grey" for i in train]
    assert counts[train.index("d")] == 4
    assert counts[train.index("e")] == 11
    assert "4 of them to the 1 colour (stained) images, 13 to the 3 grey ones" in caplog.text
    with pytest.raises(ValueError, match="crops_by_kind=true .* needs data.crops_by_area=true"):
        NucleiDataModule(str(tmp_path), crops_by_kind=True, mode="crop")


def test_an_unknown_data_option_is_refused_in_one_line(tmp_path):
    from cellseg.errors import UserError

    with pytest.raises(UserError, match=r"^data.crop_sise is no data option; the options are root"):
        NucleiDataModule(str(tmp_path), crop_sise=64)


def test_the_options_are_checked_once_and_saved_as_they_are_read(tmp_path):
    from dataclasses import asdict

    dm = NucleiDataModule(tmp_path, mode="crop", crop_size=64, train_roots=[tmp_path / "more"])
    assert dm.options.root == str(tmp_path)  # primitives: the checkpoint loads weights only
    assert dm.options.train_roots == [str(tmp_path / "more")]
    assert dict(dm.hparams) == asdict(dm.options)
    assert dm.hparams["crop_size"] == 64
