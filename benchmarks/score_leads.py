"""Image-score rules that rayad does not ship, tried on trained models (validation first, test for the record).

    python benchmarks/score_leads.py --data runs/v4/data --models runs/v4/bf21a9e8fb [--categories grass]

`--models` holds one trained run per category (e.g. a `benchmarks/variants.py` run). Each rule turns the
squared residual of a reconstruction into an image score; the combined rule takes the larger of two
scores, each standardised by its mean and spread over the good *training* images (so that neither the
validation nor the test split calibrates them). Printed per rule and category: validation image AUROC,
its faint-blob and thin-defect (scratch, crack, fine crack) AUROC, and test image AUROC. Shipped rules
(`scoring.image_score`: mean, max, topk) are measured by `benchmarks/variants.py`; this script is where
leads are checked before one of them earns a config value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from rayad.artifact import Predictor
from rayad.cli import run_script
from rayad.data.dataset import load_split, to_tensor
from rayad.data.demo import CATEGORIES
from rayad.data.manifest import build_manifest
from rayad.filters import gaussian_blur
from rayad.metrics.auroc import auroc
from rayad.precision import autocast, cpu_summary
from rayad.validation import load_validation

THIN = ("scratch", "crack", "fine_crack")
BORDER = 8  # px of a 128² map: where 30-60% of good images' maxima lie (docs/benchmarks.md)
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (res, signed, gray) -> image scores


def residuals(predictor: Predictor, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared residual (N, 1, H, W), signed grey residual and grayscale input (one view, no mirror views)."""
    res, signed, gray = [], [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            x = to_tensor(images[start:start + 64])
            with autocast(predictor.precision.precision, x.device):
                r = predictor.model.network(x).float()
            res.append((x - r).pow(2).mean(1, keepdim=True))
            signed.append((x - r).mean(1, keepdim=True))
            gray.append(x.mean(1, keepdim=True))
    return torch.cat(res), torch.cat(signed), torch.cat(gray)


def rules(position_mean: torch.Tensor) -> dict[str, Rule]:
    def local_variance(gray):
        return gaussian_blur(gray.pow(2), 4) - gaussian_blur(gray, 4).pow(2)

    return {
        "max, σ 2 (old default)": lambda res, signed, gray: gaussian_blur(res, 2).flatten(1).amax(1),
        "max, σ 8": lambda res, signed, gray: gaussian_blur(res, 8).flatten(1).amax(1),
        "max, σ 16": lambda res, signed, gray: gaussian_blur(res, 16).flatten(1).amax(1),
        "mean, σ 2 (default)": lambda res, signed, gray: gaussian_blur(res, 2).flatten(1).mean(1),
        f"mean, σ 2, without the {BORDER} px border": lambda res, signed, gray: gaussian_blur(res, 2)[
            ..., BORDER:-BORDER, BORDER:-BORDER].flatten(1).mean(1),
        "max over the mean good map (position-normalised)": lambda res, signed, gray: (
            gaussian_blur(res, 2) / position_mean).flatten(1).amax(1),
        "max of residual / local variance (contrast-normalised)": lambda res, signed, gray: gaussian_blur(
            res / (local_variance(gray) + 1e-3), 2).flatten(1).amax(1),
        "mean of the top 10% of the map, σ 2": lambda res, signed, gray: gaussian_blur(res, 2).flatten(1)
        .topk(res[0].numel() // 10, dim=1).values.mean(1),
        "mean of the top 25% of the map, σ 2": lambda res, signed, gray: gaussian_blur(res, 2).flatten(1)
        .topk(res[0].numel() // 4, dim=1).values.mean(1),
        "power mean of the map, p = 2 (σ 2)": lambda res, signed, gray: gaussian_blur(res, 2).pow(2).flatten(1)
        .mean(1).sqrt(),
        "mean of the map's square root (σ 2)": lambda res, signed, gray: gaussian_blur(res, 2).sqrt().flatten(1)
        .mean(1),
        "low-pass: max of the signed residual blurred at σ 8, squared": lambda res, signed, gray: gaussian_blur(
            signed, 8).pow(2).flatten(1).amax(1),
    }


def combined(scores: dict[str, np.ndarray], train: dict[str, np.ndarray], a: str, b: str, how=np.maximum) -> np.ndarray:
    def z(k):
        return (scores[k] - train[k].mean()) / train[k].std()

    return how(z(a), z(b))


def kind_auroc(scores: np.ndarray, labels: np.ndarray, kinds: np.ndarray, kind_set: list[str]) -> float:
    """Image AUROC of the good images against those of the defect kinds in `kind_set`."""
    keep = np.isin(kinds, kind_set) | (labels == 0)
    return auroc(scores[keep], labels[keep])


def evaluate_rules(predictor: Predictor, data_root: str, category: str) -> dict[str, dict[str, float]]:
    cfg = predictor.config
    manifest = build_manifest(data_root, category, cfg.data)
    size = predictor.image_size
    train_views = residuals(predictor, load_split(manifest, "train", size).images)
    table = rules(gaussian_blur(train_views[0], 2).mean(0, keepdim=True) + 1e-4)
    train = {k: f(*train_views).numpy().astype(np.float64) for k, f in table.items()}
    vset, test = load_validation(cfg, data_root, category), load_split(manifest, "test", size)
    out: dict[str, dict[str, float]] = {}
    for split, images, labels, kinds in (("val", vset.images, vset.labels, vset.defect_types),
                                         ("test", test.images, test.labels, test.defect_types)):
        views = residuals(predictor, images)
        scores = {k: f(*views).numpy().astype(np.float64) for k, f in table.items()}
        scores["max σ 2 or mean σ 2, the larger z-score"] = combined(scores, train, "max, σ 2 (old default)",
                                                                     "mean, σ 2 (default)")
        low_pass = "low-pass: max of the signed residual blurred at σ 8, squared"
        scores["mean σ 2 or low-pass, the larger z-score"] = combined(scores, train, "mean, σ 2 (default)", low_pass)
        scores["mean σ 2 plus low-pass, the sum of z-scores"] = combined(scores, train, "mean, σ 2 (default)",
                                                                         low_pass, np.add)
        kinds = np.asarray(kinds)
        for rule, s in scores.items():
            row = out.setdefault(rule, {})
            row[split] = auroc(s, labels)
            if split == "val":
                row["faint"], row["thin"] = (kind_auroc(s, labels, kinds, k) for k in (["faint"], list(THIN)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", required=True, help="folder with one trained run per category")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    args = parser.parse_args()
    print(f"machine: {cpu_summary()}, {torch.get_num_threads()} torch threads")
    print("| rule | category | val image AUROC | val faint | val thin | test image AUROC |")
    print("|---|---|---|---|---|---|")
    for category in args.categories:
        predictor = Predictor.load(f"{args.models}/{category}")
        for rule, row in evaluate_rules(predictor, args.data, category).items():
            print(f"| {rule} | {category} | {row['val']:.3f} | {row['faint']:.3f} | {row['thin']:.3f} "
                  f"| {row['test']:.3f} |", flush=True)


if __name__ == "__main__":
    run_script(main)
