"""ROC curve and AUROC, as sklearn's `roc_curve` / `roc_auc_score` define them (ties handled exactly)."""

from __future__ import annotations

import numpy as np


def finite(values: np.ndarray) -> np.ndarray:
    """`values` flattened as float64; a ValueError if any is NaN or infinite, as sklearn raises: they have no
    place in a ranking (NaN sorted last, and equal infinities were split into separate thresholds)."""
    check_finite(values)
    return np.asarray(values, dtype=np.float64).ravel()


def check_finite(values: np.ndarray) -> None:
    """A ValueError naming how many of `values` are NaN or infinite, if any are."""
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise ValueError(f"{bad} of {np.size(values)} scores are NaN or infinite")


def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices of the flattened `values` from highest to lowest, equal values in index order (a stable sort).
    The metrics below take it as `order`, so that one sort serves every metric of the same values."""
    return np.argsort(-finite(values), kind="stable")


def binary_counts(scores: np.ndarray, labels: np.ndarray,
                  order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold, highest first, and those thresholds; `order` is
    `descending_order(scores)` (which refuses NaN and infinities), computed here when not given."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = descending_order(scores) if order is None else order
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = last_of_tie + 1 - tps
    return tps, fps, scores[last_of_tie]


def roc_curve(scores: np.ndarray, labels: np.ndarray,
              order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    tps, fps, thresholds = binary_counts(scores, labels, order)
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("ROC needs both good and anomalous samples")
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def auroc(scores: np.ndarray, labels: np.ndarray, order: np.ndarray | None = None) -> float:
    fpr, tpr, _ = roc_curve(scores, labels, order)
    return float(np.trapezoid(tpr, fpr))
