"""Speed of the core in fp32 and bf16: training and inference images/s, matmul peaks, data loading, the
corruption and its share of a training step, threads per process, and torch.compile.

    python benchmarks/throughput.py [--sizes 128 256] [--batch-size 16] [--seconds 10] [--no-compile]

Prints tables whose ratios are between numbers measured in this run on this machine, which it names
(CPU model and its bf16 flags, torch version, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rayad.artifact import compile_network
from rayad.cli import count, duration, run_script
from rayad.config import load_config
from rayad.corruption import Corruptor
from rayad.cpu import keep_freed_memory, use_cpus
from rayad.data.dataset import load_split, to_tensor
from rayad.data.demo import make_demo_dataset
from rayad.data.manifest import build_manifest
from rayad.models import create_model
from rayad.precision import DTYPES, autocast, cpu_summary
from rayad.train.loop import batch_indices, make_optimizer, step_generator, train_step

PRECISIONS = ("fp32", "bf16")


def timed_rate(fn, items_per_call: int, seconds: float, warmup: int = 2) -> float:
    """Items per second of `fn`, after `warmup` calls, over at least `seconds` (and 3 calls)."""
    for _ in range(warmup):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync()
    return calls * items_per_call / (time.perf_counter() - start)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_gflops(device: torch.device, precision: str, seconds: float) -> float:
    """Achieved GEMM GFLOP/s on large square matrices in `precision`: the practical peak of this machine."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[precision]) for _ in range(2))
    return timed_rate(lambda: a @ b, 2 * n**3, seconds) / 1e9


def model_gflops(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward GFLOPs per image (conv and matmul FLOPs, counted by torch)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, size, size, device=device))
    return counter.get_total_flops() / 1e9


class Bench:
    """The default network at one input size, with a batch source, a training step and inference."""

    def __init__(self, size: int, batch_size: int, device: torch.device, data_root: Path):
        self.cfg = load_config(overrides={"data.image_size": size, "train.batch_size": batch_size})
        self.train = load_split(build_manifest(data_root, "brick", self.cfg.data), "train", size)
        torch.manual_seed(0)
        self.model = create_model(self.cfg.model).to(device, memory_format=torch.channels_last)
        self.optimizer, self.corruptor = make_optimizer(self.model, self.cfg.train), Corruptor(self.cfg.corruption)
        self.size, self.batch_size, self.device, self.steps = size, batch_size, device, iter(range(10**9))

    def batch(self) -> torch.Tensor:
        idx = batch_indices(len(self.train.images), self.batch_size, next(self.steps), 0)
        return to_tensor(self.train.images[idx]).to(self.device)

    def train_rate(self, precision: str, seconds: float, model=None, warmup: int = 2) -> float:
        model = self.model if model is None else model
        model.train()

        def step():
            s = next(self.steps)
            train_step(model, self.optimizer, self.corruptor, self.batch(), step_generator(0, s, self.device),
                       self.cfg.train, s, precision)
        return timed_rate(step, self.batch_size, seconds, warmup)

    def infer_rate(self, precision: str, seconds: float, model=None, warmup: int = 2) -> float:
        model = self.model if model is None else model
        model.eval()
        x = self.batch().contiguous(memory_format=torch.channels_last)

        def forward():
            with torch.no_grad(), autocast(precision, self.device):
                model(x)
        return timed_rate(forward, self.batch_size, seconds, warmup)


def bench_size(size: int, batch_size: int, seconds: float, device: torch.device, data_root: Path) -> dict:
    bench = Bench(size, batch_size, device, data_root)
    x = bench.batch()
    row = {"size": size, "gflops": model_gflops(bench.model, size, device),
           "load": timed_rate(bench.batch, batch_size, 1),
           "corrupt": timed_rate(lambda: bench.corruptor(x, step_generator(0, 0, device)), batch_size, seconds / 2)}
    for mode, rate_of in (("train", bench.train_rate), ("infer", bench.infer_rate)):
        rates = interleaved({p: lambda secs, warmup, p=p, rate_of=rate_of: rate_of(p, secs, warmup=warmup)
                             for p in PRECISIONS}, seconds)
        row.update({f"{mode}_{p}": rate for p, rate in rates.items()})
    return row


def interleaved(rate_fns: dict, seconds: float, rounds: int = 3) -> dict[str, float]:
    """The median rate of each `rate_fns[key](seconds, warmup)` over `rounds` alternating turns of
    seconds/rounds each (warm-up calls in the first turn only), so that a drift in the machine's speed
    (other tenants, clocks) hits every key alike."""
    turns = {key: [] for key in rate_fns}
    for turn in range(rounds):
        for key, fn in rate_fns.items():
            turns[key].append(fn(seconds / rounds, 2 if turn == 0 else 0))
    return {key: statistics.median(rates) for key, rates in turns.items()}


def compile_rows(batch_size: int, seconds: float, device: torch.device, data_root: Path) -> list[dict]:
    """torch.compile (inductor) against eager at 128²: speed-up and the time the first compiled call takes.
    Inference compiles as `scoring.compile` does (rayad.artifact.compile_network), training with defaults."""
    rows = []
    for mode in ("infer", "train"):
        for p in PRECISIONS:
            bench = Bench(128, batch_size, device, data_root)
            eager = getattr(bench, f"{mode}_rate")(p, seconds)
            compiled = compile_network(bench.model, device) if mode == "infer" else torch.compile(bench.model)
            start = time.perf_counter()
            getattr(bench, f"{mode}_rate")(p, 0, compiled)  # warm-up calls compile; 3 timed calls follow
            compile_s = time.perf_counter() - start
            rate = getattr(bench, f"{mode}_rate")(p, seconds, compiled)
            rows.append({"mode": mode, "precision": p, "eager": eager, "compiled": rate, "compile_s": compile_s})
    return rows


def concurrent_training(seconds: float, precision: str) -> dict[str, float]:
    """Images/s of one training process with 2 threads against two at once with 1 thread each."""
    def launch(threads: int) -> subprocess.Popen:
        argv = [sys.executable, __file__, "--train-worker", str(threads), "--seconds", str(seconds),
                "--precision", precision]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def rate(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate()
        return json.loads(out.strip().splitlines()[-1])["images_per_s"]

    one = rate(launch(2))
    pair = [launch(1), launch(1)]
    both = [rate(p) for p in pair]
    return {"one_2_threads": one, "two_1_thread_each": both}


def train_worker(threads: int, seconds: float, precision: str) -> None:
    use_cpus(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp), categories=("brick",), n_train=32, n_test_good=1, n_per_defect=1)
        bench = Bench(128, 16, torch.device("cpu"), root)
        print(json.dumps({"images_per_s": bench.train_rate(precision, seconds)}))


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_summary()}, {torch.get_num_threads()} threads"


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch-size", type=count, default=16)
    parser.add_argument("--seconds", type=duration, default=10.0, help="measuring time per figure")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--train-worker", type=int, help=argparse.SUPPRESS)  # internal: one training process
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        return train_worker(args.train_worker, args.seconds, args.precision)
    keep_freed_memory()  # as every rayad process that trains or scores (benchmarks/heap.py compares)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp), categories=("brick",))
        peak = {p: matmul_peak_gflops(device, p, args.seconds / 2) for p in PRECISIONS}
        rows = [bench_size(s, args.batch_size, args.seconds, device, root) for s in args.sizes]
        compiled = [] if args.no_compile else compile_rows(args.batch_size, args.seconds, device, root)
    threads = concurrent_training(args.seconds, "fp32") if device.type == "cpu" else None

    print(f"\nmachine: {machine()}; torch {torch.__version__}; batch {args.batch_size}; GEMM peak "
          f"fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s ({peak['bf16'] / peak['fp32']:.2f}x)")
    print_table(("size", "precision", "train img/s", "infer img/s", "infer GFLOP/s", "infer/peak"),
                [(f"{r['size']}²", p, f"{r[f'train_{p}']:.1f}", f"{r[f'infer_{p}']:.1f}",
                  f"{r['gflops'] * r[f'infer_{p}']:.0f}", f"{r['gflops'] * r[f'infer_{p}'] / peak[p]:.0%}")
                 for r in rows for p in PRECISIONS])
    print()
    print_table(("size", "bf16/fp32 train", "bf16/fp32 infer", "GFLOPs/img", "load img/s", "load/train fp32",
                 "corrupt img/s", "corruption's share of a step, fp32 / bf16"),
                [(f"{r['size']}²", f"{r['train_bf16'] / r['train_fp32']:.2f}x",
                  f"{r['infer_bf16'] / r['infer_fp32']:.2f}x", f"{r['gflops']:.2f}", f"{r['load']:.0f}",
                  f"{r['load'] / r['train_fp32']:.0f}x", f"{r['corrupt']:.0f}",
                  f"{r['train_fp32'] / r['corrupt']:.0%} / {r['train_bf16'] / r['corrupt']:.0%}") for r in rows])
    if compiled:
        print()
        print_table(("128²", "precision", "eager img/s", "compiled img/s", "speed-up", "first call s"),
                    [(c["mode"], c["precision"], f"{c['eager']:.1f}", f"{c['compiled']:.1f}",
                      f"{c['compiled'] / c['eager']:.2f}x", f"{c['compile_s']:.0f}") for c in compiled])
        infer = {c["precision"]: c["compiled"] for c in compiled if c["mode"] == "infer"}
        gflops = next((r["gflops"] for r in rows if r["size"] == 128), None)
        if gflops:
            print(f"compiled inference: bf16/fp32 {infer['bf16'] / infer['fp32']:.2f}x; bf16 at "
                  f"{gflops * infer['bf16'] / peak['bf16']:.0%} of the bf16 peak, fp32 at "
                  f"{gflops * infer['fp32'] / peak['fp32']:.0%} of the fp32 one")
    if threads:
        both = threads["two_1_thread_each"]
        print(f"\ntraining 128² fp32 on {os.cpu_count()} cores: one process with 2 threads "
              f"{threads['one_2_threads']:.1f} img/s; two at once with 1 thread each {both[0]:.1f} + {both[1]:.1f} "
              f"= {sum(both):.1f} img/s")


if __name__ == "__main__":
    run_script(main)
