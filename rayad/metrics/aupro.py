"""AUPRO as the MVTec AD benchmark defines it.

PRO at a threshold is the mean, over every connected ground-truth region (8-connectivity) of every image,
of the fraction of that region above the threshold. FPR is over all defect-free pixels of all images.
The PRO-vs-FPR curve is integrated up to `fpr_limit` (0.3) and divided by it.
"""

from __future__ import annotations

from bisect import bisect

import numpy as np
from scipy import ndimage

from rayad.metrics.auroc import binary_counts, descending_order

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def pro_curve(maps: np.ndarray, masks: np.ndarray, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct anomaly value, from (0, 0) up; maps (N, H, W) float, masks (N, H, W) bool;
    `order` is `descending_order(maps)`, computed here when not given. The counts are the ROC's; PRO adds,
    in rank order, each defect pixel's weight: 1 / (regions of all images x pixels of its region)."""
    masks = np.asarray(masks, dtype=bool)
    regions = [ndimage.label(m, structure=EIGHT_CONNECTED)[0] for m in masks]
    n_regions = sum(int(labelled.max()) for labelled in regions)
    n_ok = masks.size - np.count_nonzero(masks)
    if n_ok == 0 or n_regions == 0:
        raise ValueError("AUPRO needs both defect-free pixels and at least one defect region")
    order = descending_order(maps) if order is None else order
    tps, fps, _ = binary_counts(maps, masks, order)
    weights = np.concatenate([1.0 / (n_regions * np.bincount(labelled.ravel())[labelled[labelled > 0]])
                              for labelled in regions])  # every defect pixel's, in the maps' own order
    defect = masks.ravel()
    ranked = np.searchsorted(np.flatnonzero(defect), order[defect[order]])  # defect pixels by rank
    pro = np.r_[0.0, np.cumsum(weights[ranked])][tps]
    return np.r_[0.0, np.minimum(fps / n_ok, 1.0)], np.r_[0.0, np.minimum(pro, 1.0)]


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, order: np.ndarray | None = None) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit]."""
    fpr, pro = pro_curve(maps, masks, order)
    return trapezoid_area(fpr, pro, fpr_limit) / fpr_limit


def trapezoid_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x <= x_max, interpolating at x_max (as MVTec's evaluation code does)."""
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        if 0 < ins < len(x):
            y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)
