"""PyTorch threads that fit the cores, whatever else cellseg runs beside.

OpenMP threads wait for work by spinning, so two processes that each take every core slow each
other far more than twice: two ``experiment=baseline`` trainings started together on 2 cores
took 5.5 times as long as one after the other. Every cellseg process (training, predict, eval,
each run of a Hydra sweep, each shard) therefore registers itself in a folder of this machine's
temporary directory and takes an equal share of the cores it may use (``os.sched_getaffinity``,
SLURM's CPU count), counting the live cellseg processes whose cores overlap its own. The share
is looked at again every few seconds (:func:`refit`, called between batches, images and
blocks), so a job that finishes hands its cores back to the others.

A process is registered while it works (:func:`sharing_cores` around ``train``, ``predict`` and
``eval``), not while it idles. ``OMP_NUM_THREADS`` set by hand wins: cellseg then leaves the
threads as they are.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
REFIT_EVERY_S = 5.0
_state: dict = {"registered": None, "checked": 0.0, "threads": None, "managed": None,
                "before": None}


def available_cores() -> set[int]:
    """The CPUs this process may use: its affinity, within a SLURM job at most its CPU count."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(
        range(os.cpu_count() or 1))
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(name, "").isdigit():
            return set(sorted(cpus)[: max(1, int(os.environ[name]))])
    return cpus


def registry() -> Path:
    path = Path(tempfile.gettempdir()) / f"cellseg-threads-{os.getuid()}"
    path.mkdir(exist_ok=True)
    return path


def _alive(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that registered (not a reused pid)."""
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def register() -> None:
    """Enter this process in the registry (once; removed at exit)."""
    import psutil

    if _state["registered"]:
        return
    path = registry() / str(os.getpid())
    started = psutil.Process().create_time()
    path.write_text(json.dumps({"cpus": sorted(available_cores()), "started": started}))
    _state["registered"] = path
    atexit.register(lambda: path.unlink(missing_ok=True))


def sharing() -> int:
    """The live registered cellseg processes whose cores overlap this one's (itself included);
    entries of processes that ended are removed."""
    mine, count = available_cores(), 0
    for entry in registry().iterdir():
        try:
            info = json.loads(entry.read_text())
            pid = int(entry.name)
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid, info["started"]):
            entry.unlink(missing_ok=True)
            continue
        count += bool(mine & set(info["cpus"])) or pid == os.getpid()
    return max(1, count)


def share() -> int:
    """This process's share of its cores: all of them alone, an equal part beside others."""
    return max(1, len(available_cores()) // sharing())


def managed() -> bool:
    """Whether cellseg sizes the threads (not when OMP_NUM_THREADS was set by hand)."""
    if _state["managed"] is None:
        _state["managed"] = not os.environ.get("OMP_NUM_THREADS")
    return _state["managed"]


def fit() -> int:
    """Register and set PyTorch's threads to this process's share; returns the threads."""
    import torch

    if not managed():
        return torch.get_num_threads()
    register()
    if _state["before"] is None:
        _state["before"] = torch.get_num_threads()
    threads = share()
    _state["checked"] = time.monotonic()
    if threads != _state["threads"]:
        torch.set_num_threads(threads)
        if _state["threads"] is not None or threads < len(available_cores()):
            log.info("PyTorch threads: %d of %d cores (%d cellseg processes share them)",
                     threads, len(available_cores()), sharing())
        _state["threads"] = threads
    return threads


def refit() -> None:
    """:func:`fit` again when ``REFIT_EVERY_S`` have passed (cheap to call often)."""
    if _state["threads"] is not None and time.monotonic() - _state["checked"] >= REFIT_EVERY_S:
        fit()


def release() -> None:
    """Leave the registry (the work is done): the others take the cores back at their next
    look."""
    import torch

    if _state["registered"]:
        _state["registered"].unlink(missing_ok=True)
    if _state["before"] is not None:
        torch.set_num_threads(_state["before"])  # as it was before cellseg sized it
    _state.update(registered=None, threads=None, before=None)


def sharing_cores(fn: Callable) -> Callable:
    """Decorate an entry point: threads fitted while it runs, the registry left after (an
    entry point called inside another keeps the outer one's registration)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = _state["registered"] is not None
        fit()
        try:
            return fn(*args, **kwargs)
        finally:
            if not outer:
                release()

    return wrapper
