"""Ablation on the demo data: what structured corruption and convex skips buy, at an equal training budget.

    python benchmarks/ablation.py [--steps N] [--categories brick grass gravel] [--out runs/ablation]

Variants (all SDC-CCM-sized networks, same steps, batch, schedule and seed):
  ssae      SDC-CCM + structured corruption (the method)
  plain_ae  the same network, no corruption (a plain autoencoder)
  dae       the same network, i.i.d. Gaussian noise on the input (a classic denoising autoencoder)
  sdc_ae    no skips (skip=none) + structured corruption
Finished runs in --out (per step count) are reused, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rayad.artifact import METADATA, Predictor
from rayad.cli import count, run_script
from rayad.config import load_config
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.evaluate import evaluate
from rayad.precision import cpu_summary
from rayad.train import fit
from rayad.train.checkpoint import latest_checkpoint

VARIANTS = {
    "ssae": {},
    "plain_ae": {"corruption.kind": "none"},
    "dae": {"corruption.kind": "gaussian"},
    "sdc_ae": {"model.skip": "none"},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_variant(name: str, category: str, steps: int, data_root: Path, out: Path) -> dict:
    run = out / f"steps_{steps}" / name / category  # a finished run is reused only for the same budget
    start = time.perf_counter()
    if not (run / METADATA).is_file():
        cfg = load_config(overrides={**VARIANTS[name], "train.steps": steps})
        stopped = latest_checkpoint(run / "checkpoints") is not None  # an interrupted benchmark goes on
        fit(cfg, data_root, category, run, resume=stopped, progress=False)
    metrics = evaluate(Predictor.load(run), data_root, category)
    return {k: metrics[k] for k in METRICS} | {"seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=count, default=load_config().train.steps)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    data_root = args.out / "data"
    missing = tuple(c for c in args.categories if not (data_root / c).is_dir())
    if missing:
        make_demo_dataset(data_root, categories=missing)
    results = {v: {c: run_variant(v, c, args.steps, data_root, args.out) for c in args.categories}
               for v in args.variants}
    (args.out / f"results_{args.steps}.json").write_text(json.dumps(results, indent=2))
    print(f"\nablation, {args.steps} steps per run, demo data; machine: {cpu_summary()}")
    print_table(results, args.categories)


def print_table(results: dict, categories: list[str]) -> None:
    cols = [f"{c} {m}" for c in categories for m in ("img", "pix", "pro")] + ["mean img", "mean pix", "mean pro",
                                                                               "minutes"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for variant, per_cat in results.items():
        cells = [per_cat[c][m] for c in categories for m in METRICS]
        means = [sum(per_cat[c][m] for c in categories) / len(categories) for m in METRICS]
        minutes = sum(per_cat[c]["seconds"] for c in categories) / 60
        print(f"| {variant} | " + " | ".join(f"{v:.3f}" for v in cells + means) + f" | {minutes:.1f} |")


if __name__ == "__main__":
    run_script(main)
