"""Scale augmentation (augmentation=nuclei_scale), stain variation (nuclei_colour, the native
recipe's), lost resolution and other microscopes' optics (nuclei_resolution, nuclei_optics:
the general recipe's) and the 3-channel target through the loaders."""

import hydra
import numpy as np

from cellseg.datamodule import NucleiDataModule, PhotonNoise
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
        assert out["image"].shape == (128, 128, 3)
        assert out["mask"].shape == (128, 128, 1)
        ratios.append(out["mask"].sum() / mask.sum())
    ratios = np.array(ratios)
    zoom = np.sqrt(ratios)  # area grows with the square of the zoom
    assert zoom.min() < 0.6
    assert zoom.max() > 1.8
    # balanced: zoomed out about as often as in (p=0.8 of a zoom, each side half of that)
    assert 0.3 < (zoom < 0.95).mean() < 0.5
    assert 0.3 < (zoom > 1.05).mean() < 0.5


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
    assert (contours <= fg).all()
    assert (distance[fg == 0] == 0).all()
    assert distance.max() <= 1.0
    assert (distance[fg == 1] > 0).all()


def test_nuclei_colour_varies_the_stain_of_colour_images_and_leaves_grey_ones_grey():
    cfg = compose_cfg("train", ["augmentation=nuclei_colour"])
    assert compose_cfg("train", ["experiment=native"]).augmentation == cfg.augmentation
    pipeline = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    (jitter,) = [t for t in pipeline.transforms if type(t).__name__ == "ColorJitter"]
    jitter.p = 1.0
    jitter.set_random_seed(0)
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.random((64, 64, 1), dtype=np.float32), 3, axis=-1)
    stained = np.stack([np.full((64, 64), v, np.float32) for v in (0.6, 0.4, 0.8)], axis=-1)
    spreads = []
    for _ in range(50):
        np.testing.assert_allclose(jitter(image=grey)["image"], grey, atol=1e-5)
        colour = jitter(image=stained)["image"].reshape(-1, 3).mean(0)
        spreads.append(colour.max() - colour.min())  # the saturation: 0.4 before
    spreads = np.array(spreads)
    assert spreads.min() < 0.3
    assert spreads.max() > 0.5


def pipeline_of(name: str) -> list[tuple[str, dict]]:
    """The transforms ``augmentation=name`` builds, as (class, arguments) in order."""
    cfg = compose_cfg("train", [f"augmentation={name}"])
    pipeline = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    return [(type(t).__name__, t.to_dict()["transform"]) for t in pipeline.transforms]


def test_pipelines_extend_each_other_by_named_steps():
    """nuclei is light plus three steps, nuclei_scale changes nuclei's affine alone,
    nuclei_colour adds one step: what each config file says, and nothing copied."""
    light, nuclei = pipeline_of("light"), pipeline_of("nuclei")
    scale, colour = pipeline_of("nuclei_scale"), pipeline_of("nuclei_colour")
    assert [n for n, _ in light] == ["HorizontalFlip", "VerticalFlip", "RandomRotate90"]
    assert nuclei[:3] == light
    assert [n for n, _ in nuclei[3:]] == ["Affine", "RandomBrightnessContrast", "GaussNoise"]
    assert [n for n, _ in scale] == [n for n, _ in nuclei]
    assert scale[4:] == nuclei[4:]
    assert scale[3][1]["p"] == 0.8
    assert nuclei[3][1]["p"] == 0.5
    assert scale[3][1]["balanced_scale"] is True
    assert colour[:-1] == scale
    assert colour[-1][0] == "ColorJitter"
    assert [n for n, _ in pipeline_of("strong")][-2:] == ["GaussNoise", "GaussianBlur"]


def test_a_step_is_dropped_or_changed_by_name():
    cfg = compose_cfg("train", ["augmentation=nuclei", "augmentation.steps.noise=null",
                                "augmentation.steps.affine.p=1.0"])
    pipeline = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "Affine",
                     "RandomBrightnessContrast"]
    assert pipeline.transforms[3].p == 1.0


def test_nuclei_resolution_blurs_the_image_and_leaves_the_mask_sharp():
    colour, resolution = pipeline_of("nuclei_colour"), pipeline_of("nuclei_resolution")
    assert resolution[:-1] == colour
    cfg = compose_cfg("train", ["augmentation=nuclei_resolution"])
    pipeline = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    (step,) = [t for t in pipeline.transforms if type(t).__name__ == "Downscale"]
    step.p = 1.0
    step.set_random_seed(0)
    image = np.zeros((64, 64, 3), np.float32)
    image[::2] = 1.0  # stripes one pixel wide: gone at any shrinking
    mask = (image[..., 0] > 0).astype(np.uint8)
    out = step(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask)
    assert np.abs(np.diff(out["image"][..., 0], axis=0)).max() < 0.9  # no sharp edge left


def test_nuclei_optics_blurs_and_bends_the_image_and_leaves_the_mask_sharp():
    optics = pipeline_of("nuclei_optics")
    assert optics[:-3] == pipeline_of("nuclei_resolution")
    assert [name for name, _ in optics[-3:]] == ["GaussianBlur", "RandomGamma", "PhotonNoise"]
    cfg = compose_cfg("train", ["augmentation=nuclei_optics"])
    pipeline = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    blur, gamma = pipeline.transforms[-3:-1]
    image = np.zeros((64, 64, 3), np.float32)
    image[::2] = 1.0  # stripes one pixel wide
    image[1::2, :32] = 0.25
    mask = (image[..., 0] > 0.5).astype(np.uint8)
    for step in (blur, gamma):
        step.p = 1.0
        step.set_random_seed(0)
        out = step(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask)
        assert np.isfinite(out["image"]).all()
    assert np.abs(np.diff(blur(image=image, mask=mask)["image"][..., 0], axis=0)).max() < 0.9
    bent = np.unique(gamma(image=image, mask=mask)["image"])
    assert bent[0] == 0.0
    assert bent[-1] == 1.0
    assert not np.isclose(bent[1], 0.25, atol=0.01)


def test_photon_noise_is_poisson_and_keeps_grey_images_grey():
    noise = PhotonNoise(photons_range=(20, 20), p=1.0)
    noise.set_random_seed(0)
    grey = np.full((128, 128, 3), 0.5, np.float32)
    grey[:64] = 0.0
    out = noise(image=grey)["image"]
    assert out.dtype == np.float32
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    assert np.all(out[:64] == 0.0)  # no light, no counts
    lit = out[64:, :, 0]
    assert abs(lit.mean() - 0.5) < 0.01
    assert abs(lit.std() - np.sqrt(0.5 / 20)) < 0.01  # Poisson: variance = mean count
    assert np.allclose(lit * 20, np.round(lit * 20))  # whole photons
    colour = grey.copy()
    colour[..., 1] = 0.25
    out = noise(image=colour)["image"]
    assert not np.array_equal(out[64:, :, 0], out[64:, :, 2])  # each channel its own counts
    assert abs(out[64:, :, 1].mean() - 0.25) < 0.01
