"""Raw-pixel nearest-neighbour baseline on any dataset rayad reads (`rayad.baselines`).

    python benchmarks/baselines.py --data ROOT [--categories a,b] [--size 32] [--layout auto] [--json out.json]

Per category: image AUROC with its 95 % bootstrap interval, pixel AUROC and AUPRO, overall and per defect
type, of scoring each test image by its L2 distance to the nearest training image at `size`² grayscale.
Then the mean over categories, the machine and the wall time. Without --categories, every folder of ROOT.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from rayad.baselines import SIZE, format_table, nearest_neighbour_metrics
from rayad.cli import run_script
from rayad.config import LAYOUTS
from rayad.precision import cpu_summary


def categories_of(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "split_csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root")
    parser.add_argument("--categories", help="comma-separated (default: every folder of ROOT)")
    parser.add_argument("--size", type=int, default=SIZE, help="side of the grayscale copies compared")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    args = parser.parse_args()
    start = time.perf_counter()
    categories = args.categories.split(",") if args.categories else categories_of(args.data)
    results = {}
    for category in categories:
        results[category] = nearest_neighbour_metrics(args.data, category, args.size, args.layout)
        print(format_table(category, results[category]), end="\n\n", flush=True)
    means = {k: np.mean([m[k] for m in results.values() if m[k] is not None] or [np.nan])
             for k in ("image_auroc", "pixel_auroc", "aupro")}
    print("mean over categories: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_summary()}, {cores} cores; wall time {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_script(main)
