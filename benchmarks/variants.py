"""Configuration study on the demo data: what the validation set sees against what the test split shows.

    python benchmarks/variants.py --variant base --variant long train.steps=1500 \
        --variant s4 scoring.sigma=4 [--categories grass] [--out runs/variants] [--validation-only] \
        [--val-images 243]

Each `--variant NAME [key=value ...]` is the default config with those overrides. Variants that differ
only in `scoring.*` keys share one trained model (scoring is applied to its reconstructions), so scoring
rules cost no training. Per variant and category it prints the validation metrics (what model selection
sees), then, unless --validation-only, the test metrics with the 95% bootstrap interval of image AUROC, the
image AUROC of the thin defects, the generalisation gap (median score of good test images over that of good
validation images: 1.0 when held-out good images look like unseen ones), the raw-pixel nearest-neighbour
baseline's test image AUROC, and the budget (steps, minutes of training). Finished runs are reused.
Choose on the validation columns; the test columns are for the variants you report.

`--val-images N` scores the validation columns on a larger draw: N held-out good images of the same
validation tiles (and their painted copies), from a second build of the demo data whose training and first
validation images are the standard build's; models still train and calibrate on the standard build. It
adds each variant's validation image AUROC minus the first variant's, with a 95% paired bootstrap interval
(the same images resampled for both): a difference whose interval holds 0 does not rank the two. Take N
not a multiple of 5 (e.g. 243): the painted copies take the ten defect kinds in turn, so with N a multiple
of 10 each good image would carry one kind only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from rayad.artifact import Predictor
from rayad.baselines import nearest_neighbour_metrics
from rayad.cli import run_script
from rayad.config import load_config, parse_overrides
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.data.manifest import MIN_VAL_IMAGES
from rayad.evaluate import evaluate
from rayad.layout import METADATA
from rayad.metrics import compute_metrics
from rayad.metrics.auroc import auroc
from rayad.metrics.bootstrap import bootstrap_ci
from rayad.precision import cpu_summary
from rayad.train import fit
from rayad.train.checkpoint import latest_checkpoint
from rayad.validation import load_validation

THIN = ("crack", "scratch", "fine_crack")
BROAD = ("faint", "broad_stain", "dark_region", "missing")


def trained(overrides: dict, category: str, data_root: Path, out: Path) -> tuple[Predictor, float]:
    """The model of `overrides` without its scoring keys (trained once, reused), and its training minutes."""
    training = {k: v for k, v in sorted(overrides.items()) if not k.startswith("scoring.")}
    run = out / hashlib.sha1(json.dumps(training).encode()).hexdigest()[:10] / category
    if not (run / METADATA).is_file():
        start = time.perf_counter()
        stopped = latest_checkpoint(run / "checkpoints") is not None  # an interrupted benchmark goes on
        fit(load_config(overrides=training), data_root, category, run, resume=stopped, progress=False)
        (run / "minutes.txt").write_text(f"{(time.perf_counter() - start) / 60:.2f}")
    return Predictor.load(run), float((run / "minutes.txt").read_text())


def study(overrides: dict, category: str, data_root: Path, val_root: Path, out: Path, with_test: bool) -> dict:
    predictor, minutes = trained(overrides, category, data_root, out)
    predictor.config = predictor.config.replace({k: v for k, v in overrides.items() if k.startswith("scoring.")})
    predictor.model.scoring = predictor.config.scoring
    vset = load_validation(predictor.config, val_root, category)
    tta = predictor.resolve_tta(vset.images[vset.labels == 0])["choice"]  # as calibration settles `auto`
    cfg = predictor.config
    preds = predictor.predict_arrays(vset.images)  # scored as rayad.validation.validation_metrics scores
    val = compute_metrics(preds.scores, vset.labels, None, preds.maps, vset.masks if vset.has_masks else None,
                          n_boot=0)
    row = {"val_image_auroc": val["image_auroc"], "val_aupro": val["aupro"], "tta": tta,
           "val_scores": preds.scores, "val_labels": vset.labels,
           "steps": cfg.train.steps, "minutes": minutes,
           "precision": predictor.metadata.get("precision", {}).get("train", {}).get("precision")}
    if not with_test:
        return row
    test = evaluate(predictor, data_root, category)
    val_good = preds.scores[vset.labels == 0]
    test_good = np.asarray(test["scores"])[np.asarray(test["labels"]) == 0]
    per_defect = test["per_defect"]
    return {**row, **{k: test[k] for k in ("image_auroc", "image_auroc_ci", "pixel_auroc", "aupro")},
            "thin": float(np.mean([per_defect[k]["image_auroc"] for k in THIN if k in per_defect])),
            "broad": float(np.mean([per_defect[k]["image_auroc"] for k in BROAD if k in per_defect])),
            "good_gap": float(np.median(test_good) / np.median(val_good)),
            "per_defect": {k: v["image_auroc"] for k, v in per_defect.items()}}


def paired_differences(results: dict) -> None:
    """Add `val_diff` (validation image AUROC minus the first variant's) and `val_diff_ci` to every row."""
    first = next(iter(results.values()))
    for per_category in results.values():
        for category, row in per_category.items():
            ref, labels = first[category]["val_scores"], row["val_labels"]
            row["val_diff"] = auroc(row["val_scores"], labels) - auroc(ref, labels)
            row["val_diff_ci"] = bootstrap_ci(lambda s, r, y: auroc(s, y) - auroc(r, y),
                                              (row["val_scores"], ref, labels), labels)


def fmt(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    if key == "image_auroc_ci":
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    if key == "val_diff_ci":
        return f"[{value[0]:+.3f}, {value[1]:+.3f}]"
    if key == "val_diff":
        return f"{value:+.3f}"
    return f"{value:.2f}" if key == "minutes" else str(value) if isinstance(value, int | str) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [key=value]")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--out", type=Path, default=Path("runs/variants"))
    parser.add_argument("--validation-only", action="store_true", help="skip the test split")
    parser.add_argument("--val-images", type=int, metavar="N",
                        help="validate on N held-out good images of a second build (and their painted copies)")
    args = parser.parse_args()
    if args.val_images is not None and args.val_images < MIN_VAL_IMAGES:  # none: validation was carved from train
        parser.error(f"--val-images {args.val_images}: must be >= {MIN_VAL_IMAGES}")
    data_root = args.out / "data"
    val_root = data_root if args.val_images is None else args.out / f"data-val{args.val_images}"
    for root, n_val in ((data_root, None), (val_root, args.val_images)):
        if not all((root / c).is_dir() for c in args.categories):
            make_demo_dataset(root, n_val=n_val)
    for _, *sets in args.variant:  # every variant's overrides are checked before any training
        load_config(overrides=parse_overrides(sets))
    results = {name: {c: study(parse_overrides(sets), c, data_root, val_root, args.out, not args.validation_only)
                      for c in args.categories} for name, *sets in args.variant}
    paired_differences(results)
    for per_category in results.values():
        for row in per_category.values():
            del row["val_scores"], row["val_labels"]
    baseline = {} if args.validation_only else {c: nearest_neighbour_metrics(data_root, c) for c in args.categories}
    (args.out / "results.json").write_text(json.dumps({"variants": results, "nearest_neighbour": {
        c: {k: m[k] for k in ("image_auroc", "image_auroc_ci", "pixel_auroc", "aupro")} for c, m in baseline.items()}},
        indent=2))
    print(f"machine: {cpu_summary()}")
    columns = ["val_image_auroc", "val_diff", "val_diff_ci", "val_aupro"]
    if not args.validation_only:
        columns += ["image_auroc", "image_auroc_ci", "pixel_auroc", "aupro", "thin", "broad", "good_gap", "nn_auroc"]
    columns += ["tta", "steps", "minutes", "precision"]
    print("| variant | category | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, per_category in results.items():
        for category, row in per_category.items():
            row = {**row, "nn_auroc": baseline[category]["image_auroc"] if baseline else None}
            print(f"| {name} | {category} | " + " | ".join(fmt(row, k) for k in columns) + " |")
    if not args.validation_only:
        print_per_defect(results, baseline)


def print_per_defect(results: dict, baseline: dict) -> None:
    """Test image AUROC per defect kind: each variant, then the nearest neighbour."""
    kinds = sorted({k for per_category in results.values() for row in per_category.values() for k in row["per_defect"]})
    print("\n| variant | category | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 2) + "|")
    rows = [(name, c, row["per_defect"]) for name, per_category in results.items() for c, row in per_category.items()]
    rows += [("nearest neighbour", c, {k: v["image_auroc"] for k, v in m["per_defect"].items()})
             for c, m in baseline.items()]
    for name, category, per in rows:
        print(f"| {name} | {category} | " + " | ".join(f"{per[k]:.3f}" if k in per else "n/a" for k in kinds) + " |")


if __name__ == "__main__":
    run_script(main)
