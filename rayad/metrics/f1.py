"""Precision-recall curve and the best achievable F1 over thresholds (F1-max)."""

from __future__ import annotations

import numpy as np

from rayad.metrics.auroc import binary_counts


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray, order: np.ndarray | None = None):
    """(precision, recall, thresholds) at each distinct threshold, highest threshold first (`order`: as for
    `binary_counts`)."""
    tps, fps, thresholds = binary_counts(scores, labels, order)
    if tps[-1] == 0:
        raise ValueError("precision/recall need at least one anomalous sample")
    return tps / (tps + fps), tps / tps[-1], thresholds


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, the threshold that reaches it); predictions are score >= threshold."""
    precision, recall, thresholds = precision_recall_curve(scores, labels)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
