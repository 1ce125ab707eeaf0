"""How a process that runs the network uses its CPUs and memory: as many torch threads as the CPUs it was
given, and a heap that keeps freed memory for the next batch. See docs/design.md, "Threads and memory"."""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h), and how much freed memory the heap may keep (both thresholds)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 1 << 30
# glibc gives each thread but the first an arena of its own, whose heaps stop at 64 MB: a larger block there is
# mapped from the kernel and unmapped when freed, whatever mallopt says. Ray runs rayad's work in such threads
# (Ray Data's map workers, Serve replicas, Ray Train's training function), so the Ray processes rayad starts
# get this environment (glibc reads it at start-up): one arena, the main one, for every thread.
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}


def use_cpus(threads: int | None) -> None:
    """Run torch on `threads` intra-op threads (None keeps torch's default) and keep freed memory."""
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to HEAP_KEEP_BYTES for reuse; True where it applies.

    By default glibc maps a large block (above a threshold that it adapts up to 32 MB) straight from the
    kernel and unmaps it when freed, and hands the top of the heap back once 128 KB or more of it is free.
    A batch's activations are such blocks, so each pass page-faults them in again. Kept, they made
    training 2-13% and offline scoring 6-27% faster on a 2-core EPYC, for up to 6% more peak memory, which
    the process then holds between batches (docs/benchmarks.md, "Threads and memory: the heap"). Other C libraries
    (musl, macOS) keep their own allocator: nothing to do.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):
        return False
    kept = all(libc.mallopt(param, HEAP_KEEP_BYTES) == 1 for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
    if not kept:
        log.warning("glibc refused mallopt(%d): freed memory goes back to the kernel", HEAP_KEEP_BYTES)
    return kept
