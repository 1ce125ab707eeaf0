"""rayad.cpu: torch threads from the CPUs a process was given, and a heap that keeps freed memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rayad
from rayad import cpu

# A block of MB megabytes allocated, written and freed 30 times in the main thread or in another one; prints
# the page faults of the last 10 rounds (the heap settles within the first few).
REALLOCATE = """
import resource, sys, threading, torch
from rayad.cpu import keep_freed_memory
mode, where, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "keep":
    assert keep_freed_memory()
def reallocate():
    for i in range(30):
        if i == 20:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(mb * 2**18).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if where == "thread":
    thread = threading.Thread(target=reallocate)
    thread.start()
    thread.join()
else:
    reallocate()
"""
GLIBC = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def _page_faults(mode: str, where: str = "main", mb: int = 64, env: dict | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {})
    out = subprocess.run([sys.executable, "-c", REALLOCATE, mode, where, str(mb)], check=True, capture_output=True,
                         text=True, env=env)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's heap only")
def test_a_freed_batch_is_reused_instead_of_faulted_in_again():
    """A 64 MB block: above glibc's largest adaptive mmap threshold (32 MB)."""
    default, kept = _page_faults("default"), _page_faults("keep")
    assert default > 10 * 2**26 / 4096 / 2, "glibc maps and unmaps a 64 MB block each time"
    assert kept < default / 20, (kept, default)


@pytest.mark.skipif(not GLIBC, reason="glibc's heap only")
def test_a_thread_keeps_its_freed_batch_only_in_one_arena():
    """A 96 MB block in a thread that is not the main one, as Ray runs rayad's work: its own arena cannot hold
    it, whatever mallopt says; with ONE_ARENA_ENV, which Ray's processes get from rayad, the main arena does."""
    own_arena, one_arena = (_page_faults("keep", "thread", 96, env) for env in (None, cpu.ONE_ARENA_ENV))
    assert own_arena > 10 * 96 * 2**20 / 4096 / 2, "a thread's own arena maps and unmaps a 96 MB block each time"
    assert one_arena < own_arena / 20, (one_arena, own_arena)


def test_other_c_libraries_keep_their_heap(monkeypatch):
    def no_glibc(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "confstr", no_glibc)
    cpu.keep_freed_memory.cache_clear()
    try:
        assert cpu.keep_freed_memory() is False
    finally:
        cpu.keep_freed_memory.cache_clear()


def test_use_cpus_sets_threads_only_when_given():
    threads = torch.get_num_threads()
    try:
        cpu.use_cpus(None)
        assert torch.get_num_threads() == threads
        cpu.use_cpus(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_every_process_sets_its_threads_through_use_cpus():
    """Training, Ray Train workers and trials, evaluate, predict, Ray Data actors and Serve replicas: one
    place sets the threads, so none of them misses the heap."""
    package = Path(rayad.__file__).parent
    callers = [p.relative_to(package) for p in package.rglob("*.py") if "set_num_threads(" in p.read_text()]
    assert callers == [Path("cpu.py")]
    users = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "use_cpus(" in p.read_text()}
    assert {"cli.py", "train/loop.py", "predict.py", "serve/app.py"} <= users
