"""Training end to end on tiny data: experiments, TensorBoard, checkpoints, resume, multirun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellseg.cli import own_cause
from cellseg.errors import UserError
from cellseg.module import SegmentationModule
from cellseg.train import train
from helpers import REAL_DATA, failure, needs_real_data, run_cli

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out

SCALARS = {
    "train/loss", "train/iou", "train/miou", "train/dice",
    "val/loss", "val/iou", "val/miou", "val/dice", "val/iou_best",
    "test/loss", "test/iou", "test/miou", "test/dice", "perf/train_images_per_s",
}


def events(run_dir: Path) -> EventAccumulator:
    (tb_dir,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("experiment", ["baseline", "augmented"])
def test_experiment_trains_and_logs_to_tensorboard(cfg_factory, experiment):
    cfg = cfg_factory(f"experiment={experiment}", "trainer.max_epochs=2")
    metrics = train(cfg)
    assert {"val/iou", "val/miou", "val/dice", "val/iou_best", "test/iou"} <= set(metrics)
    iou = metrics["test/iou"]  # pooled pixel counts: dice follows from iou exactly
    assert metrics["test/dice"] == pytest.approx(2 * iou / (1 + iou), abs=1e-5)
    assert metrics["test/dice"] > iou
    acc = events(Path(cfg.paths.output_dir))
    tags = acc.Tags()
    assert SCALARS <= set(tags["scalars"])
    assert len(acc.Scalars("val/iou")) == 2  # one point per epoch
    assert {"data/train_samples", "val/predictions"} <= set(tags["images"])
    assert any(t.startswith("hp/") for t in tags["scalars"])  # final metrics for the HPARAMS tab


def test_checkpoint_loads_with_weights_only_and_predicts(cfg_factory):
    cfg = cfg_factory("experiment=baseline")
    train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    raw = torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")
    assert raw["hyper_parameters"]["net"]["in_channels"] == 3
    model = SegmentationModule.load_from_checkpoint(ckpts / "last.ckpt", weights_only=True)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_resume_from_last_checkpoint_continues_the_epochs(cfg_factory):
    cfg = cfg_factory("experiment=baseline", "trainer.max_epochs=1")  # cosine LR schedule
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 0
    assert 0 < checkpoint["val_iou_best"] < 0.99
    checkpoint["val_iou_best"] = 0.99  # a best epoch before the resume that the next ones miss
    torch.save(checkpoint, last)
    cfg2 = cfg_factory("experiment=baseline", "trainer.max_epochs=3", f"ckpt_path={last}")
    cfg2.paths.output_dir = cfg.paths.output_dir + "_resumed"
    train(cfg2)
    resumed = torch.load(Path(cfg2.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["optimizer_states"][0]["state"]  # Adam moments came back
    assert resumed["lr_schedulers"][0]["last_epoch"] == 3  # the schedule continued, not restarted
    assert resumed["val_iou_best"] == pytest.approx(0.99)  # the best is of all epochs


def test_weights_averaged_over_the_steps_are_what_the_checkpoint_holds(cfg_factory):
    """callbacks.ema.decay: the checkpoint's state_dict (validated, tuned, shipped) is the
    moving average; the weights trained stay beside it (what a resume continues from)."""
    cfg = cfg_factory("experiment=baseline", "trainer.max_epochs=2", "callbacks.ema.decay=0.9")
    train(cfg)
    raw = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    key = "net.head.weight"
    average, trained = raw["state_dict"][key], raw["current_model_state"][key]
    assert average.shape == trained.shape
    assert 1e-6 < (average - trained).abs().max() < 1
    with pytest.raises(Exception) as refused:  # Hydra wraps it; the CLI prints its cause
        train(cfg_factory("callbacks.ema.decay=1.5"))
    cause = own_cause(refused.value)
    assert isinstance(cause, UserError)
    assert str(cause).startswith("callbacks.ema.decay=1.5: a weight's share that stays a step")


def test_cosine_schedule_anneals_to_zero_over_the_run(cfg_factory):
    cfg = cfg_factory(
        "model.loss=dice_bce",
        "+model.scheduler={_target_: torch.optim.lr_scheduler.CosineAnnealingLR,"
        " _partial_: true, T_max: 2}",
    )
    metrics = train(cfg)
    # logged at each epoch's start: 1e-3, then 1e-3 x (1 + cos(pi / 2)) / 2; after the last, 0
    assert metrics["lr-Adam"] == pytest.approx(5e-4)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    assert last["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)


def test_native_validation_on_padded_images_equals_eval_on_the_unpadded_ones(cfg_factory):
    from cellseg.eval import evaluate
    from helpers import compose_cfg

    cfg = cfg_factory(
        "experiment=native", "data.synthetic.size=72", "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=null",
        "trainer.precision=32-true",
    )
    metrics = train(cfg)  # validation: 72 x 72 images padded to 80 x 80, scored on 72 x 72
    ckpt = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    # as validation sees them: no size estimate (diameter=auto would rescale these images)
    eval_cfg = compose_cfg("eval", [f"ckpt_path={ckpt}", "split=val", "diameter=null"])
    scores, rows = evaluate(eval_cfg)
    # native holds 10 % of the 8 training images out for validation: 1 image
    assert {(r["height"], r["width"]) for r in rows} == {(72, 72)}
    assert len(rows) == 1
    for k in ("iou", "miou", "dice"):
        assert scores[k] == pytest.approx(metrics[f"val/{k}"], rel=1e-5), k


def test_one_channel_model_on_rgb_data(cfg_factory):
    cfg = cfg_factory("model.net.in_channels=1")
    metrics = train(cfg)
    iou = metrics["test/iou"]
    assert metrics["test/dice"] == pytest.approx(2 * iou / (1 + iou), abs=1e-5)
    assert metrics["test/dice"] > iou
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    assert saved["state_dict"]["net.encoders.0.0.weight"].shape[1] == 1  # one input channel


def test_multirun_of_both_experiments_lands_side_by_side(tmp_path):
    tiny = ["debug=fast", "data.synthetic.n_images=10", "data.synthetic.size=64"]
    out = run_cli(["-m", "experiment=baseline,augmented", *tiny], tmp_path)
    assert out.returncode == 0, failure(out)
    (sweep,) = (tmp_path / "logs/train/multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    # named after the experiment and the job's overrides (debug=fast tells nothing apart)
    tiny_name = "data.synthetic.n_images-10+data.synthetic.size-64"
    assert jobs == [f"0_baseline_{tiny_name}", f"1_augmented_{tiny_name}"]
    for job in jobs:
        assert list((sweep / job / "tensorboard").rglob("events.out.tfevents.*"))
        assert (sweep / job / "checkpoints/last.ckpt").is_file()


def test_unknown_experiment_names_the_choices(tmp_path):
    out = run_cli(["experiment=nope"], tmp_path)
    assert out.returncode != 0
    assert "baseline" in out.stderr
    assert "augmented" in out.stderr


@needs_real_data
def test_short_training_on_real_dsb2018(cfg_factory):
    cfg = cfg_factory(
        "data=dsb2018", f"data.root={REAL_DATA}", "trainer.max_epochs=1",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=null",
        "trainer.limit_test_batches=null",
    )
    metrics = train(cfg)
    iou = metrics["test/iou"]
    assert metrics["test/dice"] == pytest.approx(2 * iou / (1 + iou), abs=1e-5)
    assert metrics["test/dice"] > iou
    assert metrics["test/loss"] < 2.0


def test_optuna_search_runs_two_trials_and_survives_a_failing_one(tmp_path):
    tiny = ["debug=fast", "data.synthetic.n_images=10", "data.synthetic.size=64"]
    # with sampler seed 1 the first trial draws lr=1e30 (a non-finite loss: the trial fails)
    # and the second lr=0.001: the failure must not end the study
    out = run_cli(["hparams_search=optuna", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.sampler.n_startup_trials=2", "hydra.sweeper.sampler.seed=1",
                   "model.optimizer.lr=choice(0.001,1e30)", *tiny], tmp_path)
    assert out.returncode == 0, failure(out)
    assert "Failed experiment: non-finite loss" in out.stdout + out.stderr
    (sweep,) = (tmp_path / "logs/train/multiruns").iterdir()
    results = (sweep / "optimization_results.yaml").read_text()
    assert "model.optimizer.lr: 0.001" in results
    assert "best_value" in results
    trials = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [t.split("_")[0] for t in trials] == ["0", "1"]
    assert trials[0].endswith("model.optimizer.lr-1e+30")  # the trials tell apart by name
    assert trials[1].endswith("model.optimizer.lr-0.001")
    # trials are scored on images held out of training, not on the test split
    trial_cfg = OmegaConf.load(sweep / trials[1] / ".hydra/config.yaml")
    assert trial_cfg.data.val_size == 0.1
