"""Images larger than memory: block-wise segmentation on dask, labels written as OME-Zarr.

``predict`` sends a plane here when it has more than ``blocks.above``² pixels, and every
OME-Zarr input. The plane is cut into square blocks of ``blocks.size`` pixels (the chunks of
the output); each block is read with a margin around it (at least two nuclei across plus the
network's halo, see :func:`margin`), so a nucleus on a block's border is seen whole by the
blocks on both sides. Four passes, each a set of independent dask tasks:

1. **segment**: each block with its margin is segmented as a whole image is
   (:func:`cellseg.inference.segment_rescaled`); its core's labels (numbered from 1 in the
   block) and foreground go into a scratch zarr, and a record of its four sides: the label on
   each pixel of the core's edge and whether that nucleus continues across the edge in the
   block's own view. A block is done when its record exists, so a rerun resumes there.
2. **merge** (in this process, small): labels of two neighbouring blocks that meet across their
   common edge, where either block saw the nucleus continue, are one nucleus
   (``scipy.sparse.csgraph.connected_components``); every nucleus gets one number, 1..N in
   block order.
3. **write**: each block's core renumbered into level 0 of ``labels/<id>.ome.zarr`` (uint32),
   then the multiscale pyramid (2x2 nearest, so napari and QuPath open a slide at once).
4. **measure**: each block measures the nuclei whose bounding box starts in its core (read with
   the margin below and to the right), so a nucleus is measured once, whole.

The work runs on a dask ``distributed`` cluster: a local one by default (``cluster=local``), or
SLURM jobs (``cluster=slurm``, dask-jobqueue). Memory is bounded by a block per worker
whatever the image's size; the client holds only the side records and the tables.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellseg.errors import UserError
from cellseg.memory import give_back_memory

log = logging.getLogger(__name__)
SIDES = {"top": (-1, 0), "bottom": (1, 0), "left": (0, -1), "right": (0, 1)}
SCRATCH = ".cellseg-blocks"  # per image, beside the outputs; removed once the image is done
SAMPLE_PIXELS = 4_000_000  # a plane's normalisation is found on a subsample of about this size
LABELS_FORMAT = "0.4"  # OME-NGFF version written (zarr format 2: read by napari, QuPath, Fiji)


def worker_layout(workers: int | str | None, cores: int | None = None) -> tuple[int, int]:
    """(dask workers, PyTorch threads per worker) whose product fits the cores: ``auto`` is one
    worker per core, each with one thread (post-processing is single-threaded, so blocks side
    by side keep every core busy)."""
    from cellseg.threads import share

    cores = cores or share()
    n = cores if workers in (None, "auto") else int(workers)
    if not 1 <= n <= cores:
        raise UserError(f"cluster.workers={workers}: use 1 to {cores} (the cores this process "
                        "may use beside other cellseg jobs), or auto")
    return n, max(1, cores // n)


@dataclass(frozen=True)
class Block:
    """A block's core (rows ``y0:y1``, columns ``x0:x1``) at grid place (``i``, ``j``)."""

    i: int
    j: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def name(self) -> str:
        return f"{self.i}_{self.j}"


def grid(height: int, width: int, size: int) -> list[Block]:
    """The blocks of a plane, row by row: cores of ``size`` pixels (the last ones smaller),
    aligned with the zarr chunks they are written to (no two tasks write one chunk)."""
    return [
        Block(i, j, y, min(y + size, height), x, min(x + size, width))
        for i, y in enumerate(range(0, height, size))
        for j, x in enumerate(range(0, width, size))
    ]


def margin(diameter_px: float | None, scale: float | None, overlap: int, setting) -> int:
    """The pixels read around a block: ``blocks.margin``, or (auto) two nuclei across (so a
    nucleus on the border is seen whole, with context) plus the network's tile overlap, both
    in the image's own pixels (``scale`` brings the image to the training size)."""
    if setting not in (None, "auto"):
        if int(setting) < 1:
            raise UserError(f"blocks.margin={setting}: use a positive number of pixels, or auto")
        return int(setting)
    scale = scale or 1.0
    return math.ceil(2 * (diameter_px or 32) + overlap / scale)


@dataclass
class Job:
    """What a worker needs to segment one plane's blocks (plain values: it travels to workers)."""

    path: str
    image_id: str
    axes: str | None
    channel: int | str | None
    index: dict  # the plane, e.g. {"Z": 3}; {} for a 2-D image
    lead: tuple  # the plane's place in the outputs' leading axes
    model: str | None
    device: str
    backend: str
    preprocess: dict | None
    inference: dict
    options: dict
    scale: float | None
    intensity: dict  # the whole plane's normalisation (datasets.image_intensity)
    size: int
    margin: int
    multiple: int  # the network's size multiple
    height: int
    width: int
    scratch: str
    threads: int
    channel_names: list = field(default_factory=list)
    pixel_size: tuple | None = None
    keys: dict = field(default_factory=dict)  # columns of every table row: image, t, z


@functools.cache
def _network(model: str | None, device: str, backend: str, preprocess_json: str):
    """A worker's network and input preparation, loaded once per process."""
    from cellseg import checkpoint

    loaded = checkpoint.load(model, device)
    pre = loaded.preprocessing(json.loads(preprocess_json) if preprocess_json else None)
    return loaded.network(backend, device), pre


@functools.cache
def _image(path: str, axes: str | None, channel):
    from cellseg.files import open_image

    return open_image(path, axes).select(channel)


def _start(job: Job):
    """The threads, network and image of a task (each cached per worker process)."""
    import torch

    if torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    pre_json = json.dumps(job.preprocess, sort_keys=True) if job.preprocess else ""
    net, pre = _network(job.model, job.device, job.backend, pre_json)
    return net, {**pre, "intensity": job.intensity}, _image(job.path, job.axes, job.channel)


def _around(block: Block, job: Job) -> tuple[slice, slice]:
    """The block's core with the margin around it, within the plane, starting and ending on
    the network's size multiple: the network then sees the block on the same pooling grid as
    the whole image (a U-Net is not shift-invariant by less than its multiple), and pads only
    at the plane's own bottom and right edges, as it pads the whole image."""
    a, m = job.multiple, job.margin
    return (slice(max(0, (block.y0 - m) // a * a), min(job.height, -(-(block.y1 + m) // a) * a)),
            slice(max(0, (block.x0 - m) // a * a), min(job.width, -(-(block.x1 + m) // a) * a)))


def _scratch(job: Job, name: str, dtype, mode: str = "r"):
    import zarr

    path = Path(job.scratch) / f"{name}.zarr"
    if mode == "r":
        return zarr.open_array(path, mode="r")
    return zarr.open_array(path, mode="a", shape=(job.height, job.width),
                           chunks=(job.size, job.size), dtype=dtype, fill_value=0)


def record_path(job: Job, block: Block) -> Path:
    return Path(job.scratch) / "sides" / f"{block.name}.npz"


def segment_block(job: Job, block: Block) -> int:
    """Pass 1 for one block: its core's labels (from 1) and foreground (0-255) into the
    scratch zarr, the record of its sides last; returns its nuclei."""
    from cellseg.inference import segment_rescaled

    net, pre, image = _start(job)
    ys, xs = _around(block, job)
    region = image.nuclei(image.region(job.index, ys, xs))
    if region.min() == region.max():  # nothing to see (a slide's empty background)
        foreground = np.zeros(region.shape[:2], np.float32)
        labels = np.zeros(region.shape[:2], np.int32)
    else:
        foreground, labels = segment_rescaled(
            net, region, pre, job.inference, job.options, job.scale
        )
    cy = slice(block.y0 - ys.start, block.y1 - ys.start)
    cx = slice(block.x0 - xs.start, block.x1 - xs.start)
    core = labels[cy, cx]
    kept = np.unique(core)
    kept = kept[kept > 0]
    # numbered 1..n in the block (nuclei of the margin alone are left to their own block)
    lookup = np.zeros(int(labels.max()) + 1, np.int32)
    lookup[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    core_ids = _scratch(job, "labels", np.int32, "a")
    core_ids[block.y0 : block.y1, block.x0 : block.x1] = lookup[core]
    _scratch(job, "foreground", np.uint8, "a")[block.y0 : block.y1, block.x0 : block.x1] = (
        np.round(foreground[cy, cx] * 255).astype(np.uint8)
    )
    sides = {}
    for side, (dy, dx) in SIDES.items():
        edge_y = cy.start if dy < 0 else cy.stop - 1 if dy > 0 else cy
        edge_x = cx.start if dx < 0 else cx.stop - 1 if dx > 0 else cx
        inside = labels[edge_y, edge_x]
        out_y, out_x = (edge_y + dy if dy else cy), (edge_x + dx if dx else cx)
        if not (0 <= (out_y if dy else 0) < labels.shape[0]
                and 0 <= (out_x if dx else 0) < labels.shape[1]):
            continue  # the plane's own edge: nothing beyond
        outside = labels[out_y, out_x]
        sides[f"{side}_labels"] = lookup[inside]
        sides[f"{side}_crosses"] = (inside == outside) & (inside > 0)
    path = record_path(job, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(tmp, count=len(kept), **sides)
    tmp.replace(path)  # last: the block is done
    del region, foreground, labels, core
    give_back_memory()
    return len(kept)


def merge_blocks(blocks: list[Block], records: dict[str, dict]) -> tuple[list[np.ndarray], int]:
    """Pass 2: one number per nucleus. Labels of neighbouring blocks that meet across their
    common edge, where either block saw the nucleus continue across, are joined; returns each
    block's lookup (its label -> the final label, 0 -> 0) and the number of nuclei."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    counts = [int(records[b.name]["count"]) for b in blocks]
    offsets = np.concatenate([[0], np.cumsum(counts)])  # block k's label l: node offsets[k] + l
    where = {(b.i, b.j): k for k, b in enumerate(blocks)}
    pairs = []
    for k, b in enumerate(blocks):
        for side, other, facing in (("bottom", (b.i + 1, b.j), "top"),
                                    ("right", (b.i, b.j + 1), "left")):
            if other not in where:
                continue
            n = where[other]
            mine, theirs = records[b.name], records[blocks[n].name]
            a, b_ = mine[f"{side}_labels"], theirs[f"{facing}_labels"]
            join = (a > 0) & (b_ > 0) & (mine[f"{side}_crosses"] | theirs[f"{facing}_crosses"])
            if join.any():
                pairs.append(np.unique(np.stack([a[join] + offsets[k], b_[join] + offsets[n]]),
                                       axis=1))
    nodes = int(offsets[-1]) + 1  # node 0: the background, joined to nothing
    edges = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), np.int64)
    graph = coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(nodes, nodes))
    n, component = connected_components(graph, directed=False)
    # components are numbered in the order of their first node: block order, then label order
    final = component.astype(np.uint32)
    lookups = [final[offsets[k] : offsets[k] + counts[k] + 1].copy() for k in range(len(blocks))]
    for lookup in lookups:
        lookup[0] = 0
    return lookups, n - 1


def write_block(job: Job, block: Block, lookup: np.ndarray, out: str) -> None:
    """Pass 3 for one block: its core renumbered into level 0 of the labels zarr."""
    import zarr

    core = np.asarray(_scratch(job, "labels", np.int32)[block.y0 : block.y1, block.x0 : block.x1])
    level = zarr.open_array(Path(out) / "0", mode="r+")
    level[(*job.lead, slice(block.y0, block.y1), slice(block.x0, block.x1))] = lookup[core]


def downsample_chunk(out: str, level: int, lead: tuple, block: Block) -> None:
    """One chunk of pyramid level ``level`` from the level below: every second pixel (the
    nearest neighbour, as labels must be)."""
    import zarr

    below = zarr.open_array(Path(out) / str(level - 1), mode="r")
    here = zarr.open_array(Path(out) / str(level), mode="r+")
    window = below[(*lead, slice(2 * block.y0, 2 * block.y1, 2),
                    slice(2 * block.x0, 2 * block.x1, 2))]
    here[(*lead, slice(block.y0, block.y1), slice(block.x0, block.x1))] = window


def measure_block(job: Job, block: Block, out: str) -> tuple[str, np.ndarray]:
    """Pass 4 for one block: the nuclei whose bounding box starts in its core, measured whole
    (read with the margin below and to the right, and one pixel above and to the left to tell
    a nucleus that starts on the core's edge from one that comes from beyond it). Writes the
    rows to a part file; returns its path and the nuclei's areas (for the summary)."""
    import zarr

    from cellseg.files import write_rows
    from cellseg.measure import measure

    image = _image(job.path, job.axes, job.channel)  # no network: measuring only
    y0, x0 = max(0, block.y0 - 1), max(0, block.x0 - 1)
    ys = slice(y0, min(job.height, block.y1 + job.margin))
    xs = slice(x0, min(job.width, block.x1 + job.margin))
    labels = np.asarray(zarr.open_array(Path(out) / "0", mode="r")[(*job.lead, ys, xs)])
    foreground = np.asarray(_scratch(job, "foreground", np.uint8)[ys, xs]) / 255.0
    rows = measure(labels, image.region(job.index, ys, xs), job.channel_names, job.pixel_size,
                   foreground, **job.keys)
    mine = []
    for row in rows:
        top, left = row["bbox_y0"] + y0, row["bbox_x0"] + x0
        if block.y0 <= top < block.y1 and block.x0 <= left < block.x1:
            if row["bbox_y1"] == labels.shape[0] or row["bbox_x1"] == labels.shape[1]:
                if row["bbox_y1"] + y0 < job.height and row["bbox_x1"] + x0 < job.width:
                    log.warning("%s: nucleus %d is larger than blocks.margin=%d px; it is "
                                "measured in part (raise blocks.margin)", job.image_id,
                                row["label"], job.margin)
            for key in ("centroid_y", "bbox_y0", "bbox_y1"):
                row[key] += y0
            for key in ("centroid_x", "bbox_x0", "bbox_x1"):
                row[key] += x0
            mine.append(row)
    del labels, foreground
    give_back_memory()
    part = Path(job.scratch) / "tables" / f"{block.name}.csv"
    part.parent.mkdir(parents=True, exist_ok=True)
    if mine:
        write_rows(part, mine)
    return str(part) if mine else "", np.array([r["area_px"] for r in mine], np.int64)


class Engine:
    """The dask cluster and client of a predict run, started at the first large image and
    closed at the end (``with Engine(cfg.cluster) as engine``)."""

    def __init__(self, cluster_cfg) -> None:
        self.cfg = cluster_cfg
        self.client = None
        self.threads = 1  # PyTorch threads of each worker

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            cluster = self.client.cluster
            self.client.close()
            if cluster is not None:
                cluster.close()

    def start(self) -> None:
        if self.client is None:
            self.client, self.threads = make_client(self.cfg)

    def run(self, fn: Callable, args: list[tuple], what: str) -> list:
        """``fn(*a)`` for each ``a`` as dask tasks (retried where a worker dies), in order."""
        import torch
        from distributed import as_completed

        from cellseg.cli import progress

        self.start()
        threads = torch.get_num_threads()  # workers in this process set theirs: put back after
        futures = [self.client.submit(fn, *a, pure=False, retries=2) for a in args]
        order = {f.key: i for i, f in enumerate(futures)}
        results = [None] * len(futures)
        try:
            for future, result in progress(as_completed(futures, with_results=True), what,
                                           total=len(futures), at_least=2):
                results[order[future.key]] = result
        finally:
            torch.set_num_threads(threads)
        return results


def make_client(cfg) -> tuple:
    """A dask client on the configured cluster and its workers' PyTorch threads: a local
    cluster sized to the cores this process may use, or SLURM jobs through dask-jobqueue."""
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker event
    if cfg.kind == "local":
        workers, threads = worker_layout(cfg.get("workers"))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                               processes=bool(cfg.get("processes")),
                               memory_limit=cfg.get("memory_limit") or 0,
                               dashboard_address=cfg.get("dashboard") or None)
        log.info("dask: a local cluster of %d workers (%s), %d PyTorch threads each (%d "
                 "cores)",
                 workers, "processes" if cfg.get("processes") else "threads of this process",
                 threads, workers * threads)
        return Client(cluster), threads
    if cfg.kind == "slurm":
        cluster = slurm_cluster(cfg)
        cluster.scale(jobs=int(cfg.jobs))
        log.info("dask: %d SLURM jobs of %d cores and %s each, asked for", cfg.jobs, cfg.cores,
                 cfg.memory)
        return Client(cluster), int(cfg.cores)
    raise UserError(f"cluster.kind={cfg.kind}: use cluster=local or cluster=slurm")


def slurm_cluster(cfg):
    """A dask-jobqueue SLURM cluster: one worker process per job, its PyTorch threads the
    job's cores (the job script sets them)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UserError("cluster=slurm needs dask-jobqueue: pip install -e '.[cluster]'") from None
    threads = int(cfg.cores)
    return SLURMCluster(  # one task at a time per worker (cores=1), its job's CPUs booked
        cores=1, job_cpu=threads, processes=1, memory=str(cfg.memory), walltime=str(cfg.walltime),
        queue=cfg.get("queue"), account=cfg.get("account"),
        job_extra_directives=list(cfg.get("job_extra_directives") or []),
        job_script_prologue=[f"export OMP_NUM_THREADS={threads}"],
        python=cfg.get("python") or sys.executable,
        log_directory=cfg.get("log_directory"),
    )


def create_labels_zarr(path: Path, shape: tuple, lead_axes: str, size: int,
                       pixel_size: tuple | None) -> list[tuple]:
    """An empty OME-Zarr labels image (NGFF 0.4, uint32): level 0 at ``shape``, each level
    below half the one above until the image fits a chunk; returns the levels' shapes."""
    import zarr

    root = zarr.open_group(path, mode="w", zarr_format=2)
    shapes, level = [], tuple(shape)
    while True:
        shapes.append(level)
        if max(level[-2:]) <= size:
            break
        level = (*level[:-2], math.ceil(level[-2] / 2), math.ceil(level[-1] / 2))
    lead_chunks = (1,) * len(lead_axes)
    for k, s in enumerate(shapes):
        root.create_array(str(k), shape=s, chunks=(*lead_chunks, size, size), dtype="uint32",
                          fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})
    py, px = pixel_size or (1.0, 1.0)
    unit = {"unit": "micrometer"} if pixel_size else {}
    axes = [{"name": a.lower(), "type": "time" if a == "T" else "space"} for a in lead_axes]
    axes += [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
    root.attrs.update({
        "multiscales": [{
            "version": LABELS_FORMAT,
            "name": path.name,
            "axes": axes,
            "datasets": [{"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0] * len(lead_axes) + [py * 2**k, px * 2**k]}]}
                for k in range(len(shapes))],
            "type": "nearest",
        }],
        "image-label": {"version": LABELS_FORMAT},  # napari and QuPath: a labels image
    })
    return shapes


def plan(image, image_id: str, net, pre: dict, options: dict, cfg, scratch: Path,
         threads: int) -> list[Job]:
    """A job per plane of a large image: the plane's normalisation (on a subsample of about
    ``SAMPLE_PIXELS``), its nuclei's size (``diameter=auto``: estimated on the centre of the
    middle plane, one scale for a whole stack, as :func:`cellseg.predict.stack_diameter`), the
    margin that follows, and the settings a worker needs."""
    from omegaconf import OmegaConf

    from cellseg.datasets import image_intensity
    from cellseg.files import plane_name, plane_suffix
    from cellseg.inference import ESTIMATE_SIDE, choose_scale

    h, w = image.height, image.width
    inference = OmegaConf.to_container(cfg.inference, resolve=True)
    step = max(1, math.ceil(math.sqrt(h * w / SAMPLE_PIXELS)))
    side = min(ESTIMATE_SIDE * 4, h, w)  # the centre read to estimate the nuclei's size
    y, x = (h - side) // 2, (w - side) // 2
    indices, intensities = image.plane_indices(), []
    for index in indices:
        sample = image.nuclei(image.region(index, slice(0, h, step), slice(0, w, step)))
        intensities.append(image_intensity(sample, pre["in_channels"], pre["normalize"],
                                           pre["invert_bright"]))
    # one scale for the whole stack, its nuclei sized on the middle plane's centre (as predict)
    middle = len(indices) // 2
    centre = (image.nuclei(image.region(indices[middle], slice(y, y + side), slice(x, x + side)))
              if cfg.get("diameter") == "auto" else None)  # read only to estimate
    scale, diameter = choose_scale(net, centre, {**pre, "intensity": intensities[middle]},
                                   inference, options, cfg.get("diameter"), shape=(h, w),
                                   name=plane_name(image.path, indices[middle]))
    size = block_size(int(cfg.blocks.size), scale or 1.0, pre["multiple"])
    preprocess = cfg.get("preprocess")
    return [Job(
        path=str(image.path), image_id=image_id, axes=cfg.get("axes"), channel=image.channel,
        index=index, lead=tuple(index.values()),
        model=cfg.get("model_name") or cfg.get("ckpt_path"), device=cfg.device,
        backend=cfg.backend, preprocess=OmegaConf.to_container(preprocess) if preprocess else None,
        inference=inference, options=dict(options), scale=scale, intensity=intensity,
        size=size, margin=margin(diameter, scale, int(inference.get("overlap", 32)),
                                 cfg.blocks.get("margin")),
        multiple=pre["multiple"], height=h, width=w,
        scratch=str(scratch / f"plane{plane_suffix(index)}"),
        threads=threads, channel_names=list(image.channel_names), pixel_size=image.pixel_size,
        keys={"image": image_id, "t": index.get("T", 0), "z": index.get("Z", 0)},
    ) for index, intensity in zip(indices, intensities, strict=True)]


def block_size(size: int, scale: float, multiple: int) -> int:
    """The block side in the image's pixels: ``blocks.size`` pixels at the network, so an image
    enlarged to the training size (``scale`` > 1) is cut in smaller blocks and a worker's
    memory stays the same; a multiple of the network's, at least four of them."""
    if size % multiple or size < 4 * multiple:
        raise UserError(f"blocks.size={size}: use a multiple of {multiple} (the network's) of "
                        f"at least {4 * multiple}, e.g. 2048")
    return max(4 * multiple, int(size / max(scale, 1.0)) // multiple * multiple)


def predict_large(engine: Engine, image, image_id: str, net, pre: dict, options: dict,
                  cfg, output: Path) -> int:
    """Segment every plane of a large image block-wise: ``labels/<id>.ome.zarr`` (renamed into
    place last: the image is done) and its tables; returns its nuclei."""
    from cellseg.files import write_rows
    from cellseg.measure import summarize_areas

    scratch = output / SCRATCH / image_id
    engine.start()
    jobs = plan(image, image_id, net, pre, options, cfg, scratch, engine.threads)
    h, w, size = image.height, image.width, jobs[0].size
    blocks = grid(h, w, size)
    log.info("%s: %dx%d px in %d blocks of %d px (margin %d px) on %s", image_id, h, w,
             len(blocks), size, jobs[0].margin, f"{len(jobs)} planes" if len(jobs) > 1 else
             "one plane")
    out = scratch / f"{image_id}.ome.zarr"
    shapes = create_labels_zarr(out, (*image.planes_shape.values(), h, w),
                                "".join(image.planes_shape), size, image.pixel_size)
    parts, summaries, total = [], [], 0
    for job in jobs:
        Path(job.scratch).mkdir(parents=True, exist_ok=True)
        save_scratch_settings(Path(job.scratch), settings_of(job))
        todo = [b for b in blocks if not record_path(job, b).is_file()]
        if len(todo) < len(blocks):
            log.info("%s: %d of %d blocks already segmented (resumed)", image_id,
                     len(blocks) - len(todo), len(blocks))
        engine.run(segment_block, [(job, b) for b in todo], "Segmenting blocks")
        records = {b.name: dict(np.load(record_path(job, b))) for b in blocks}
        lookups, nuclei = merge_blocks(blocks, records)
        engine.run(write_block, [(job, b, lk, str(out)) for b, lk in zip(blocks, lookups,
                                                                          strict=True)],
                   "Writing labels")
        for k in range(1, len(shapes)):
            engine.run(downsample_chunk, [(str(out), k, job.lead, b)
                                          for b in grid(*shapes[k][-2:], size)],
                       f"Pyramid level {k}")
        measured = engine.run(measure_block, [(job, b, str(out)) for b in blocks], "Measuring")
        parts += [Path(p) for p, _ in measured if p]
        areas = np.concatenate([a for _, a in measured]) if measured else np.array([])
        summaries.append(summarize_areas(areas, h * w, image.pixel_size, **job.keys))
        total += nuclei
    write_rows(output / "tables" / f"{image_id}.summary.csv", summaries)
    concatenate_csv(parts, output / "tables" / f"{image_id}.measurements.csv")
    final = output / "labels" / f"{image_id}.ome.zarr"
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)  # last: the image is done
    shutil.rmtree(scratch)
    if not any(scratch.parent.iterdir()):
        scratch.parent.rmdir()
    return total


def concatenate_csv(parts: list[Path], path: Path) -> None:
    """One CSV file from parts with the same columns (header once), streamed, atomically."""
    from cellseg.files import atomic

    with atomic(path) as tmp, open(tmp, "w", newline="") as out:
        for k, part in enumerate(parts):
            with open(part, newline="") as f:
                header = f.readline()
                if k == 0:
                    out.write(header)
                shutil.copyfileobj(f, out)


def save_scratch_settings(scratch: Path, settings: dict) -> None:
    """Keep blocks segmented before only where they were segmented with these settings."""
    path = scratch / "settings.json"
    text = json.dumps(settings, sort_keys=True, default=str)
    if path.is_file() and path.read_text() != text:
        log.info("%s: earlier blocks were segmented with other settings; starting anew", scratch)
        shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
    path.write_text(text)


def settings_of(job: Job) -> dict:
    keep = ("path", "axes", "channel", "index", "model", "backend", "preprocess", "inference",
            "options", "scale", "intensity", "size", "margin", "height", "width")
    return {k: v for k, v in asdict(job).items() if k in keep}
