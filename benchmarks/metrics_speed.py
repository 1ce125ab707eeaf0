"""Speed of the test-set metrics that `rayad evaluate` computes, with one sort of the pixels or one per metric.

    python benchmarks/metrics_speed.py [--images 310] [--sizes 128 256] [--defect-types 5] [--repeats 3]

A synthetic test split shaped like the demo's (a sixth of the images good, the rest spread over defect types,
anomaly maps of float32 at size², a square defect region per defective image). "one sort" is
`compute_metrics(..., curves=True)`: the pixels are ranked once, and every pixel metric (AUROC, AUPRO, the
curves; of all images and of each defect type) takes its ranking from it. "a sort per metric" computes the same
dictionary with each metric sorting its own pixels, as rayad did before; both must agree to the bit. Prints
the best of `repeats` wall times per size, their ratio and the machine.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import numpy as np

from rayad.cli import count, run_script
from rayad.metrics import aupro, auroc, auroc_ci, compute_metrics, f1_max, pixel_auroc_ci, pixel_curves
from rayad.precision import cpu_summary


def synthetic_split(images: int, size: int, defect_types: int, seed: int = 0):
    """(scores, labels, types, maps, masks) of a split with images // 6 good images."""
    rng = np.random.default_rng(seed)
    good = images // 6
    types = ["good"] * good + [f"defect{i % defect_types}" for i in range(images - good)]
    labels = np.array([t != "good" for t in types], dtype=np.int64)
    masks = np.zeros((images, size, size), dtype=bool)
    side = size // 8
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - side, size=2)
        masks[i, y:y + side, x:x + side] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.5 * masks).astype(np.float32)
    scores = maps.reshape(images, -1).max(axis=1).astype(np.float64)
    return scores, labels, types, maps, masks


def sort_per_metric(scores, labels, types, maps, masks) -> dict:
    """compute_metrics(..., curves=True) with every metric sorting its own values."""
    def metrics(s, lab, m, k):
        return {"image_auroc": auroc(s, lab), "pixel_auroc": auroc(m, k), "aupro": aupro(m, k),
                "f1_max": f1_max(s, lab)[0], "n_images": int(len(lab))}

    out = metrics(scores, labels, maps, masks)
    out |= {"image_auroc_ci": auroc_ci(scores, labels), "pixel_auroc_ci": pixel_auroc_ci(maps, masks),
            "pixel_curves": pixel_curves(maps, masks), "per_defect": {}}
    kinds = np.asarray(types)
    for defect in sorted(set(types) - {"good"}):
        subset = (labels == 0) | (kinds == defect)
        out["per_defect"][defect] = metrics(scores[subset], labels[subset], maps[subset], masks[subset])
    return out


def best_time(fn, split: tuple, repeats: int) -> tuple[float, dict]:
    """Best wall time of `fn(*split)` over `repeats` calls, and its result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*split)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=count, default=310, help="test images (the demo's brick split has 310)")
    parser.add_argument("--sizes", type=count, nargs="+", default=[128, 256])
    parser.add_argument("--defect-types", type=count, default=5)
    parser.add_argument("--repeats", type=count, default=3)
    args = parser.parse_args()
    print("| size | pixels | one sort s | a sort per metric s | speed-up |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        split = synthetic_split(args.images, size, args.defect_types)
        one, shared = best_time(partial(compute_metrics, curves=True), split, args.repeats)
        per, separate = best_time(sort_per_metric, split, args.repeats)
        if shared != separate:
            raise SystemExit("metrics_speed: the two ways gave different metrics")
        print(f"| {size}² | {split[3].size / 1e6:.1f} M | {one:.2f} | {per:.2f} | {per / one:.2f}x |", flush=True)
    print(f"\nmachine: {cpu_summary()}, {len(os.sched_getaffinity(0))} cores; numpy {np.__version__}; "
          f"{args.images} images, {args.defect_types} defect types, "
          f"best of {args.repeats}")


if __name__ == "__main__":
    run_script(main)
