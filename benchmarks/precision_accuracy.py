"""The same trained models scored in fp32 and in bf16: how far scores move and what that does to the metrics.

    python benchmarks/precision_accuracy.py RUN_DIR [RUN_DIR ...] --data DEMO_ROOT

Each RUN_DIR is a model artifact trained on the category named by its folder. Prints, per model, the largest
image-score difference relative to the threshold, the image labels that flip, and image AUROC, pixel AUROC
and AUPRO on the test split in both precisions, with the CPU named. `scoring.precision: auto` may pick bf16
only where these differences stay within 0.005 AUROC.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rayad.artifact import Predictor
from rayad.cli import run_script
from rayad.evaluate import evaluate
from rayad.precision import cpu_summary

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def compare(run: Path, data_root: Path) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor.load(run, device="cpu", precision=precision)
        start = time.perf_counter()
        out[precision] = evaluate(predictor, data_root, run.name)
        out[f"{precision}_s"] = time.perf_counter() - start
    fp32, bf16 = (np.asarray(out[p]["scores"]) for p in ("fp32", "bf16"))
    threshold = out["fp32"]["threshold"]
    return {"category": run.name, "max_rel_diff": float(np.abs(bf16 - fp32).max() / threshold),
            "flipped": int(np.sum((fp32 >= threshold) != (bf16 >= threshold))), "n": len(fp32),
            **{f"{m}_{p}": out[p][m] for m in METRICS for p in ("fp32", "bf16")},
            "seconds_fp32": out["fp32_s"], "seconds_bf16": out["bf16_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    rows = [compare(run, args.data) for run in args.runs]
    print(f"machine: {cpu_summary()}")
    print("| category | max abs score diff / threshold | labels flipped | " + " | ".join(
        f"{m} fp32 / bf16 (diff)" for m in METRICS) + " | evaluate s fp32 / bf16 |")
    print("|---" * (4 + len(METRICS)) + "|")
    for r in rows:
        cells = " | ".join(f"{r[f'{m}_fp32']:.4f} / {r[f'{m}_bf16']:.4f} ({r[f'{m}_bf16'] - r[f'{m}_fp32']:+.4f})"
                           for m in METRICS)
        print(f"| {r['category']} | {r['max_rel_diff']:.2e} | {r['flipped']} of {r['n']} | {cells} | "
              f"{r['seconds_fp32']:.1f} / {r['seconds_bf16']:.1f} |")


if __name__ == "__main__":
    run_script(main)
