"""Post-processing tuned after training (cellseg.tune): the search, the checkpoint, eval's use."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from cellseg.checkpoint import instance_options, tuned_instances
from cellseg.eval import evaluate
from cellseg.train import build, train
from cellseg.tune import (
    DEFAULTS,
    SPACE,
    TunePostprocessing,
    search,
    searched_options,
    set_score,
)
from helpers import compose_cfg, two_peaks


def faint_nuclei():
    """Two images whose nuclei the network sees at probability 0.45 (below the default 0.5
    threshold) beside a 0.35 blob that is no nucleus: only a threshold of 0.4 finds them all."""
    probs, labels = [], []
    for shift in (0, 3):
        truth = np.zeros((32, 32), np.int32)
        truth[4 + shift : 12 + shift, 4:12] = 1
        truth[18:28, 16 + shift : 26 + shift] = 2
        p = np.where(truth > 0, 0.45, 0.0).astype(np.float32)
        p[2:6, 24:30] = 0.35
        probs.append(p[..., None])
        labels.append(truth)
    return probs, labels


def test_search_finds_the_threshold_that_scores_best_and_keeps_defaults_on_ties():
    probs, labels = faint_nuclei()
    start = {k: DEFAULTS[k] for k in ("threshold", "h", "min_size")}
    assert set_score(probs, labels, start) == 0.0  # nothing above 0.5
    best, score = search(probs, labels, {k: SPACE[k] for k in start}, start)
    assert score == 1.0
    assert best == {"threshold": 0.4, "h": DEFAULTS["h"], "min_size": DEFAULTS["min_size"]}


def test_search_turns_seed_h_on_where_touching_nuclei_have_merged_cores():
    distance = two_peaks(separation=8)  # a saddle of 0.78: above every seed threshold tried
    fg = (distance > 0.05).astype(np.float32)
    probs = np.stack([fg, np.zeros_like(fg), distance], axis=-1)
    truth = ((fg > 0) * np.where(np.arange(60) < 28, 1, 2)).astype(np.int32)  # split at the saddle
    options = searched_options(3)
    start = {"use_contours": True, **{k: DEFAULTS[k] for k in options}}
    assert start["seed_h"] == 0.0
    assert set_score([probs], [truth], start) < 0.1  # one merged blob: at best the larger one
    best, score = search([probs], [truth], {k: SPACE[k] for k in options}, start)
    assert best["seed_h"] > 0
    assert score > 0.5


def test_search_turns_min_score_on_where_doubtful_objects_are_no_nuclei():
    """Sure nuclei (0.95) beside blobs the network doubts (0.75, the size of a nucleus): no pixel
    threshold tried removes the blobs without the nuclei's rims (0.7); the objects' score does."""
    truth = np.zeros((40, 40), np.int32)
    truth[4:14, 4:14], truth[24:34, 24:34] = 1, 2
    p = np.where(truth > 0, 0.95, 0.0).astype(np.float32)
    p[4, 4:14] = p[13, 4:14] = p[24, 24:34] = p[33, 24:34] = 0.7  # the nuclei's rims
    p[4:14, 24:34] = p[24:34, 4:14] = 0.75  # the doubtful blobs
    options = ["threshold", "min_size", "min_score"]
    start = {"split": False, **{k: DEFAULTS[k] for k in options}}
    assert set_score([p[..., None]], [truth], start) == pytest.approx(0.5)  # 2 of 4 found
    best, score = search([p[..., None]], [truth], {k: SPACE[k] for k in options}, start)
    assert best["min_score"] == 0.8
    assert score == 1.0


def test_pooled_map_lets_every_nucleus_count_the_same_in_the_search():
    """A faint lone nucleus (found only at threshold 0.4) beside a field of 10 clear nuclei and
    5 faint specks that are none: averaged over the two images, finding the lone one is worth
    the specks; over all 11 nuclei it is not."""
    lone = np.zeros((16, 16), np.int32)
    lone[4:10, 4:10] = 1
    lone_probs = np.where(lone > 0, 0.45, 0.0).astype(np.float32)[..., None]
    field = np.zeros((40, 80), np.int32)
    for i in range(10):
        field[4:10, 2 + 8 * i : 8 + 8 * i] = i + 1
    field_probs = np.where(field > 0, 0.55, 0.0).astype(np.float32)
    for i in range(5):
        field_probs[24:30, 2 + 8 * i : 8 + 8 * i] = 0.45
    probs, labels = [lone_probs, field_probs[..., None]], [lone, field]
    start = {"threshold": 0.5, "min_size": 1, "split": False}
    space = {"threshold": [0.4, 0.5]}
    assert set_score(probs, labels, start, "map") == pytest.approx(0.5)
    assert set_score(probs, labels, start, "map_pooled") == pytest.approx(10 / 11)
    assert search(probs, labels, space, start, score="map")[0]["threshold"] == 0.4
    assert search(probs, labels, space, start, score="map_pooled")[0]["threshold"] == 0.5
    with pytest.raises(ValueError, match="tune_postprocess.score='ap'; use map_pooled"):
        TunePostprocessing(score="ap")


def test_the_searched_options_are_those_the_outputs_use():
    last = ["min_size", "min_score"]  # the foreground's: searched for every network
    assert searched_options(1) == ["threshold", "h", *last]
    assert searched_options(1, split=False) == ["threshold", *last]
    assert searched_options(2) == ["threshold", "contour_threshold", *last]
    assert searched_options(3) == [
        "threshold", "contour_threshold", "seed_threshold", "seed_h", *last
    ]
    assert searched_options(3, use_contours=False) == ["threshold", "h", *last]
    assert searched_options(5) == [
        "threshold", "contour_threshold", "seed_threshold", "seed_h", "offset_threshold", *last
    ]
    assert DEFAULTS["min_score"] == 0.0
    assert 0.0 in SPACE["min_score"]


def test_the_users_value_wins_over_the_tuned_one_and_is_logged(caplog):
    checkpoint = {"postprocess": {"instances": {"threshold": 0.4, "min_size": 20}}}
    chosen = {"threshold": None, "min_size": 5, "h": None, "split": True}
    with caplog.at_level(logging.INFO, logger="cellseg.checkpoint"):
        options = instance_options(chosen, checkpoint)
    assert options == {"threshold": 0.4, "min_size": 5, "split": True}
    assert "instances.min_size=5 overrides the tuned 20" in caplog.text
    assert instance_options(chosen, {}) == {"min_size": 5, "split": True}  # untuned: defaults


def tiny_run(cfg_factory, val_size: str, *overrides: str):
    cfg = cfg_factory(
        "model.net.out_channels=3", f"data.val_size={val_size}", "trainer.max_epochs=1",
        *overrides,
    )
    train(cfg)
    return cfg


def test_training_with_a_validation_split_stores_the_tuned_options_in_its_checkpoints(
    cfg_factory, caplog
):
    with caplog.at_level(logging.INFO, logger="cellseg.tune"):
        cfg = tiny_run(cfg_factory, "0.25")  # 10 images: 8 train -> 6 train, 2 validation
    ckpt = cfg.paths.output_dir + "/checkpoints/last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["postprocess"]
    assert (stored["split"], stored["images"]) == ("val", 2)
    assert set(stored["instances"]) == {"use_contours", "split", *searched_options(3)}
    assert stored["score"] == "map_pooled"  # the default
    assert stored["map_pooled"] >= stored["map_pooled_defaults"]  # the search starts there
    for other in Path(ckpt).parent.glob("*.ckpt"):  # the best-on-validation one too
        assert "map_pooled" in torch.load(other, weights_only=True)["postprocess"]
    assert "Post-processing tuned on 2 validation images" in caplog.text
    # eval reads them: a tuned min_size larger than any image drops every nucleus
    state = torch.load(ckpt, weights_only=True)
    state["postprocess"]["instances"]["min_size"] = 10**6
    torch.save(state, ckpt)
    eval_cfg = compose_cfg("eval", [f"ckpt_path={ckpt}"])
    _, rows = evaluate(eval_cfg)
    assert [r["pred_nuclei"] for r in rows] == [0, 0]
    with open_dict(eval_cfg):  # the user's value wins: everything above 0 is one nucleus
        eval_cfg.instances.update(
            {"min_size": 1, "threshold": 0.0, "use_contours": False, "split": False}
        )
    _, rows = evaluate(eval_cfg)
    assert [r["pred_nuclei"] for r in rows] == [1, 1]


def retune_script():
    """scripts/retune.py as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "retune.py"
    spec = importlib.util.spec_from_file_location("retune", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_retune_script_tunes_a_checkpoint_again_in_place(cfg_factory, capsys):
    script = retune_script()
    cfg = tiny_run(cfg_factory, "0.25")
    ckpt = cfg.paths.output_dir + "/checkpoints/last.ckpt"
    before = torch.load(ckpt, weights_only=True)
    assert before["postprocess"]["score"] == "map_pooled"
    result = script.main(ckpt, "map")
    after = torch.load(ckpt, weights_only=True)
    assert after["postprocess"] == result
    assert result["score"] == "map"
    assert "map" in result
    assert (result["split"], result["images"]) == ("val", 2)
    for k, v in before["state_dict"].items():  # the weights untouched
        assert torch.equal(after["state_dict"][k], v)
    assert "before: use_contours=True" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="score 'ap': use map_pooled or map"):
        script.main(ckpt, "ap")
    with pytest.raises(SystemExit, match="not in .*nope: pass the folder they are in now"):
        script.main(ckpt, "map", str(Path(ckpt).parent / "nope"))
    with pytest.raises(SystemExit, match="holds out no validation images .* data.val_size=0.1"):
        script.main(tiny_run(cfg_factory, "0.0").paths.output_dir + "/checkpoints/last.ckpt")
    # tuned on the training images (every image trains): tuned there again
    cfg = tiny_run(cfg_factory, "0.0", "callbacks.tune_postprocess.images=train")
    result = script.main(cfg.paths.output_dir + "/checkpoints/last.ckpt")
    assert (result["split"], result["images"], result["score"]) == ("train", 8, "map_pooled")


def test_retune_script_finds_validation_images_of_the_runs_extra_training_folders(
    cfg_factory, tmp_path
):
    from cellseg.synthetic import generate

    script = retune_script()
    extra = tmp_path / "extra"
    generate(extra, n_images=6, size=64, seed=1)
    cfg = tiny_run(cfg_factory, "0.25", f"data.train_roots=[{extra}]")
    ckpt = cfg.paths.output_dir + "/checkpoints/last.ckpt"
    val = torch.load(ckpt, weights_only=True)["NucleiDataModule"]["splits"]["val"]
    assert any(i.startswith("extra/") for i in val)  # 4 of 14: from both folders
    result = script.main(ckpt)
    assert (result["split"], result["images"]) == ("val", len(val))


def test_tuning_is_refused_when_validation_is_the_test_split(cfg_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="cellseg.tune"):
        cfg = tiny_run(cfg_factory, "0.0")
    assert "validation images are the test images (data.val_size=0)" in caplog.text
    ckpt = cfg.paths.output_dir + "/checkpoints/last.ckpt"
    assert tuned_instances(ckpt) == {}
    assert "callbacks.tune_postprocess.images=train" in caplog.text  # the way out, named


def test_tuning_on_the_training_images_when_every_image_trains(cfg_factory, caplog):
    with caplog.at_level(logging.INFO, logger="cellseg.tune"):
        cfg = tiny_run(cfg_factory, "0.0", "callbacks.tune_postprocess.images=train")
    stored = torch.load(cfg.paths.output_dir + "/checkpoints/last.ckpt", weights_only=True)
    stored = stored["postprocess"]
    assert (stored["split"], stored["images"]) == ("train", 8)  # 10 images: 8 train, 2 test
    assert set(stored["instances"]) == {"use_contours", "split", *searched_options(3)}
    assert "Post-processing tuned on 8 training images" in caplog.text


def test_tuning_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="tune_postprocess.images='test'; use val"):
        TunePostprocessing(images="test")


def test_tuning_leaves_the_weights_in_memory_as_they_were(cfg_factory):
    """train tests the in-memory weights (test_ckpt=last): tuning each checkpoint's weights
    must put them back."""
    cfg = cfg_factory("model.net.out_channels=2", "data.val_size=0.25", "trainer.max_epochs=1")
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, TunePostprocessing)]
    with torch.no_grad():
        model.net.head.bias.fill_(7.0)  # weights no checkpoint holds
    model.train()
    callback.tune_checkpoints(trainer, model)
    assert (model.net.head.bias == 7.0).all()
    assert model.training
    assert "postprocess" in torch.load(trainer.checkpoint_callback.best_model_path,
                                       weights_only=True)
