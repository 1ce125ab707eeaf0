"""Image AUROC, pixel AUROC, AUPRO and F1-max (DESIGN §1.5), overall and per defect type."""

from __future__ import annotations

import numpy as np

from rayad.metrics.aupro import aupro
from rayad.metrics.auroc import auroc, roc_curve
from rayad.metrics.f1 import f1_max, precision_recall_curve

__all__ = ["aupro", "auroc", "compute_metrics", "f1_max", "precision_recall_curve", "roc_curve"]


def compute_metrics(scores: np.ndarray, labels: np.ndarray, defect_types: list[str] | None = None,
                    maps: np.ndarray | None = None, masks: np.ndarray | None = None) -> dict:
    """Metrics of a test set. Pixel metrics are None without masks. With `defect_types`, also per defect
    type, each scored against all good images, as the MVTec AD benchmark and anomalib do."""
    out = _metrics(scores, labels, maps, masks)
    if defect_types is None:
        return out
    types = np.asarray(defect_types)
    good = labels == 0
    out["per_defect"] = {}
    for defect in sorted(set(defect_types) - {"good"}):
        subset = good | (types == defect)
        out["per_defect"][defect] = _metrics(scores[subset], labels[subset],
                                             None if maps is None else maps[subset],
                                             None if masks is None else masks[subset])
    return out


def _metrics(scores, labels, maps, masks) -> dict:
    both = 0 < labels.sum() < len(labels)
    pixel = both and maps is not None and masks is not None and masks.any() and not masks.all()
    return {
        "image_auroc": auroc(scores, labels) if both else None,
        "pixel_auroc": auroc(maps.ravel(), masks.ravel()) if pixel else None,
        "aupro": aupro(maps, masks) if pixel else None,
        "f1_max": f1_max(scores, labels)[0] if both else None,
        "n_images": int(len(labels)),
    }
