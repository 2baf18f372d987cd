"""Scale augmentation (augmentation=nuclei_scale) and the 3-channel target through the loaders."""

import hydra
import numpy as np

from cellseg.datamodule import NucleiDataModule
from helpers import compose_cfg


def zoom_pipeline():
    cfg = compose_cfg("train", ["augmentation=nuclei_scale"])
    return hydra.utils.instantiate(cfg.augmentation, _convert_="all")


def test_nuclei_scale_zooms_crops_out_and_in_up_to_twofold():
    transform = zoom_pipeline()
    transform.set_random_seed(0)
    yy, xx = np.mgrid[:128, :128]
    mask = (((yy - 64) ** 2 + (xx - 64) ** 2) <= 12**2).astype(np.float32)[..., None]
    image = np.repeat(mask, 3, axis=-1)
    ratios = []
    for _ in range(300):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (128, 128, 3) and out["mask"].shape == (128, 128, 1)
        ratios.append(out["mask"].sum() / mask.sum())
    ratios = np.array(ratios)
    zoom = np.sqrt(ratios)  # area grows with the square of the zoom
    assert zoom.min() < 0.6 and zoom.max() > 1.8  # reaches both ends of 0.5-2x
    # balanced: zoomed out about as often as in (p=0.8 of a zoom, each side half of that)
    assert 0.3 < (zoom < 0.95).mean() < 0.5 and 0.3 < (zoom > 1.05).mean() < 0.5


def test_crops_carry_the_distance_target_through_the_zoom(tmp_path):
    dm = NucleiDataModule(
        str(tmp_path / "s"), layout="synthetic", synthetic={"n_images": 5, "size": 64},
        mode="crop", crop_size=48, crops_per_image=2, batch_size=4, test_size=0.4,
        target_channels=3,
        augmentation=zoom_pipeline(),
    )
    dm.prepare_data()
    dm.setup()
    mask = next(iter(dm.train_dataloader()))["mask"]
    assert mask.shape == (4, 3, 48, 48)
    fg, contours, distance = mask[:, 0], mask[:, 1], mask[:, 2]
    assert set(fg.unique().tolist()) == {0.0, 1.0}
    assert (contours <= fg).all() and (distance[fg == 0] == 0).all()
    assert distance.max() <= 1.0 and (distance[fg == 1] > 0).all()
