"""Configuration study on the demo data: what the validation set sees against what the test split shows.

    python benchmarks/variants.py --variant base --variant long train.steps=1500 \
        --variant s4 scoring.sigma=4 [--categories grass] [--out runs/variants] [--validation-only]

Each `--variant NAME [key=value ...]` is the default config with those overrides. Variants that differ
only in `scoring.*` keys share one trained model (scoring is applied to its reconstructions), so scoring
rules cost no training. Per variant and category it prints the validation metrics (what model selection
sees), then, unless --validation-only, the test metrics with the 95% bootstrap interval of image AUROC, the
image AUROC of the thin defects, the generalisation gap (median score of good test images over that of good
validation images: 1.0 when held-out good images look like unseen ones), the raw-pixel nearest-neighbour
baseline's test image AUROC, and the budget (steps, minutes of training). Finished runs are reused.
Choose on the validation columns; the test columns are for the variants you report.
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
from rayad.config import load_config, parse_overrides
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.evaluate import evaluate
from rayad.layout import METADATA
from rayad.precision import CPU_BF16_FLAGS, cpu_info
from rayad.train import fit
from rayad.validation import load_validation, validation_metrics

THIN = ("crack", "scratch", "fine_crack")
BROAD = ("faint", "broad_stain", "dark_region", "missing")


def trained(overrides: dict, category: str, data_root: Path, out: Path) -> tuple[Predictor, float]:
    """The model of `overrides` without its scoring keys (trained once, reused), and its training minutes."""
    training = {k: v for k, v in sorted(overrides.items()) if not k.startswith("scoring.")}
    run = out / hashlib.sha1(json.dumps(training).encode()).hexdigest()[:10] / category
    if not (run / METADATA).is_file():
        start = time.perf_counter()
        fit(load_config(overrides=training), data_root, category, run, resume=True, progress=False)
        (run / "minutes.txt").write_text(f"{(time.perf_counter() - start) / 60:.2f}")
    return Predictor.load(run), float((run / "minutes.txt").read_text())


def study(overrides: dict, category: str, data_root: Path, out: Path, with_test: bool) -> dict:
    predictor, minutes = trained(overrides, category, data_root, out)
    predictor.config = predictor.config.replace({k: v for k, v in overrides.items() if k.startswith("scoring.")})
    predictor.model.scoring = predictor.config.scoring
    vset = load_validation(predictor.config, data_root, category)
    tta = predictor.resolve_tta(vset.images[vset.labels == 0])["choice"]  # as calibration settles `auto`
    cfg = predictor.config
    val = validation_metrics(predictor.model.network, cfg, vset, "cpu")
    row = {"val_image_auroc": val["val_image_auroc"], "val_aupro": val["val_aupro"], "tta": tta,
           "steps": cfg.train.steps, "minutes": minutes,
           "precision": predictor.metadata.get("precision", {}).get("train", {}).get("precision")}
    if not with_test:
        return row
    test = evaluate(predictor, data_root, category)
    val_good = predictor.predict_arrays(vset.images[vset.labels == 0]).scores
    test_good = np.asarray(test["scores"])[np.asarray(test["labels"]) == 0]
    per_defect = test["per_defect"]
    return {**row, **{k: test[k] for k in ("image_auroc", "image_auroc_ci", "pixel_auroc", "aupro")},
            "thin": float(np.mean([per_defect[k]["image_auroc"] for k in THIN if k in per_defect])),
            "broad": float(np.mean([per_defect[k]["image_auroc"] for k in BROAD if k in per_defect])),
            "good_gap": float(np.median(test_good) / np.median(val_good)),
            "per_defect": {k: v["image_auroc"] for k, v in per_defect.items()}}


def fmt(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    if key == "image_auroc_ci":
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return f"{value:.2f}" if key == "minutes" else str(value) if isinstance(value, int | str) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [key=value]")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--out", type=Path, default=Path("runs/variants"))
    parser.add_argument("--validation-only", action="store_true", help="skip the test split")
    args = parser.parse_args()
    data_root = args.out / "data"
    if not all((data_root / c).is_dir() for c in args.categories):
        make_demo_dataset(data_root)
    for _, *sets in args.variant:  # every variant's overrides are checked before any training
        load_config(overrides=parse_overrides(sets))
    results = {name: {c: study(parse_overrides(sets), c, data_root, args.out, not args.validation_only)
                      for c in args.categories} for name, *sets in args.variant}
    baseline = {} if args.validation_only else {c: nearest_neighbour_metrics(data_root, c) for c in args.categories}
    (args.out / "results.json").write_text(json.dumps({"variants": results, "nearest_neighbour": {
        c: {k: m[k] for k in ("image_auroc", "image_auroc_ci", "pixel_auroc", "aupro")} for c, m in baseline.items()}},
        indent=2))
    name, flags = cpu_info()
    print(f"machine: {name} ({', '.join(f for f in CPU_BF16_FLAGS if f in flags) or 'no bf16 flags'})")
    columns = ["val_image_auroc", "val_aupro"]
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
    main()
