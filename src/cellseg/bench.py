"""Speed next to its ceilings: ``python -m cellseg.bench`` (or ``make bench``).

For each input size and precision, in one process run so that ratios hold on a noisy machine:

- training images/s of the full Lightning pipeline (reader, the augmented experiment's
  augmentation, metrics, TensorBoard) next to a plain PyTorch loop over the same network,
  batches, size and precision, run after every pipeline epoch in the same process
  (``PlainLoopBeside``);
- the network's forward+backward GFLOP/s (counted by ``torch.utils.flop_counter``) next to the
  machine's matrix-multiply GFLOP/s in that precision;
- whole-image prediction megapixels/s through ``inference.predict_tensor`` (tiled) next to a
  bare forward pass over one tile;
- the peak resident memory of each measurement (each runs in its own child process; the
  pipeline's includes the plain loop's copy of the network);
- with ``backends.ckpt_path``, whole-image prediction megapixels/s of a checkpoint's test
  images through each of ``backends.names`` (``cellseg.backends``), alternated, next to the
  scores ``cellseg.eval`` gets through each (``shapes=[]`` skips the training rows);
- with ``folder.root``, the whole ``python -m cellseg.predict`` over the first ``folder.images``
  images of a folder of real images (the shipped model), with default outputs and with
  ``outputs=[labels]``: megapixels/s end to end next to the bare forward pass over the same
  images (:func:`folder_rows`);
- with ``side_by_side.args``, two ``python -m cellseg.train`` runs one after the other against
  the same two started together, with cellseg sizing its threads (:mod:`cellseg.threads`) and
  with ``OMP_NUM_THREADS`` set to every core in each (as before it did);
- with ``large.sides``, the whole ``python -m cellseg.predict`` on square images of those sides
  (the shipped sample's nuclei tiled, :func:`slide`): seconds, megapixels/s and the peak
  resident memory of the process and its dask workers together, block-wise and (up to
  ``large.whole_up_to``) whole-image.

Medians, warm-up excluded: over ``repeats`` calls, and for training over the epochs of
``rounds`` fresh processes. Writes ``bench.md`` and ``bench.json`` (every epoch's rates too).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import multiprocessing as mp
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from cellseg import config_dir
from cellseg.cli import one_line_errors, run

log = logging.getLogger(__name__)


def autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fns: list, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds after ``warmup`` rounds; each
    round calls every function once, in turn, so a slow spell of the machine slows them all."""
    times = [[] for _ in fns]
    for round_ in range(warmup + repeats):
        for fn, fn_times in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_gflops(precision: str, n: int, warmup: int, repeats: int) -> float:
    """The matrix-multiply rate in the precision's compute type."""
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    (seconds,) = timed([lambda: a @ b], warmup, repeats)
    return 2 * n**3 / seconds / 1e9


def make_net(channels_last: bool = True):
    from cellseg.unet import UNet

    net = UNet(3)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def train_flops(size: int, batch: int) -> float:
    """FLOPs of one forward+backward pass of a batch."""
    net = make_net()
    x = torch.rand(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops()


class PlainLoopBeside(L.Callback):
    """After each training epoch of the pipeline, one epoch of a bare PyTorch loop in the same
    process: a copy of the network with the pipeline's optimizer config, forward under the
    trainer's precision, BCE, backward, step, over the batches of one pipeline epoch held in
    memory (the same images and batch sizes, no loading). Epoch for epoch the two share the
    process and the moment, so a slow spell of the machine or a slow process slows both (the
    reason: on this VM separate processes running the same code differed by up to 15 %)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.precision = trainer.precision
        self.net = copy.deepcopy(pl_module.net)
        optimizer = hydra.utils.instantiate(pl_module.hparams.optimizer)
        self.opt = optimizer(params=self.net.parameters())
        cl = torch.channels_last
        loader = trainer.datamodule.train_dataloader()
        self.batches = [(b["image"].contiguous(memory_format=cl), b["mask"]) for b in loader]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        for x, y in self.batches:
            with autocast(self.precision):
                logits = self.net(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        images = sum(len(x) for x, _ in self.batches)
        self.rates.append(images / (time.perf_counter() - start))


def pipeline(
    size: int, batch: int, precision: str, epochs: int, root: str, data_dir: str, keep_freed: bool
) -> tuple[list[float], list[float]]:
    """Training images/s of ``cellseg.train`` per epoch and of the plain loop beside it (first
    epoch left out: warm-up)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from cellseg.cli import quiet_console
    from cellseg.train import build

    quiet_console()  # Lightning's device list and tips, once a round, are not the bench's
    mode = (
        ["data.mode=resize", f"data.img_size={size}"]
        if size <= 64
        else ["data.mode=crop", f"data.crop_size={size}"]
    )
    overrides = [
        "experiment=augmented",
        *mode,
        f"data.batch_size={batch}",
        f"trainer.precision={precision}",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",  # else Lightning adds its own (a drawing thread)
        "callbacks.model_summary=null",
        "test=false",
        "trainer.limit_val_batches=1",
        "trainer.enable_checkpointing=false",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        f"keep_freed_memory={keep_freed}",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = f"{root}/pipeline_{size}_{precision}"
        cfg.paths.data_dir = data_dir
    datamodule, model, trainer = build(cfg)
    rates = []

    class Recorder(L.Callback):  # collects perf/train_images_per_s of each epoch
        def on_train_epoch_end(self, trainer, pl_module):
            rate = trainer.callback_metrics.get("perf/train_images_per_s")
            if rate is not None:
                rates.append(float(rate))

    plain = PlainLoopBeside()
    trainer.callbacks.extend([Recorder(), plain])
    trainer.fit(model, datamodule=datamodule)
    return rates[1:] or rates, plain.rates[1:] or plain.rates


def prediction(
    size: int, precision: str, inference: dict, repeats: int
) -> tuple[float, float, int]:
    """Megapixels/s of tiled whole-image prediction (``inference``: its settings) and of a bare
    forward pass over one tile of the size the tiling uses; and that tile size."""
    from cellseg.inference import predict_tensor, tile_layout

    net = make_net().eval()
    image = torch.rand(3, size, size)
    tile, _ = tile_layout(size, inference["tile_size"], inference["overlap"], net.multiple)
    tile_x = torch.rand(1, 3, tile, tile).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(precision):  # alternated, whole first (it warms up more)
        whole, bare = timed(
            [lambda: predict_tensor(net, image, **inference), lambda: net(tile_x)], 1, repeats
        )
    return size * size / whole / 1e6, tile * tile / bare / 1e6, tile


def backend_table(ckpt_path: str, data: str, root: str, backends: list, repeats: int) -> list:
    """Whole-image prediction of a checkpoint's test images through each backend: megapixels/s
    (the backends alternated image set by image set, so a slow spell of the machine slows them
    all) and the scores ``cellseg.eval`` gets with that backend."""
    from hydra import compose, initialize_config_dir

    from cellseg.backends import network
    from cellseg.checkpoint import load_model, preprocessing
    from cellseg.datasets import prepare_image, read_samples
    from cellseg.eval import evaluate
    from cellseg.inference import predict_image

    overrides = [f"ckpt_path={ckpt_path}", f"data={data}", f"data.root={root}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfgs = {b: compose("eval", overrides=[*overrides, f"backend={b}"]) for b in backends}
    scores = {b: evaluate(cfg) for b, cfg in cfgs.items()}  # (metrics, per-image rows)
    ids = {r["id"] for r in scores[backends[0]][1]}
    model = load_model(ckpt_path)
    pre = preprocessing(model)
    images = [
        prepare_image(s.image, pre["in_channels"], pre["normalize"], pre["invert_bright"])
        for s in read_samples(cfgs[backends[0]].data.root, cfgs[backends[0]].data.layout)
        if s.id in ids
    ]
    megapixels = sum(x.shape[0] * x.shape[1] for x in images) / 1e6
    nets = [network(model, b, data_root=root) for b in backends]
    fns = [
        lambda net=net: [predict_image(net, x, pre["mode"], pre["img_size"]) for x in images]
        for net in nets
    ]
    rows = []
    for b, seconds in zip(backends, timed(fns, 1, repeats), strict=True):
        metrics = scores[b][0]
        rows.append(
            {
                "backend": b,
                "images": len(images),
                "megapixels": megapixels,
                "predict_mpx_s": megapixels / seconds,
                **{k: metrics[k] for k in ("iou", "dice", "map", "ap50")},
                "map_change": metrics["map"] - scores[backends[0]][0]["map"],
            }
        )
        rows[-1]["speedup"] = rows[-1]["predict_mpx_s"] / rows[0]["predict_mpx_s"]
    return rows


def _measure(fn, args):
    result = fn(*args)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh process; return (result, peak resident MB).

    A failing child raises here (a crashed one raises BrokenProcessPool), never hangs.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_measure, fn, args).result()


def run_bench(cfg: DictConfig) -> list[dict]:
    rows = []
    root = str(Path(cfg.paths.output_dir))
    inference = OmegaConf.to_container(cfg.inference)
    inference.pop("max_squash", None)  # resize-mode settings; the bench predicts natively
    inference.pop("max_shrink", None)
    keep = bool(cfg.keep_freed_memory)
    runs = [(size, b, p) for size, b in cfg.shapes for p in cfg.precisions]
    for k, (size, b, precision) in enumerate(runs, start=1):
        log.info("Training row %d of %d: %d px, batch %d, %s (%d rounds of %d epochs)", k,
                 len(runs), size, b, precision, cfg.rounds, cfg.epochs)
        flops_per_image = train_flops(size, b) / b
        pipes, plains, pipe_mb = [], [], 0.0
        for _ in range(cfg.rounds):  # fresh processes; every epoch of each counts
            (pipe_epochs, plain_epochs), mb = isolated(
                pipeline, size, b, precision, cfg.epochs, root, cfg.paths.data_dir, keep
            )
            pipes += pipe_epochs
            plains += plain_epochs
            pipe_mb = max(pipe_mb, mb)
        plain, pipe = statistics.median(plains), statistics.median(pipes)
        (peak, _) = isolated(matmul_gflops, precision, cfg.matmul_n, 1, cfg.repeats)
        ((tiled, bare, tile), pred_mb) = isolated(
            prediction, cfg.predict_size, precision, inference, cfg.repeats
        )
        rows.append(
            {
                "size": size,
                "precision": precision,
                "batch": b,
                "pipeline_img_s": pipe,
                "plain_img_s": plain,
                "pipeline_vs_plain": pipe / plain,
                "epochs_plain_img_s": plains,
                "epochs_pipeline_img_s": pipes,
                "train_gflop_s": plain * flops_per_image / 1e9,
                "matmul_gflop_s": peak,
                "train_vs_matmul": plain * flops_per_image / 1e9 / peak,
                "tiled_mpx_s": tiled,
                "bare_mpx_s": bare,
                "tiled_vs_bare": tiled / bare,
                "predict_size": cfg.predict_size,
                "tile": tile,
                "pipeline_peak_mb": pipe_mb,
                "predict_peak_mb": pred_mb,
            }
        )
        row = rows[-1]
        log.info("... pipeline %.1f img/s (%.2f of the plain loop), training %.0f GFLOP/s (%.2f "
                 "of matmul), tiled predict %.2f MP/s (%.2f of a bare forward)",
                 row["pipeline_img_s"], row["pipeline_vs_plain"], row["train_gflop_s"],
                 row["train_vs_matmul"], row["tiled_mpx_s"], row["tiled_vs_bare"])
    return rows


def slide(path: Path, side: int, fmt: str = "zarr", tile: int = 1024) -> Path:
    """A ``side`` x ``side`` 8-bit nuclei image: the shipped sample (256 px, real DSB nuclei)
    tiled, each copy flipped or turned at random, written chunk by chunk (never whole in
    memory) as an OME-Zarr (``fmt=zarr``) or a tiled, compressed TIFF (``fmt=tiff``)."""
    import numpy as np
    import tifffile
    from PIL import Image

    from cellseg.samples import sample_path

    base = np.asarray(Image.open(sample_path("nuclei")))
    rng = np.random.default_rng(0)

    turns = [np.rot90(base, k) for k in range(4)] + [np.rot90(base.T, k) for k in range(4)]

    def chunk(h: int, w: int) -> np.ndarray:
        rows = [np.hstack([turns[rng.integers(8)] for _ in range(-(-w // 256))])
                for _ in range(-(-h // 256))]
        return np.vstack(rows)[:h, :w]

    if fmt == "tiff":
        path = path.with_suffix(".tif")
        tiles = (chunk(tile, tile) for _ in range(math.ceil(side / tile) ** 2))
        tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint8, tile=(tile, tile),
                         compression="zlib")
        return path
    import zarr

    path = path.with_suffix(".ome.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=2)
    level = root.create_array("0", shape=(side, side), chunks=(tile, tile), dtype="uint8",
                              chunk_key_encoding={"name": "v2", "separator": "/"})
    for y in range(0, side, tile):
        for x in range(0, side, tile):
            level[y : y + tile, x : x + tile] = chunk(min(tile, side - y), min(tile, side - x))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0]}]}]}]
    return path


def run_measured(cmd: list[str], every_s: float = 0.25) -> tuple[float, float, str]:
    """Run a command; (seconds, peak resident MB of it and its children together, output)."""
    import subprocess

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree) / 2**20)
        except psutil.Error:
            pass
        time.sleep(every_s)
    seconds = time.perf_counter() - start
    output = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return seconds, peak, output


def large_rows(cfg: DictConfig, root: Path) -> list[dict]:
    """The whole predict on large images, block-wise and (up to ``whole_up_to``) whole."""
    import shutil
    import sys

    rows = []
    for side in cfg.large.sides:
        modes = ["blocks"] + (["whole"] if side <= cfg.large.whole_up_to else [])
        for mode in modes:
            work = root / f"large_{side}_{mode}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "in").mkdir()
            image = slide(work / "in/slide", side, "zarr" if mode == "blocks" else "tiff")
            cmd = [sys.executable, "-m", "cellseg.predict", f"input={image}",
                   f"output={work / 'out'}", f"hydra.run.dir={work / 'log'}",
                   f"blocks.size={cfg.large.block_size}", f"cluster.workers={cfg.large.workers}",
                   f"blocks.above={side if mode == 'whole' else 0}", *cfg.large.overrides]
            seconds, peak, _ = run_measured(cmd)
            rows.append({"side": side, "mode": mode, "megapixels": side * side / 1e6,
                         "seconds": seconds, "mpx_s": side * side / 1e6 / seconds,
                         "peak_mb": peak})
            log.info("%s", rows[-1])
            shutil.rmtree(work, ignore_errors=True)
    return rows


def bare_forward_mpx_s(paths: list[Path], model_name: str | None = None) -> float:
    """The network alone: one forward pass per image at its own size (padded to the multiple),
    as predict's whole-image path runs it."""
    import numpy as np
    from PIL import Image

    from cellseg import checkpoint

    model = checkpoint.load(model_name, "cpu")
    net, pre = model.network("pytorch", "cpu"), model.preprocessing()
    m, pixels, seconds = pre["multiple"], 0, 0.0
    with torch.no_grad():
        for path in paths:
            h, w = np.asarray(Image.open(path)).shape[:2]
            x = torch.rand(1, pre["in_channels"], -(-h // m) * m, -(-w // m) * m)
            start = time.perf_counter()
            net(x)
            seconds += time.perf_counter() - start
            pixels += h * w
    return pixels / 1e6 / seconds


def folder_rows(cfg: DictConfig, root: Path) -> list[dict]:
    """The whole predict over real images against the bare forward pass, per outputs setting."""
    import shutil
    import sys

    import numpy as np
    from PIL import Image

    from cellseg.predict import find_inputs

    source = Path(cfg.folder.root)
    folder = source / "images" if (source / "images").is_dir() else source
    paths = sorted(find_inputs(folder).values())[: cfg.folder.images]
    work = root / "folder"
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    for path in paths:
        shutil.copy(path, work / "in" / path.name)
    megapixels = sum(int(np.prod(Image.open(p).size)) for p in paths) / 1e6
    bare = bare_forward_mpx_s(paths)
    (work / "one").mkdir()
    shutil.copy(paths[0], work / "one" / paths[0].name)

    def command(folder: str, out: Path, outputs: str) -> list[str]:
        return [sys.executable, "-m", "cellseg.predict", f"input={work / folder}",
                f"output={out}", f"hydra.run.dir={work / 'log'}", f"outputs={outputs}",
                *cfg.folder.overrides]

    rows = []
    for k, outputs in enumerate(cfg.folder.outputs):
        seconds, peak, _ = run_measured(command("in", work / f"out_{k}", outputs))
        # the fixed cost a plate of thousands of fields pays once: the whole process on the
        # first image alone (imports, the model, the first image's warm-up, the tables)
        startup, _, _ = run_measured(command("one", work / f"one_{k}", outputs))
        after = megapixels / (seconds - startup) / bare if seconds > startup else float("nan")
        rows.append({"images": len(paths), "megapixels": megapixels, "outputs": outputs,
                     "seconds": seconds, "mpx_s": megapixels / seconds, "bare_mpx_s": bare,
                     "vs_bare": megapixels / seconds / bare, "startup_s": startup,
                     "vs_bare_started": after, "peak_mb": peak})
        log.info("%s", rows[-1])
    shutil.rmtree(work, ignore_errors=True)
    return rows


def side_by_side_rows(cfg: DictConfig, root: Path) -> list[dict]:
    """Two trainings one after the other, then started together: seconds of each way."""
    import os
    import subprocess
    import sys

    from cellseg.threads import available_cores

    def command(k: int) -> list[str]:
        return [sys.executable, "-m", "cellseg.train", *cfg.side_by_side.args,
                f"hydra.run.dir={root / 'side_by_side' / str(k)}"]

    rows = []
    for threads in ("cellseg", "OMP_NUM_THREADS"):
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        if threads == "OMP_NUM_THREADS":
            env["OMP_NUM_THREADS"] = str(len(available_cores()))
        start = time.perf_counter()
        for k in range(2):
            subprocess.run(command(k), env=env, check=True, capture_output=True)
        serial = time.perf_counter() - start
        start = time.perf_counter()
        procs = [subprocess.Popen(command(k), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for k in range(2)]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"{' '.join(command(0))} failed")
        together = time.perf_counter() - start
        rows.append({"threads": threads, "one_after_the_other_s": serial,
                     "together_s": together, "together_vs_serial": together / serial})
        log.info("%s", rows[-1])
    return rows


SIDE_BY_SIDE_COLUMNS = [
    ("threads", "threads sized by"),
    ("one_after_the_other_s", "2 runs one after the other (s)"),
    ("together_s", "2 runs together (s)"),
    ("together_vs_serial", "ratio"),
]
FOLDER_COLUMNS = [
    ("images", "images"),
    ("megapixels", "MP"),
    ("outputs", "outputs"),
    ("seconds", "seconds (whole process)"),
    ("mpx_s", "predict MP/s"),
    ("bare_mpx_s", "bare forward MP/s"),
    ("vs_bare", "ratio"),
    ("startup_s", "start-up (s)"),
    ("vs_bare_started", "ratio after start-up"),
    ("peak_mb", "peak MB"),
]
LARGE_COLUMNS = [
    ("side", "side"),
    ("mode", "predict"),
    ("megapixels", "MP"),
    ("seconds", "seconds"),
    ("mpx_s", "MP/s"),
    ("peak_mb", "peak MB (all processes)"),
]
TRAIN_COLUMNS = [
    ("size", "size"),
    ("precision", "precision"),
    ("batch", "batch"),
    ("pipeline_img_s", "pipeline img/s"),
    ("plain_img_s", "plain loop img/s"),
    ("pipeline_vs_plain", "ratio"),
    ("train_gflop_s", "train GFLOP/s"),
    ("matmul_gflop_s", "matmul GFLOP/s"),
    ("train_vs_matmul", "ratio"),
    ("predict_size", "predict side"),
    ("tile", "tile"),
    ("tiled_mpx_s", "tiled predict MP/s"),
    ("bare_mpx_s", "bare forward MP/s"),
    ("tiled_vs_bare", "ratio"),
    ("pipeline_peak_mb", "pipeline MB"),
    ("predict_peak_mb", "predict MB"),
]
BACKEND_COLUMNS = [
    ("backend", "backend"),
    ("images", "images"),
    ("megapixels", "MP"),
    ("predict_mpx_s", "predict MP/s"),
    ("speedup", "vs first"),
    ("iou", "iou"),
    ("dice", "dice"),
    ("map", "map"),
    ("map_change", "map change"),
]


def markdown(
    rows: list[dict], cols: list[tuple[str, str]] = TRAIN_COLUMNS, fmt: str = ".2f"
) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[k]:{fmt}}" if isinstance(r[k], float) else str(r[k]) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
@one_line_errors
def main(cfg: DictConfig) -> None:
    rows = run_bench(cfg)
    b = cfg.backends
    backend_rows = (
        isolated(backend_table, b.ckpt_path, b.data, b.root, list(b.names), b.repeats)[0]
        if b.ckpt_path
        else []
    )
    out = Path(cfg.paths.output_dir)
    folder = folder_rows(cfg, out) if cfg.folder.root else []
    side_by_side = side_by_side_rows(cfg, out) if cfg.side_by_side.args else []
    large = large_rows(cfg, out) if cfg.large.sides else []
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    settings = OmegaConf.to_container(cfg, resolve=False)
    settings.pop("paths", None)
    (out / "bench.json").write_text(
        json.dumps({**info, "settings": settings, "rows": rows, "backends": backend_rows,
                    "folder": folder, "side_by_side": side_by_side, "large": large},
                   indent=2)
    )
    table = (markdown(rows) if rows else "") + (
        f"\n{markdown(backend_rows, BACKEND_COLUMNS, '.4f')}" if backend_rows else ""
    ) + (f"\n{markdown(folder, FOLDER_COLUMNS)}" if folder else "") + (
        f"\n{markdown(side_by_side, SIDE_BY_SIDE_COLUMNS)}" if side_by_side else "") + (
        f"\n{markdown(large, LARGE_COLUMNS)}" if large else "")
    (out / "bench.md").write_text(table)
    print(table)
    log.info("bench.md and bench.json in %s", out)


if __name__ == "__main__":
    run(main)
