"""Compare finished runs: ``python -m cellseg.compare runs=[DIR,...]``.

A multirun folder counts as its runs. Writes into its own run directory:

- ``comparison.png``: for the same test images a row of images, a row of true masks and one row
  of predictions per run, labelled with the run's name and its iou / map on that image (the
  study's figure 12, for any number of runs);
- ``curves.png``: train and validation loss and iou per epoch of every run on shared axes;
- ``results.md`` and ``results.csv``: one row per run with its experiment, the overrides that
  distinguish it, seed, epochs, training time and native-resolution test metrics;
- both figures in TensorBoard: in the compare run's ``tensorboard/`` and, for a multirun
  folder, in its ``comparison/`` beside the jobs.

Runs without ``checkpoints/last.ckpt`` are listed as unfinished, not skipped.
"""

from __future__ import annotations

import csv
import logging
import textwrap
from collections.abc import Collection
from pathlib import Path

import hydra
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cellseg import config_dir
from cellseg.checkpoint import checkpoint_data
from cellseg.cli import one_line_errors, run
from cellseg.datasets import Sample
from cellseg.eval import SCORES, evaluate
from cellseg.figures import display_rgb

log = logging.getLogger(__name__)
logging.getLogger("tensorboard").setLevel(logging.WARNING)  # "Directory watcher advancing..."
CURVES = ("train/loss", "val/loss", "train/iou", "val/iou")
IGNORED_OVERRIDES = ("data.root", "paths.", "callbacks.", "hydra.", "trainer.accelerator")


def run_folder(path: Path) -> bool:
    return (path / ".hydra/config.yaml").is_file()


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders (holding ``.hydra/config.yaml``); a multirun folder gives its jobs."""
    runs = []
    for p in map(Path, paths):
        if run_folder(p):
            runs.append(p)
        else:
            jobs = sorted(d for d in p.iterdir() if run_folder(d))
            if not jobs:
                raise FileNotFoundError(f"{p} is neither a training run nor a multirun folder")
            runs.extend(jobs)
    return runs


def run_info(run: Path) -> dict:
    """Name, overrides, seed, epochs, training time and curves of one run."""
    cfg = OmegaConf.load(run / ".hydra/config.yaml")
    overrides = OmegaConf.load(run / ".hydra/overrides.yaml")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)]
    info = {
        "run": run.name,
        "experiment": cfg.get("name"),
        "overrides": kept,
        "seed": cfg.get("seed"),
        "epochs": cfg.trainer.max_epochs,
        "cfg": cfg,
        "ckpt": run / "checkpoints/last.ckpt",
        "curves": {},
        "train_s": None,
    }
    events = sorted(run.glob("tensorboard/**/events.out.tfevents.*"))
    if events:
        acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        # each point at its epoch (1-based): Lightning logs the epoch beside every step, and
        # validation every n epochs must not be drawn at epochs 1, 2, 3 ...
        epoch_at = {e.step: int(e.value) + 1 for e in acc.Scalars("epoch")} if (
            "epoch" in tags) else {}
        info["curves"] = {
            t: [(epoch_at.get(e.step, i), e.value) for i, e in enumerate(acc.Scalars(t), 1)]
            for t in CURVES if t in tags
        }
        if "train/loss" in tags:
            walls = [e.wall_time for e in acc.Scalars("train/loss")]
            info["train_s"] = walls[-1] - walls[0]
    return info


def keep_differing_overrides(infos: list[dict]) -> None:
    """Each run's ``overrides`` as the text of those not shared by every compared run."""
    shared = set.intersection(*(set(i["overrides"]) for i in infos)) if len(infos) > 1 else set()
    for info in infos:
        info["overrides"] = " ".join(o for o in info["overrides"] if o not in shared)


def score_run(info: dict, cfg: DictConfig, keep: Collection[str] = ()) -> tuple[dict, dict]:
    """Native-resolution test metrics of a finished run (on the data and split its checkpoint
    records) and its per-image rows by id; the images and foregrounds of the ``keep`` ids are
    stored in ``info["kept"]`` for the figure, so nothing is segmented twice."""
    eval_cfg = OmegaConf.create(
        {
            "ckpt_path": str(info["ckpt"]),
            "data_root": cfg.get("data_root"),
            "split": "test",
            "device": cfg.device,
            "backend": "pytorch",
            "preprocess": None,
            "inference": cfg.inference,
            "instances": cfg.instances,
        }
    )
    info["kept"] = {}

    def keep_image(sample: Sample, foreground: np.ndarray, _labels: np.ndarray) -> None:
        if sample.id in keep:
            info["kept"][sample.id] = (sample, foreground)

    metrics, rows = evaluate(eval_cfg, keep_image)
    return metrics, {r["id"]: r for r in rows}


def shown_ids(infos: list[dict], n_images: int) -> list[str]:
    """The first test images of the first finished run: the figure's columns."""
    first = next((i for i in infos if i["ckpt"].is_file()), None)
    return checkpoint_data(first["ckpt"])["splits"].get("test", [])[:n_images] if first else []


def comparison_figure(infos: list[dict], ids: list[str]) -> Figure:
    """Images, true masks and one row of predictions per finished run (as scored)."""
    finished = [i for i in infos if "metrics" in i]
    samples = [next(i["kept"][k][0] for i in finished if k in i["kept"]) for k in ids]
    rows = 2 + len(finished)
    fig = Figure(figsize=(2.4 * len(samples), 2.4 * rows))
    axes = fig.subplots(rows, len(samples), squeeze=False)
    for j, s in enumerate(samples):
        axes[0, j].imshow(display_rgb(s.image))
        axes[0, j].set_title(s.id[:10], fontsize=8)
        axes[1, j].imshow(s.labels > 0, cmap="gray")
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("true mask")
    for i, info in enumerate(finished, start=2):
        for j, s in enumerate(samples):
            if s.id not in info["kept"]:  # the run was split otherwise
                axes[i, j].set_title("not in its test split", fontsize=8)
                continue
            axes[i, j].imshow(info["kept"][s.id][1] > 0.5, cmap="gray")
            r = info["per_image"][s.id]
            axes[i, j].set_title(f"iou {r['iou']:.2f} map {r['map']:.2f}", fontsize=8)
        axes[i, 0].set_ylabel(textwrap.fill(info["run"], 22), fontsize=7)  # long names wrap
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def curves_figure(infos: list[dict]) -> Figure:
    """Loss and iou per epoch, train dashed and validation solid, one colour per run; the loss
    axis names the runs' loss function(s)."""
    fig = Figure(figsize=(11, 4.5 + 0.18 * len(infos)))
    ax_loss, ax_iou = fig.subplots(1, 2)
    for k, info in enumerate(infos):
        colour = f"C{k % 10}"
        for tag, ax in zip(CURVES, (ax_loss, ax_loss, ax_iou, ax_iou), strict=True):
            points = info["curves"].get(tag)
            if points:
                style = "--" if tag.startswith("train") else "-"
                label = f"{info['run']} {tag.split('/')[0]}"
                ax.plot(
                    [epoch for epoch, _ in points],
                    [v for _, v in points],
                    style,
                    color=colour,
                    label=label,
                )
    losses = sorted({str(i["cfg"].model.get("loss", "bce")) for i in infos})
    for ax, name in ((ax_loss, f"loss ({', '.join(losses)})"), (ax_iou, "iou")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if ax_loss.lines:  # below the axes, where it covers no data
        handles, labels = ax_loss.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + len(infos) // 2), 1, 1))
    return fig


def write_results(infos: list[dict], out: Path) -> str:
    """results.csv and results.md: one row per run; returns the markdown table."""
    columns = ["run", "experiment", "overrides", "seed", "epochs", "train_s", "status", *SCORES]
    rows = []
    for info in infos:
        m = info.get("metrics", {})
        row = {k: info.get(k) for k in columns[:6]}
        row["train_s"] = None if info["train_s"] is None else round(info["train_s"], 1)
        row["status"] = "finished" if m else "no finished checkpoint"
        row.update({k: round(m[k], 4) if k in m else None for k in SCORES})
        rows.append(row)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows
    ]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def compare(cfg: DictConfig) -> list[dict]:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos = [run_info(r) for r in find_runs(list(cfg.runs))]
    keep_differing_overrides(infos)
    ids = shown_ids(infos, cfg.n_images)
    for info in infos:
        if info["ckpt"].is_file():
            info["metrics"], info["per_image"] = score_run(info, cfg, ids)
        else:
            log.warning("%s has no checkpoints/last.ckpt: listed as unfinished", info["run"])
    print(write_results(infos, out), end="")
    figures = {"curves": curves_figure(infos)}
    if ids and any("metrics" in i for i in infos):
        figures["comparison"] = comparison_figure(infos, ids)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
    # TensorBoard: in this run's folder, and inside each multirun compared, beside its jobs
    multiruns = [Path(p) / "comparison" for p in cfg.runs if not run_folder(Path(p))]
    for tb_dir in (out / "tensorboard", *multiruns):
        with SummaryWriter(str(tb_dir)) as writer:
            for name, fig in figures.items():
                writer.add_figure(f"compare/{name}", fig, close=False)
    log.info("comparison.png, curves.png, results.md and results.csv in %s", out)
    return infos


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="compare")
@one_line_errors
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    run(main)
