"""Image AUROC, pixel AUROC, AUPRO and F1-max, overall and per defect type, with bootstrap
confidence intervals for image and pixel AUROC."""

from __future__ import annotations

import numpy as np

from rayad.layout import METRIC_NAMES
from rayad.metrics.aupro import aupro
from rayad.metrics.auroc import auroc, check_finite, descending_order, roc_curve
from rayad.metrics.bootstrap import N_BOOT, auroc_ci, bootstrap_ci, pixel_auroc_ci
from rayad.metrics.f1 import f1_max, precision_recall_curve

__all__ = ["METRIC_NAMES", "aupro", "auroc", "auroc_ci", "bootstrap_ci", "compute_metrics", "f1_max", "pixel_auroc_ci",
           "pixel_curves", "precision_recall_curve", "roc_curve"]

CURVE_POINTS = 400  # stored curves keep at most this many of their exact points


def compute_metrics(scores: np.ndarray, labels: np.ndarray, defect_types: list[str] | None = None,
                    maps: np.ndarray | None = None, masks: np.ndarray | None = None, n_boot: int = N_BOOT,
                    seed: int = 0, curves: bool = False) -> dict:
    """Metrics of a test set. Pixel metrics are None without masks that hold both defect and defect-free pixels,
    image metrics without both good and defective images (labels: 0 good, any other value defective); scores or
    maps that are NaN or infinite are a ValueError, whether or not a metric is computed. `image_auroc_ci` and
    `pixel_auroc_ci` are 95 % bootstrap intervals [low, high] over `n_boot` stratified resamples of the images
    (`rayad.metrics.bootstrap`), None where the metric is None or n_boot is 0. With `defect_types`, also the
    metrics per defect type (without intervals), each scored against all good images, as the MVTec AD benchmark
    and anomalib do. With `curves`, also `pixel_curves`. The pixels are sorted once: every pixel metric, of all
    images or of a defect type's, takes its ranking from that sort."""
    check_finite(scores)
    if maps is not None:
        check_finite(maps)
    order = descending_order(maps) if _has_pixel_metrics(maps, masks) else None
    out = _metrics(scores, labels, maps, masks, order)
    pixel = out["pixel_auroc"] is not None
    out["image_auroc_ci"] = auroc_ci(scores, labels, n_boot, seed) if out["image_auroc"] is not None else None
    out["pixel_auroc_ci"] = pixel_auroc_ci(maps, masks, n_boot, seed) if pixel else None
    if curves:
        out["pixel_curves"] = None if maps is None else pixel_curves(maps, masks, order=order)
    if defect_types is None:
        return out
    types = np.asarray(defect_types)
    good = labels == 0
    out["per_defect"] = {}
    for defect in sorted(set(defect_types) - {"good"}):
        subset = good | (types == defect)
        out["per_defect"][defect] = _metrics(scores[subset], labels[subset],
                                             None if maps is None else maps[subset],
                                             None if masks is None else masks[subset],
                                             None if order is None else _restrict(order, subset, maps[0].size))
    return out


def _has_pixel_metrics(maps, masks) -> bool:
    return maps is not None and masks is not None and bool(masks.any()) and not masks.all()


def _metrics(scores, labels, maps, masks, order) -> dict:
    both = 0 < np.count_nonzero(labels) < len(labels)
    pixel = _has_pixel_metrics(maps, masks)
    return {
        "image_auroc": auroc(scores, labels) if both else None,
        "pixel_auroc": auroc(maps, masks, order) if pixel else None,
        "aupro": aupro(maps, masks, order=order) if pixel else None,
        "f1_max": f1_max(scores, labels)[0] if both else None,
        "n_images": int(len(labels)),
    }


def _restrict(order: np.ndarray, keep: np.ndarray, per_image: int) -> np.ndarray:
    """A ranking of every image's `per_image` pixels restricted to the images where `keep`, as indices into
    those images' pixels: the ranking `descending_order` gives for them, without sorting again."""
    image = order // per_image
    kept = keep[image]
    dropped_before = np.cumsum(~keep) * per_image  # pixels of the images left out before each kept image
    return order[kept] - dropped_before[image[kept]]


def pixel_curves(maps: np.ndarray, masks: np.ndarray | None, points: int = CURVE_POINTS,
                 order: np.ndarray | None = None) -> dict | None:
    """Pixel-level ROC and PR curves, thinned to at most `points` exact points each (for plots), or None
    without both good and defective pixels; `order` is `descending_order(maps)`, computed here when not given."""
    if masks is None or not masks.any() or masks.all():
        return None
    order = descending_order(maps) if order is None else order
    fpr, tpr, _ = roc_curve(maps, masks, order)
    precision, recall, _ = precision_recall_curve(maps, masks, order)
    roc, pr = _thin(len(fpr), points), _thin(len(recall), points)
    return {"roc": {"fpr": fpr[roc].tolist(), "tpr": tpr[roc].tolist()},
            "pr": {"recall": recall[pr].tolist(), "precision": precision[pr].tolist()}}


def _thin(n: int, points: int) -> np.ndarray:
    """Indices of `points` evenly spaced points out of n, both ends included."""
    return np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(int))
