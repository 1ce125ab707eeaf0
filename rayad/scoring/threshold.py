"""Threshold calibration: a quantile of good validation scores, or F1-optimal with labelled anomalies."""

from __future__ import annotations

import numpy as np

from rayad.metrics.f1 import f1_max


def quantile_threshold(good_scores: np.ndarray, quantile: float) -> float:
    """The `quantile` of scores of good images (linear interpolation, as numpy's default)."""
    if len(good_scores) == 0:
        raise ValueError("cannot calibrate a threshold without validation images (data.val_fraction > 0)")
    return float(np.quantile(np.asarray(good_scores, dtype=np.float64), quantile))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises image-level F1 on labelled scores."""
    return f1_max(scores, labels)[1]
