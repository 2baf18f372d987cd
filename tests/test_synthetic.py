import json
import multiprocessing

import numpy as np

from cellseg.datasets import read_samples
from cellseg.synthetic import MARKER, generate, make_sample


def test_samples_are_deterministic_and_differ_by_index():
    a, la = make_sample(0, 3)
    b, lb = make_sample(0, 3)
    c, _ = make_sample(0, 4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_nuclei_sizes_styles_and_touching_neighbours():
    radii, styles, touching = [], set(), 0
    for i in range(30):
        image, labels = make_sample(0, i)
        assert image.shape == (256, 256, 3)
        assert image.dtype == np.uint8
        areas = np.bincount(labels.ravel())[1:]
        radii.extend(np.sqrt(areas[areas > 0] / np.pi))
        background = image[labels == 0].mean()
        styles.add("brightfield" if background > 128 else "fluorescence")
        # neighbours touch when a nucleus pixel borders another label
        right = labels[:, 1:] != labels[:, :-1]
        touching += int((right & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)).any())
    assert styles == {"brightfield", "fluorescence"}
    assert 4 < np.median(radii) < 25
    assert max(radii) < 35
    assert touching > 10


def test_generate_writes_the_dsb2018_layout_once(tmp_path):
    root = generate(tmp_path / "s", n_images=3, size=64, seed=1)
    assert json.loads((root / MARKER).read_text())["n_images"] == 3
    samples = read_samples(root, "dsb2018")
    assert [s.id for s in samples] == ["synth_000", "synth_001", "synth_002"]
    _, labels = make_sample(1, 0, 64)
    np.testing.assert_array_equal(samples[0].labels > 0, labels > 0)
    mtime = (root / MARKER).stat().st_mtime_ns
    generate(root, n_images=3, size=64, seed=1)
    assert (root / MARKER).stat().st_mtime_ns == mtime  # not regenerated


def _generate_in_process(root):
    generate(root, n_images=12, size=64, seed=2)


def test_jobs_started_together_generate_one_complete_set(tmp_path):
    """Parallel sweep jobs (submitit, joblib) share data.root: none may see or break a half set."""
    ctx = multiprocessing.get_context("spawn")
    jobs = [ctx.Process(target=_generate_in_process, args=(tmp_path / "s",)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0, 0, 0, 0]
    samples = read_samples(tmp_path / "s", "dsb2018")
    assert len(samples) == 12
    for i in (0, 11):
        _, labels = make_sample(2, i, 64)
        np.testing.assert_array_equal(samples[i].labels > 0, labels > 0)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["s"]
