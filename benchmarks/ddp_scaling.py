"""Ray Train scaling: 1 vs N workers, Ray Train (1 worker) vs the plain loop, time to first step.

    python benchmarks/ddp_scaling.py [--steps 80] [--workers 2] [--address ADDR] [--gpu]

Every figure comes from this run on this machine: images/s exclude the first step (warm-up); time to first
step counts from the training call (Ray start-up, worker group, data loading) to the end of step one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray
import torch

from rayad.cli import run_script
from rayad.cluster import Cluster
from rayad.config import load_config
from rayad.cpu import use_cpus
from rayad.data.demo import make_demo_dataset
from rayad.layout import METADATA
from rayad.precision import cpu_summary
from rayad.train import fit
from rayad.train.ray_train import fit_distributed


def train_info(run: Path) -> dict:
    return json.loads((run / METADATA).read_text())["train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--workers", type=int, default=2, help="the scaled-out worker count")
    parser.add_argument("--address", help="an existing Ray cluster (default: a local one)")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: images/s leave out the first step (warm-up)")
    if args.workers < 2:
        parser.error(f"--workers {args.workers}: must be at least 2 (the table compares them with 1 worker)")
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // args.workers)  # each worker gets its share of the cores
    cfg = load_config(overrides={"train.steps": args.steps, "train.log_every": 10,
                                 "train.checkpoint_every": args.steps, "train.num_threads": threads})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp) / "data", categories=("brick",))
        use_cpus(threads)
        rows["plain loop, 1 process"] = train_info(fit(cfg, root, "brick", Path(tmp) / "plain", progress=False))
        for workers in (1, args.workers):
            cluster = Cluster(workers=workers, use_gpu=args.gpu, cpus_per_worker=cpus / args.workers,
                              threads_per_worker=threads, address=args.address)
            run = fit_distributed(cfg, root, "brick", Path(tmp) / f"ray{workers}", cluster, progress=False)
            rows[f"Ray Train, {workers} worker(s)"] = train_info(run)
    ray.shutdown()
    plain, one, many = (rows[k]["images_per_s"] for k in rows)
    machine = torch.cuda.get_device_name() if args.gpu else f"{cpu_summary()}, {cpus} cores"
    precision = ", ".join(f"{name}: {info['precision']} ({info['precision_reason']})" for name, info in rows.items())
    print(f"\nmachine: {machine}; {args.steps} steps, batch {cfg.train.batch_size} per worker, "
          f"{threads} torch thread(s) per worker, image {cfg.data.image_size}²; precision {precision}")
    print("| run | images/s | s to first step |")
    print("|---|---|---|")
    for name, info in rows.items():
        print(f"| {name} | {info['images_per_s']:.1f} | {info['seconds_to_first_step']:.1f} |")
    print("\n| ratio | value |\n|---|---|")
    print(f"| Ray Train 1 worker / plain loop | {one / plain:.2f} |")
    print(f"| {args.workers} workers / 1 worker | {many / one:.2f} |")


if __name__ == "__main__":
    run_script(main)
