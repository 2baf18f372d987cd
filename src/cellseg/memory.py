"""glibc's memory allocator, told what cellseg's runs need: training keeps the memory it frees
for the next step (:func:`keep_freed_memory`); block-wise prediction hands each block's back
(:func:`give_back_memory`). Elsewhere than glibc both do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def glibc(name: str):
    """The C library's function ``name``, or None where the library is not glibc."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory PyTorch frees for the next training step.

    By default glibc hands free memory at the top of its heap back to the system once 128 KiB
    or more is free, so every step faults the pages of its activations in again (measured here:
    twice the page faults and kernel time of a run with this, about 10 % of a 64x64 step). A
    high trim threshold keeps them; the mmap threshold is pinned at glibc's own maximum (32 MiB)
    because setting either turns glibc's adaptive thresholds off. Peak memory is the same; the
    process does not shrink after it. Returns False (logged) where the C library is not glibc.
    """
    mallopt = glibc("mallopt")
    if mallopt is None:
        log.info("keep_freed_memory: no glibc mallopt here; the memory allocator is left as is")
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if mallopt(m_mmap_threshold, 32 * 2**20) and mallopt(m_trim_threshold, 2**30):
        return True
    log.warning("keep_freed_memory: glibc refused mallopt; the memory allocator is left as is")
    return False


def give_back_memory() -> None:
    """Hand freed memory back to the system (glibc's ``malloc_trim``): worker threads each keep
    a malloc arena, and without this a long block-wise run's resident memory creeps up with the
    blocks done, not with their size."""
    trim = glibc("malloc_trim")
    if trim is not None:
        trim(0)
