"""Speed of the core: training and inference images/s, data loading vs training step, FLOP efficiency.

    python benchmarks/throughput.py [--sizes 128 256] [--batch-size 16] [--seconds 10]

Prints one table; every ratio is between numbers measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rayad.config import load_config
from rayad.corruption import Corruptor
from rayad.data.dataset import load_split, to_tensor
from rayad.data.demo import make_demo_dataset
from rayad.data.manifest import build_manifest
from rayad.models import create_model
from rayad.train.loop import batch_indices, make_optimizer, step_generator, train_step


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


def matmul_peak_gflops(device: torch.device, seconds: float) -> float:
    """Achieved fp32 GEMM GFLOP/s on large square matrices: the practical peak of this machine."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return timed_rate(lambda: a @ b, 2 * n**3, seconds) / 1e9


def model_gflops(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward GFLOPs per image (conv and matmul FLOPs, counted by torch)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, size, size, device=device))
    return counter.get_total_flops() / 1e9


def bench_size(size: int, batch_size: int, seconds: float, device: torch.device, data_root: Path) -> dict:
    cfg = load_config(overrides={"data.image_size": size, "train.batch_size": batch_size})
    train = load_split(build_manifest(data_root, "brick", cfg.data), "train", size)
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device, memory_format=torch.channels_last)
    optimizer, corruptor = make_optimizer(model, cfg.train), Corruptor(cfg.corruption)
    n, step = len(train.images), iter(range(10**9))

    def load_batch():
        return to_tensor(train.images[batch_indices(n, batch_size, next(step), 0)]).to(device)

    def one_train_step():
        s = next(step)
        train_step(model, optimizer, corruptor, load_batch(), step_generator(0, s, device), cfg.train, s)

    x = load_batch().contiguous(memory_format=torch.channels_last)
    corrupt_rate = timed_rate(lambda: corruptor(x, step_generator(0, 0, device)), batch_size, seconds / 2)
    model.train()
    train_rate = timed_rate(one_train_step, batch_size, seconds)
    model.eval()
    with torch.no_grad():
        infer_rate = timed_rate(lambda: model(x), batch_size, seconds)
    gflops = model_gflops(model, size, device)
    return {"size": size, "train": train_rate, "infer": infer_rate, "load": timed_rate(load_batch, batch_size, 1),
            "corrupt": corrupt_rate, "gflops": gflops, "achieved": gflops * infer_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per figure")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp), categories=("brick",))
        peak = matmul_peak_gflops(device, args.seconds / 2)
        rows = [bench_size(s, args.batch_size, args.seconds, device, root) for s in args.sizes]
    print(f"\nmachine: {machine}; torch {torch.__version__}; batch {args.batch_size}; "
          f"fp32 GEMM peak {peak:.1f} GFLOP/s")
    header = ("size", "train img/s", "infer img/s", "load img/s", "load/train", "corrupt img/s",
              "GFLOPs/img", "infer GFLOP/s", "infer/peak")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (f"{r['size']}²", f"{r['train']:.1f}", f"{r['infer']:.1f}", f"{r['load']:.0f}",
                 f"{r['load'] / r['train']:.0f}x", f"{r['corrupt']:.0f}", f"{r['gflops']:.2f}",
                 f"{r['achieved']:.1f}", f"{r['achieved'] / peak:.0%}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
