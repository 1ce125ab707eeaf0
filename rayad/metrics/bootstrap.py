"""Bootstrap confidence intervals, and fast ones for image and pixel AUROC.

Resampling is stratified: every resample draws, with replacement, as many images of each label as the test
set has. Pixel AUROC resamples whole images, since the pixels of one image are not independent. Intervals
are percentile intervals over `n_boot` seeded resamples.

`bootstrap_ci` calls a metric once per resample. The AUROC intervals re-sort nothing: AUROC is the share of
(positive, negative) pairs in order, ties counted half, so with a resample's image multiplicities w it is
w·C·w / ((w·P) (w·N)), where C[i, j] counts the ordered pairs of image i's positives and image j's
negatives and P, N are each image's positive and negative counts. C is computed once from per-image
histograms over bins of the pooled values; a thousand resamples are then a few small matrix products
(pixel AUROC of 310 images of 128²: about 0.5 s, less than the point estimate's own sort).
With at most `bins` distinct values (image scores of any usual test set), every value has its own bin and
each resample's AUROC is exact: the value `rayad.metrics.auroc` gives for it. Otherwise the bins hold
equal shares of the pooled values, and a positive and a negative in the same bin count as a tie: a
resample's AUROC moves by at most half the negatives of its fullest bin over all its negatives (under
1e-4 with 8192 bins when most pixels are negative), far below the interval's own Monte-Carlo noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rayad.metrics.auroc import finite

N_BOOT = 1000
LEVEL = 0.95
BINS = 8192


def bootstrap_ci(metric_fn: Callable[..., float], arrays: Sequence[np.ndarray], strata: np.ndarray,
                 n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """Percentile interval of `metric_fn(*(a[idx] for a in arrays))` over stratified resamples idx of the
    rows (first axis) of `arrays`; None when n_boot is 0."""
    arrays = [np.asarray(a) for a in arrays]
    values = [metric_fn(*(a[idx] for a in arrays)) for idx in resample_indices(strata, n_boot, seed)]
    return _interval(np.asarray(values, dtype=np.float64), level)


def resample_indices(strata: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, N) row indices: each resample draws, with replacement, as many rows of every stratum as it
    has (strata in sorted order)."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    draws = [g[rng.integers(0, len(g), (n_boot, len(g)))] for g in groups]
    return np.concatenate(draws, axis=1) if draws else np.zeros((n_boot, 0), dtype=np.int64)


def auroc_ci(scores: np.ndarray, labels: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
             level: float = LEVEL, bins: int = BINS) -> list[float] | None:
    """Interval of image AUROC; images resampled within their label."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).reshape(len(labels), 1)
    return _pair_auroc_ci(scores, labels[:, None], labels, n_boot, seed, level, bins)


def pixel_auroc_ci(maps: np.ndarray, masks: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
                   bins: int = BINS) -> list[float] | None:
    """Interval of pixel AUROC over maps (N, H, W) and masks (N, H, W); whole images resampled within their
    kind, with defect pixels or without (the good and defective images where every defective image has its
    mask), so that every resample has both kinds of pixel where some image has no defect pixel. Without one, a
    resample of wholly defective images only has none and is left out, as sklearn would refuse it."""
    n = len(maps)
    values = np.asarray(maps).reshape(n, -1)
    positive = np.asarray(masks).astype(bool).reshape(n, -1)
    return _pair_auroc_ci(values, positive, positive.any(axis=1), n_boot, seed, level, bins)


def pair_counts(values: np.ndarray, positive: np.ndarray, bins: int = BINS):
    """(C, P, N, rows, cols) for units (rows of `values`, (units, K)): C[a, b] = ordered pairs of the
    positives of unit rows[a] over the negatives of unit cols[b], ties half; P, N the positive and negative
    counts of every unit; rows / cols the units with any positive / negative."""
    index, n_bins = _bin_index(values, bins)
    rows, cols = np.flatnonzero(positive.any(axis=1)), np.flatnonzero((~positive).any(axis=1))
    pos = _histograms(index[rows], positive[rows], n_bins)
    neg = _histograms(index[cols], ~positive[cols], n_bins)
    below = np.cumsum(neg, axis=1) - 0.5 * neg  # negatives under each bin, those in it counted half
    n_pos, n_neg = positive.sum(axis=1).astype(np.float64), (~positive).sum(axis=1).astype(np.float64)
    return pos @ below.T, n_pos, n_neg, rows, cols


def _pair_auroc_ci(values, positive, strata, n_boot, seed, level, bins) -> list[float] | None:
    if n_boot <= 0:
        return None
    finite(values)
    n = len(values)
    idx = resample_indices(strata, n_boot, seed)
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    weights = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    pairs, n_pos, n_neg, rows, cols = pair_counts(values, positive, bins)
    ordered = ((weights[:, rows] @ pairs) * weights[:, cols]).sum(axis=1)
    total = (weights @ n_pos) * (weights @ n_neg)
    return _interval(ordered[total > 0] / total[total > 0], level)


def _bin_index(values: np.ndarray, bins: int) -> tuple[np.ndarray, int]:
    """Bin of every value and the number of bins: one per distinct value if there are at most `bins`,
    else `bins` equal shares of the pooled values (equal values always share a bin)."""
    pooled = np.sort(values, axis=None)
    distinct = pooled[np.r_[True, pooled[1:] != pooled[:-1]]]
    edges = distinct if len(distinct) <= bins else np.unique(pooled[::-(-len(pooled) // bins)])
    return np.searchsorted(edges, values, side="right") - 1, len(edges)


def _histograms(index: np.ndarray, take: np.ndarray, n_bins: int) -> np.ndarray:
    """(units, n_bins) counts of each unit's values where `take`."""
    units = len(index)
    flat = (np.arange(units)[:, None] * n_bins + index)[take]
    return np.bincount(flat, minlength=units * n_bins).reshape(units, n_bins).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    if values.size == 0:
        return None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]
