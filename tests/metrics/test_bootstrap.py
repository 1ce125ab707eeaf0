"""Bootstrap intervals: the fast AUROC intervals against a per-resample scikit-learn bootstrap, coverage, width."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from rayad.metrics import compute_metrics
from rayad.metrics.bootstrap import auroc_ci, bootstrap_ci, pixel_auroc_ci, resample_indices


def image_case(seed: int, n_good: int = 30, n_bad: int = 50, shift: float = 1.0, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    scores = rng.normal(size=len(labels)) + shift * labels
    return (np.round(scores, 1) if ties else scores), labels


def pixel_case(seed: int, n_good: int = 6, n_bad: int = 10, size: int = 12, decimals: int | None = 2):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    masks = np.zeros((len(labels), size, size), bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 4, 2)
        masks[i, y:y + int(rng.integers(1, 5)), x:x + int(rng.integers(1, 5))] = True
    maps = rng.random(masks.shape) + 0.5 * masks + 0.3 * rng.random((len(labels), 1, 1))  # per-image offsets
    return (maps if decimals is None else np.round(maps, decimals)), masks, labels


def sk_pixel_auroc(maps, masks):
    return skm.roc_auc_score(masks.ravel(), maps.ravel())


def test_resamples_are_stratified_and_seeded():
    strata = np.array([0, 1, 1, 0, 1, 2, 1])
    idx = resample_indices(strata, 50, seed=3)
    assert idx.shape == (50, 7)
    for row in idx:
        assert sorted(strata[row].tolist()) == sorted(strata.tolist())  # each resample keeps the label counts
    assert np.array_equal(idx, resample_indices(strata, 50, seed=3))
    assert not np.array_equal(idx, resample_indices(strata, 50, seed=4))
    assert set(np.unique(idx[:, 2:6])) == {1, 2, 4, 6}  # columns by stratum; every member of stratum 1 is drawn


@pytest.mark.parametrize("ties", [False, True])
def test_image_interval_is_the_sklearn_bootstrap(ties):
    scores, labels = image_case(0, ties=ties)
    expected = bootstrap_ci(lambda s, y: skm.roc_auc_score(y, s), [scores, labels], labels, n_boot=300, seed=7)
    assert np.allclose(auroc_ci(scores, labels, n_boot=300, seed=7), expected, rtol=0, atol=1e-12)


def test_pixel_interval_is_the_sklearn_bootstrap_over_whole_images():
    maps, masks, labels = pixel_case(1)  # rounded maps: fewer distinct values than bins, so exact
    expected = bootstrap_ci(sk_pixel_auroc, [maps, masks], labels, n_boot=200, seed=2)
    assert np.allclose(pixel_auroc_ci(maps, masks, n_boot=200, seed=2), expected, rtol=0, atol=1e-12)


def test_pixel_resamples_keep_the_images_with_defect_pixels_apart_from_the_others():
    # a defective image without its mask has no defect pixel: a resample of defective images could hold none
    maps, masks, labels = pixel_case(3, n_good=2, n_bad=3)
    masks[np.flatnonzero(labels)[:2]] = False
    expected = bootstrap_ci(sk_pixel_auroc, [maps, masks], masks.any(axis=(1, 2)), n_boot=300, seed=0)
    assert np.allclose(pixel_auroc_ci(maps, masks, n_boot=300, seed=0), expected, rtol=0, atol=1e-12)


def test_binned_pixel_interval_stays_within_the_binning_bound():
    maps, masks, labels = pixel_case(2, decimals=None)  # all values distinct: 32 bins of pooled values
    expected = bootstrap_ci(sk_pixel_auroc, [maps, masks], labels, n_boot=100, seed=0)
    binned = pixel_auroc_ci(maps, masks, n_boot=100, seed=0, bins=32)
    # a bin holds 1/32 of the pixels; a resample's AUROC moves by at most half a bin's negatives over all
    bound = 0.5 * (maps.size / 32 + 1) * 5 / (~masks).sum()  # 5: room for a heavy resample of one bin
    assert np.allclose(binned, expected, rtol=0, atol=bound)
    assert not np.allclose(binned, expected, rtol=0, atol=1e-12)  # binned, not exact


def test_point_estimate_lies_inside_the_interval():
    for seed in range(5):
        scores, labels = image_case(seed)
        low, high = auroc_ci(scores, labels)
        assert low <= skm.roc_auc_score(labels, scores) <= high and low < high
        maps, masks, labels = pixel_case(seed)
        low, high = pixel_auroc_ci(maps, masks)
        assert low <= sk_pixel_auroc(maps, masks) <= high and low < high


def test_interval_narrows_with_more_data():
    def width(ci):
        return ci[1] - ci[0]

    small, large = image_case(0, 20, 30), image_case(0, 200, 300)
    assert width(auroc_ci(*large)) < 0.5 * width(auroc_ci(*small))
    small, large = pixel_case(0, 4, 6), pixel_case(0, 40, 60)
    assert width(pixel_auroc_ci(*large[:2])) < 0.5 * width(pixel_auroc_ci(*small[:2]))


def test_interval_covers_the_true_auroc_about_95_percent_of_the_time():
    # scores N(0, 1) for good and N(1, 1) for defective images: the true AUROC is Phi(1 / sqrt(2))
    true_auroc = 0.7602499389065233
    covered = [lo <= true_auroc <= hi for lo, hi in (auroc_ci(*image_case(s), n_boot=400) for s in range(200))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_intervals_are_deterministic_given_the_seed():
    scores, labels = image_case(4)
    assert auroc_ci(scores, labels, seed=1) == auroc_ci(scores, labels, seed=1)
    assert auroc_ci(scores, labels, seed=1) != auroc_ci(scores, labels, seed=2)
    maps, masks, labels = pixel_case(4)
    assert pixel_auroc_ci(maps, masks, seed=1) == pixel_auroc_ci(maps, masks, seed=1)
    assert pixel_auroc_ci(maps, masks, seed=1) != pixel_auroc_ci(maps, masks, seed=2)


def test_compute_metrics_carries_the_intervals():
    maps, masks, labels = pixel_case(5)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    types = ["good" if y == 0 else "dent" for y in labels]
    out = compute_metrics(scores, labels, types, maps, masks, n_boot=300, seed=3)
    assert out["image_auroc_ci"] == auroc_ci(scores, labels, n_boot=300, seed=3)
    assert out["pixel_auroc_ci"] == pixel_auroc_ci(maps, masks, n_boot=300, seed=3)
    assert out["image_auroc_ci"][0] <= out["image_auroc"] <= out["image_auroc_ci"][1]
    assert out["pixel_auroc_ci"][0] <= out["pixel_auroc"] <= out["pixel_auroc_ci"][1]
    assert all(isinstance(v, float) for v in out["image_auroc_ci"] + out["pixel_auroc_ci"])
    assert "image_auroc_ci" not in out["per_defect"]["dent"]


def test_compute_metrics_intervals_are_none_without_what_they_need():
    maps, masks, labels = pixel_case(6)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    no_masks = compute_metrics(scores, labels, maps=maps)
    assert no_masks["image_auroc_ci"] is not None and no_masks["pixel_auroc_ci"] is None
    good_only = compute_metrics(scores[:6], labels[:6], maps=maps[:6], masks=masks[:6])
    assert good_only["image_auroc_ci"] is None and good_only["pixel_auroc_ci"] is None
    off = compute_metrics(scores, labels, maps=maps, masks=masks, n_boot=0)
    assert off["image_auroc_ci"] is None and off["pixel_auroc_ci"] is None
    assert off["image_auroc"] == compute_metrics(scores, labels, maps=maps, masks=masks)["image_auroc"]
