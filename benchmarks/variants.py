"""Configuration study on the demo data: what the validation set sees against what the test split shows.

    python benchmarks/variants.py --variant base --variant long train.steps=1500 \
        [--categories grass] [--out runs/variants]

Each `--variant NAME [key=value ...]` is the default config with those overrides. Per run it prints the
validation metrics (what model selection sees), the test metrics, the image AUROC of the thin defects
(crack, scratch) and the generalisation gap: the median score of good test images over that of good
validation images (1.0 when held-out good images look like unseen ones). Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rayad.artifact import METADATA, Predictor
from rayad.config import load_config, parse_overrides
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.evaluate import evaluate
from rayad.train import fit
from rayad.validation import load_validation, validation_metrics

THIN = ("crack", "scratch")


def study(name: str, overrides: dict, category: str, data_root: Path, out: Path) -> dict:
    run = out / name / category
    if not (run / METADATA).is_file():
        fit(load_config(overrides=overrides), data_root, category, run, resume=True, progress=False)
    predictor = Predictor.load(run)
    cfg = predictor.config
    vset = load_validation(cfg, data_root, category)
    val = validation_metrics(predictor.model.network, cfg, vset, "cpu")
    test = evaluate(predictor, data_root, category)
    val_good = vset.images[vset.labels == 0]
    test_good = np.asarray(test["scores"])[np.asarray(test["labels"]) == 0]
    return {"val_image_auroc": val["val_image_auroc"], "val_aupro": val["val_aupro"],
            **{k: test[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
            **{k: test["per_defect"][k]["image_auroc"] for k in THIN if k in test["per_defect"]},
            "good_gap": float(np.median(test_good) / np.median(predictor.raw_scores(val_good)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [key=value]")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--out", type=Path, default=Path("runs/variants"))
    args = parser.parse_args()
    data_root = args.out / "data"
    if not all((data_root / c).is_dir() for c in args.categories):
        make_demo_dataset(data_root)
    results = {name: {c: study(name, parse_overrides(sets), c, data_root, args.out) for c in args.categories}
               for name, *sets in args.variant}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    columns = ("val_image_auroc", "val_aupro", "image_auroc", "pixel_auroc", "aupro", *THIN, "good_gap")
    print("| variant | category | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, per_category in results.items():
        for category, row in per_category.items():
            cells = " | ".join(f"{row[k]:.3f}" if k in row else "n/a" for k in columns)
            print(f"| {name} | {category} | {cells} |")


if __name__ == "__main__":
    main()
