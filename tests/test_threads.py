"""PyTorch threads sized to a share of the cores beside other cellseg processes."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
import torch

from cellseg import threads


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A registry of its own and 4 cores; torch's threads put back after."""
    monkeypatch.setattr(threads, "registry", lambda: tmp_path)
    monkeypatch.setattr(threads, "available_cores", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_state", {"registered": None, "checked": 0.0,
                                            "threads": None, "managed": None, "before": None})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(before)


def other_process(registry, cpus):
    """A live process entered in the registry with ``cpus``."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = psutil.Process(proc.pid).create_time()
    (registry / str(proc.pid)).write_text(json.dumps({"cpus": cpus, "started": started}))
    return proc


def test_alone_a_process_takes_every_core(machine):
    assert threads.fit() == 4
    assert torch.get_num_threads() == 4


def test_beside_others_it_takes_an_equal_share_and_gets_cores_back(machine):
    others = [other_process(machine, [0, 1, 2, 3]) for _ in range(2)]
    elsewhere = other_process(machine, [4, 5])  # pinned to other cores: not counted
    try:
        assert threads.fit() == 1  # 4 cores // 3 processes
        others[0].kill()
        others[0].wait()
        assert threads.fit() == 2  # the ended one's entry is removed, its cores shared back
        assert not (machine / str(others[0].pid)).exists()
    finally:
        for proc in [*others, elsewhere]:
            proc.kill()


def test_a_reused_pid_does_not_count(machine):
    (machine / "1").write_text(json.dumps({"cpus": [0, 1], "started": 12.0}))  # pid 1 is older
    assert threads.sharing() == 1
    assert not (machine / "1").exists()


def test_threads_set_by_hand_are_left_alone(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    other_process(machine, [0, 1, 2, 3]).kill()
    assert threads.fit() == 3
    assert not (machine / str(__import__("os").getpid())).exists()


def test_an_entry_point_is_registered_while_it_runs_only(machine):
    torch.set_num_threads(3)
    seen = []

    @threads.sharing_cores
    def work():
        seen.append((len(list(machine.iterdir())), torch.get_num_threads()))

    other = other_process(machine, [0, 1, 2, 3])
    try:
        work()
    finally:
        other.kill()
    assert seen == [(2, 2)]  # itself and the other; 4 cores shared by 2
    assert len(list(machine.iterdir())) == 1  # its own entry removed after
    assert torch.get_num_threads() == 3  # put back as it was
