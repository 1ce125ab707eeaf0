"""Speed with glibc's default heap against rayad's (freed blocks kept for the next batch, rayad.cpu):
training images/s, scoring images/s at the offline batch, and as a Serve replica scores (batches of 1 to
16 images in random order), of the default network at 128², in fp32 and, where the CPU has bf16 units, bf16;
with --evaluate, the seconds `rayad evaluate` takes for a trained run (its test split already decoded).

    python benchmarks/heap.py [--seconds 6] [--rounds 2] [--threads N] [--evaluate RUN --data ROOT]

Each figure comes from a fresh process (a heap setting cannot be undone in a process); the two heaps take
turns, `--rounds` times, and each figure is the median of its turns. Prints the ratios, the absolute
figures, each process's peak memory and what it holds after the replica-like run, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from throughput import Bench, print_table, timed_rate

from rayad.artifact import AnomalyModel, Predictor, trained_category
from rayad.cli import count, duration, run_script
from rayad.cpu import keep_freed_memory
from rayad.data.demo import make_demo_dataset
from rayad.evaluate import evaluate
from rayad.precision import cpu_summary, native
from rayad.settings import PREDICT_BATCH, ServeSettings

HEAPS = ("glibc", "rayad")
SIZE, TRAIN_BATCH = 128, 16


def set_heap(heap: str, threads: int) -> None:
    if heap == "rayad" and not keep_freed_memory():
        raise SystemExit("this C library is not glibc: rayad keeps its heap as it is")
    torch.set_num_threads(threads)


def measure(precision: str, seconds: float, data_root: Path) -> dict[str, float]:
    """In this process: training, scoring and replica-like scoring images/s, the peak resident memory and
    the resident memory after the replica-like run (MB)."""
    bench = Bench(SIZE, TRAIN_BATCH, torch.device("cpu"), data_root)
    train = bench.train_rate(precision, seconds)
    cfg = bench.cfg.replace({"scoring.precision": precision, "scoring.tta": "none"})
    predictor = Predictor(AnomalyModel(bench.model.eval(), cfg.scoring), cfg, {}, "cpu")
    images = np.random.default_rng(0).integers(0, 256, (4 * PREDICT_BATCH, SIZE, SIZE, 3), np.uint8)
    score = timed_rate(lambda: predictor.predict_arrays(images), len(images), seconds, warmup=1)
    sizes, most = random.Random(0), ServeSettings().max_batch_size
    replica = timed_rate(lambda: predictor.predict_arrays(images[:sizes.randint(1, most)]), (1 + most) / 2, seconds)
    held = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"train": train, "score": score, "replica": replica, "held_mb": held,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_evaluate(run: Path, data_root: Path) -> dict[str, float]:
    """In this process: seconds of `evaluate` on the run's category, after a first call decoded the images."""
    predictor = Predictor.load(run)
    category = trained_category(predictor.metadata)
    evaluate(predictor, data_root, category)
    start = time.perf_counter()
    evaluate(predictor, data_root, category)
    return {"evaluate_s": time.perf_counter() - start}


def child(heap: str, precision: str, threads: int, seconds: float, data_root: Path,
          run: Path | None = None) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", heap, "--precision", precision, "--threads", str(threads),
            "--seconds", str(seconds), "--data", str(data_root), *(["--evaluate", str(run)] if run else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:  # its own error, not "returned non-zero exit status 1"
        sys.exit(f"heap.py: error: a measuring process failed: {(done.stderr.strip().splitlines() or ['-'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=duration, default=6.0, help="measuring time per figure")
    parser.add_argument("--rounds", type=count, default=2, help="turns of each heap")
    parser.add_argument("--threads", type=count, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--evaluate", type=Path, metavar="RUN", help="a trained run to evaluate as well")
    parser.add_argument("--data", type=Path, help="the dataset root of --evaluate's category")
    parser.add_argument("--child", choices=HEAPS, help=argparse.SUPPRESS)  # internal: one measuring process
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluate and not args.data:
        parser.error("--evaluate needs --data")
    if args.child:
        set_heap(args.child, args.threads)
        rates = measure_evaluate(args.evaluate, args.data) if args.evaluate else \
            measure(args.precision, args.seconds, args.data)
        print(json.dumps(rates))
        return
    precisions = ["fp32"] + (["bf16"] if native("bf16", "cpu") else [])
    runs = {(h, p): [] for p in precisions for h in HEAPS}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp), categories=("brick",), n_train=64, n_test_good=1, n_per_defect=1)
        evaluated = {h: [] for h in HEAPS}
        for _ in range(args.rounds):
            for key in runs:
                runs[key].append(child(*key, args.threads, args.seconds, root))
            for heap in evaluated if args.evaluate else ():
                evaluated[heap].append(child(heap, "fp32", args.threads, 0, args.data, args.evaluate)["evaluate_s"])
    median = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    print(f"\nmachine: {cpu_summary()}; torch {torch.__version__}; {args.threads} threads; 128², training "
          f"batch {TRAIN_BATCH}, scoring batch {PREDICT_BATCH}; median of {args.rounds} processes per figure")
    rows = []
    for p in precisions:
        glibc, rayad = median["glibc", p], median["rayad", p]
        for task in ("train", "score", "replica"):
            rows.append((p, task, f"{glibc[task]:.1f}", f"{rayad[task]:.1f}", f"{rayad[task] / glibc[task]:.2f}x"))
    print_table(("precision", "pass", "glibc's heap img/s", "rayad's heap img/s", "rayad / glibc"), rows)
    print()
    print_table(("precision", "peak MB, glibc / rayad", "MB held after the replica-like run, glibc / rayad"),
                [(p, f"{median['glibc', p]['peak_mb']:.0f} / {median['rayad', p]['peak_mb']:.0f}",
                  f"{median['glibc', p]['held_mb']:.0f} / {median['rayad', p]['held_mb']:.0f}") for p in precisions])
    if args.evaluate:
        glibc, rayad = (statistics.median(evaluated[h]) for h in HEAPS)
        print(f"\nevaluate {args.evaluate}: glibc's heap {glibc:.2f} s, rayad's {rayad:.2f} s ({glibc / rayad:.2f}x)")


if __name__ == "__main__":
    run_script(main)
