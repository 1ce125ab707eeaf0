"""rayad.metrics against scikit-learn and against an independent brute-force AUPRO reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from rayad.metrics import aupro, auroc, compute_metrics, f1_max, pixel_curves, precision_recall_curve, roc_curve
from rayad.metrics.aupro import pro_curve

# ----------------------------------------------------------------------------------------------------------------------
# Random binary-classification cases: continuous scores, heavy ties, imbalanced labels.


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    kind = seed % 4
    if kind == 0:  # continuous scores, balanced-ish labels
        labels = rng.random(n) < 0.5
        scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    elif kind == 1:  # heavy ties: a handful of integer scores
        labels = rng.random(n) < 0.4
        scores = rng.integers(0, 4, size=n) + labels * rng.integers(0, 2, size=n)
    elif kind == 2:  # imbalanced: very few anomalies
        labels = rng.random(n) < 0.05
        scores = rng.normal(size=n) + labels
    else:  # imbalanced the other way, with ties from rounding
        labels = rng.random(n) < 0.93
        scores = np.round(rng.normal(size=n) + labels, 1)
    # Both classes must be present.
    labels[0], labels[-1] = True, False
    return scores.astype(np.float64), labels.astype(int)


CASES = [_random_case(seed) for seed in range(80)]


def test_random_cases_cover_ties_and_imbalance():
    assert any(len(np.unique(s)) <= 5 and len(s) > 20 for s, _ in CASES)
    assert any(lab.mean() < 0.1 for _, lab in CASES)
    assert any(lab.mean() > 0.9 for _, lab in CASES)


@pytest.mark.parametrize("seed", range(len(CASES)))
def test_auroc_matches_sklearn(seed):
    scores, labels = CASES[seed]
    assert np.allclose(auroc(scores, labels), skm.roc_auc_score(labels, scores), rtol=0, atol=1e-12)


def test_auroc_accepts_bool_labels_and_2d_inputs():
    scores, labels = CASES[1]
    n = len(scores) // 2 * 2
    expected = skm.roc_auc_score(labels[:n], scores[:n])
    assert np.isclose(auroc(scores[:n].reshape(2, -1), labels[:n].astype(bool).reshape(2, -1)), expected,
                      rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(0, len(CASES), 7))
def test_roc_curve_matches_sklearn_full_curve(seed):
    scores, labels = CASES[seed]
    fpr, tpr, thresholds = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    assert np.allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    assert np.array_equal(thresholds[1:], sk_thr[1:])
    assert thresholds[0] == np.inf


@pytest.mark.parametrize("seed", range(0, len(CASES), 5))
def test_roc_curve_endpoints_and_monotone(seed):
    scores, labels = CASES[seed]
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert np.isclose(fpr[-1], 1.0) and np.isclose(tpr[-1], 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thresholds) < 0)  # distinct thresholds, highest first
    assert len(thresholds) == len(np.unique(scores)) + 1


def test_auroc_simple_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # One positive tied with one of two negatives, above the other: (1 + 0.5) / 2.
    assert auroc([0.3, 0.7, 0.7], [0, 0, 1]) == 0.75


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auroc_single_class_raises(labels):
    with pytest.raises(ValueError):
        auroc([0.1, 0.5, 0.9], labels)
    with pytest.raises(ValueError):
        roc_curve([0.1, 0.5, 0.9], labels)


# ----------------------------------------------------------------------------------------------------------------------
# F1-max


def _sklearn_f1_max(labels, scores) -> float:
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.max())


@pytest.mark.parametrize("seed", range(len(CASES)))
def test_f1_max_matches_sklearn_and_threshold_reproduces_it(seed):
    scores, labels = CASES[seed]
    best, threshold = f1_max(scores, labels)
    assert np.isclose(best, _sklearn_f1_max(labels, scores), rtol=0, atol=1e-12)
    assert threshold in scores
    assert np.isclose(skm.f1_score(labels, scores >= threshold), best, rtol=0, atol=1e-12)


def test_f1_max_hand_case():
    # Scores 0.9(+) 0.8(-) 0.7(+) 0.1(-): at t=0.7 precision 2/3, recall 1 -> F1 0.8; at t=0.9 F1 = 2/3.
    best, threshold = f1_max(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    assert np.isclose(best, 0.8)
    assert threshold == 0.7


def test_precision_recall_curve_values():
    precision, recall, thresholds = precision_recall_curve(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    assert np.allclose(thresholds, [0.9, 0.8, 0.1])
    assert np.allclose(precision, [1.0, 2 / 3, 0.5])
    assert np.allclose(recall, [0.5, 1.0, 1.0])


def test_f1_max_without_anomalies_raises():
    with pytest.raises(ValueError):
        f1_max(np.array([0.1, 0.2]), np.array([0, 0]))


# ----------------------------------------------------------------------------------------------------------------------
# AUPRO: brute-force reference, written independently of rayad's cumulative-sum implementation.


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    regions = []  # anomaly values of every 8-connected ground-truth region of every image
    for amap, mask in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.extend(amap[labelled == r] for r in range(1, n + 1))
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.count_nonzero(normal >= t) / normal.size)
        pros.append(float(np.mean([np.count_nonzero(r >= t) / r.size for r in regions])))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # linear interpolation at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def _random_blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() < 0.3:
            continue  # a defect-free image
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.integers(0, 3), rng.integers(0, 3)
            masks[i, max(cy - ry, 0):cy + ry + 1, max(cx - rx, 0):cx + rx + 1] = True
        # Carve a few random holes/pixels in for irregular shapes and diagonal-only contacts.
        masks[i] ^= rng.random((h, w)) < 0.04
    if not masks.any():
        masks[0, 2:4, 2:4] = True
    return masks


def _random_aupro_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    masks = _random_blob_masks(rng, 3, 12, 12)
    maps = rng.random(masks.shape) + masks * rng.uniform(0, 1.5)
    if seed % 2 == 0:
        maps = np.round(maps, 1)  # many ties, across normal and defect pixels
    if seed % 5 == 0:
        maps = maps.astype(np.float32)
    return maps, masks


def test_random_aupro_cases_have_several_regions_and_good_images():
    cases = [_random_aupro_case(seed) for seed in range(20)]
    n_regions = [sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks) for _, masks in cases]
    assert min(n_regions) >= 1 and max(n_regions) >= 4
    assert any((~masks.any(axis=(1, 2))).any() for _, masks in cases)


@pytest.mark.parametrize("seed", range(20))
def test_aupro_matches_brute_force_reference(seed):
    maps, masks = _random_aupro_case(seed)
    expected = reference_aupro(maps, masks)
    assert np.allclose(aupro(maps, masks), expected, rtol=0, atol=1e-9)
    assert 0.0 <= expected <= 1.0


@pytest.mark.parametrize("limit", [0.05, 0.5, 1.0])
def test_aupro_matches_reference_at_other_limits(limit):
    maps, masks = _random_aupro_case(3)
    assert np.allclose(aupro(maps, masks, fpr_limit=limit), reference_aupro(maps, masks, limit), rtol=0, atol=1e-9)


def test_aupro_perfect_and_inverted_separation():
    masks = np.array([[[False, False, True, True]]])
    # Perfect: curve (0,0) -> (0,1) -> (1,1); area up to 0.3 is 0.3, normalised 1.
    assert np.isclose(aupro(np.array([[[0.0, 0.1, 0.8, 0.9]]]), masks), 1.0)
    # Inverted: every defect pixel below every normal one; curve (0,0) -> (1,0) -> (1,1); area 0.
    assert np.isclose(aupro(np.array([[[0.9, 0.8, 0.1, 0.0]]]), masks), 0.0)


def _hand_case():
    # One 1x6 image: pixel 0 is region A, pixel 5 region B (separated, so two regions); pixels 1-4 are normal.
    masks = np.array([[[True, False, False, False, False, True]]])
    maps = np.array([[[0.9, 0.9, 0.8, 0.2, 0.1, 0.8]]])
    return maps, masks


def test_aupro_hand_computed_intermediate_case():
    maps, masks = _hand_case()
    # Thresholds, highest first (4 normal pixels, so FPR steps of 0.25; PRO = mean of the 2 regions' fractions):
    #   t=0.9: normal {0.9}       -> FPR 0.25; A in, B out -> PRO 0.5
    #   t=0.8: normal {0.9, 0.8}  -> FPR 0.5;  A, B in     -> PRO 1
    #   t=0.2 -> (0.75, 1); t=0.1 -> (1, 1)
    # Curve (0,0) (0.25,0.5) (0.5,1) (0.75,1) (1,1). Up to 0.3: triangle 0.5*0.25*0.5 = 0.0625, then from
    # 0.25 to 0.3 with PRO interpolated to 0.5 + 0.5*(0.05/0.25) = 0.6: 0.05*(0.5+0.6)/2 = 0.0275.
    # Total 0.09, normalised by 0.3 -> 0.3.
    assert np.isclose(aupro(maps, masks), 0.3, rtol=0, atol=1e-12)
    # Whole curve: 0.0625 + 0.25*(0.5+1)/2 + 0.25 + 0.25 = 0.75.
    assert np.isclose(aupro(maps, masks, fpr_limit=1.0), 0.75, rtol=0, atol=1e-12)
    fpr, pro = pro_curve(maps, masks)
    assert np.allclose(fpr, [0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(pro, [0, 0.5, 1, 1, 1])


def test_aupro_weights_regions_equally_not_pixels():
    # A 1x7 image: region A = pixels 0-2 (3 px), region B = pixel 6; pixels 3-5 normal (map 0.5).
    masks = np.array([[[True, True, True, False, False, False, True]]])
    maps = np.array([[[0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0]]])
    # t=1: FPR 0, PRO = mean(0/3, 1/1) = 0.5 (a pixel-weighted overlap would give 0.25); then t=0.5 -> (1, 0.5).
    assert np.isclose(aupro(maps, masks), 0.5)


def test_aupro_uses_8_connectivity():
    # Defects at (0,0), (1,1), (1,2): one region under 8-connectivity (two under 4-connectivity).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = 1.0, 0.0, 0.0
    # 8-connected: one region of 3 pixels, 1 above t=1 -> PRO 1/3 at FPR 0, flat to FPR 1 -> AUPRO 1/3.
    # (4-connected it would be mean(1, 0) = 0.5.)
    assert np.isclose(aupro(maps, masks), 1 / 3)


def test_aupro_regions_are_per_image():
    # Two 1x2 images whose defects touch across the image boundary if stacked; they must stay 2 regions.
    masks = np.array([[[False, True]], [[False, True]], [[False, False]]])
    maps = np.array([[[0.2, 1.0]], [[0.2, 0.0]], [[0.2, 0.2]]])
    # t=1: FPR 0, PRO mean(1, 0) = 0.5; t=0.2: FPR 1, PRO 0.5 -> AUPRO 0.5.
    assert np.isclose(aupro(maps, masks), 0.5)
    assert np.isclose(reference_aupro(maps, masks), 0.5)


@pytest.mark.parametrize("seed", range(0, 20, 3))
def test_pro_curve_monotone_with_endpoints(seed):
    maps, masks = _random_aupro_case(seed)
    fpr, pro = pro_curve(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert np.isclose(fpr[-1], 1.0) and np.isclose(pro[-1], 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert np.all((fpr >= 0) & (fpr <= 1) & (pro >= 0) & (pro <= 1))
    assert len(fpr) == len(np.unique(maps)) + 1


def test_aupro_needs_regions_and_normal_pixels():
    with pytest.raises(ValueError):
        aupro(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError):
        aupro(np.random.default_rng(0).random((2, 4, 4)), np.ones((2, 4, 4), dtype=bool))


# ----------------------------------------------------------------------------------------------------------------------
# compute_metrics


@pytest.fixture
def test_set():
    rng = np.random.default_rng(7)
    types = ["good"] * 8 + ["scratch"] * 5 + ["dent"] * 4
    labels = np.array([t != "good" for t in types], dtype=int)
    scores = rng.normal(size=len(types))
    scores[8:13] += 5.0  # scratches separate perfectly from the good images
    scores[13:] -= 0.5  # dents overlap them, and pull the overall AUROC below 1
    masks = np.zeros((len(types), 10, 10), dtype=bool)
    for i in range(8, len(types)):
        y, x = rng.integers(0, 7, size=2)
        masks[i, y:y + 3, x:x + 3] = True
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2)
    return scores, labels, types, maps, masks


def test_compute_metrics_overall(test_set):
    scores, labels, types, maps, masks = test_set
    out = compute_metrics(scores, labels, types, maps, masks)
    assert set(out) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "n_images", "image_auroc_ci", "pixel_auroc_ci",
                        "per_defect"}
    assert out["n_images"] == len(types)
    assert np.isclose(out["image_auroc"], skm.roc_auc_score(labels, scores), rtol=0, atol=1e-12)
    assert out["image_auroc"] < 1.0
    assert np.isclose(out["pixel_auroc"], skm.roc_auc_score(masks.ravel(), maps.ravel()), rtol=0, atol=1e-12)
    assert np.isclose(out["aupro"], reference_aupro(maps, masks), rtol=0, atol=1e-9)
    assert np.isclose(out["f1_max"], _sklearn_f1_max(labels, scores), rtol=0, atol=1e-12)


def test_compute_metrics_per_defect_scores_each_type_against_all_good(test_set):
    scores, labels, types, maps, masks = test_set
    out = compute_metrics(scores, labels, types, maps, masks)
    assert set(out["per_defect"]) == {"scratch", "dent"}
    for defect, n_defect in [("scratch", 5), ("dent", 4)]:
        entry = out["per_defect"][defect]
        subset = np.array([t in ("good", defect) for t in types])
        assert set(entry) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "n_images"}
        assert entry["n_images"] == 8 + n_defect
        assert np.isclose(entry["image_auroc"], skm.roc_auc_score(labels[subset], scores[subset]),
                          rtol=0, atol=1e-12)
        assert np.isclose(entry["pixel_auroc"], skm.roc_auc_score(masks[subset].ravel(), maps[subset].ravel()),
                          rtol=0, atol=1e-12)
        assert np.isclose(entry["aupro"], reference_aupro(maps[subset], masks[subset]), rtol=0, atol=1e-9)
        assert np.isclose(entry["f1_max"], _sklearn_f1_max(labels[subset], scores[subset]), rtol=0, atol=1e-12)
    assert out["per_defect"]["scratch"]["image_auroc"] == 1.0


def test_one_sort_serves_every_defect_type_and_the_curves_exactly(test_set):
    """compute_metrics sorts the pixels once and restricts that ranking to each defect type's images: the
    results equal those of sorting each subset anew, to the bit (images shuffled, so types interleave)."""
    scores, labels, types, maps, masks = test_set
    perm = np.random.default_rng(3).permutation(len(types))
    scores, labels, maps, masks = scores[perm], labels[perm], maps[perm], masks[perm]
    types = [types[i] for i in perm]
    out = compute_metrics(scores, labels, types, maps, masks, n_boot=0, curves=True)
    assert out["pixel_curves"] == pixel_curves(maps, masks)
    for defect, entry in out["per_defect"].items():
        subset = np.array([t in ("good", defect) for t in types])
        assert entry["pixel_auroc"] == auroc(maps[subset], masks[subset])
        assert entry["aupro"] == aupro(maps[subset], masks[subset])


def test_compute_metrics_without_maps_has_no_pixel_metrics(test_set):
    scores, labels, types, maps, masks = test_set
    for m, k in [(None, None), (maps, None), (None, masks)]:
        out = compute_metrics(scores, labels, types, m, k)
        assert out["pixel_auroc"] is None and out["aupro"] is None
        assert np.isclose(out["image_auroc"], skm.roc_auc_score(labels, scores))
        for entry in out["per_defect"].values():
            assert entry["pixel_auroc"] is None and entry["aupro"] is None
            assert entry["image_auroc"] is not None


def test_compute_metrics_only_good_images_gives_none(test_set):
    scores, labels, types, maps, masks = test_set
    out = compute_metrics(scores[:8], labels[:8], types[:8], maps[:8], masks[:8])
    assert out["n_images"] == 8
    assert out["image_auroc"] is None and out["f1_max"] is None and out["pixel_auroc"] is None
    assert out["per_defect"] == {}


def test_only_defective_images_still_have_pixel_metrics(test_set):
    # their good pixels are the negatives: pixel metrics need no good image, image metrics do
    scores, labels, types, maps, masks = (v[8:] for v in test_set)
    out = compute_metrics(scores, labels, types, maps, masks, n_boot=50)
    assert out["image_auroc"] is None and out["f1_max"] is None and out["image_auroc_ci"] is None
    assert np.isclose(out["pixel_auroc"], skm.roc_auc_score(masks.ravel(), maps.ravel()), rtol=0, atol=1e-12)
    assert np.isclose(out["aupro"], reference_aupro(maps, masks), rtol=0, atol=1e-9)
    assert out["pixel_auroc_ci"][0] <= out["pixel_auroc"] <= out["pixel_auroc_ci"][1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_scores_are_refused_as_sklearn_refuses_them(test_set, bad):
    """NaN ranked below everything and equal infinities split into separate thresholds: the metrics were
    numbers that depended on the images' order. A model whose output overflows has no metrics."""
    scores, labels, types, maps, masks = test_set
    bad_scores, bad_maps = scores.copy(), maps.copy()
    bad_scores[[0, 9]], bad_maps[9, 0, 0] = bad, bad
    for call in (lambda: auroc(bad_scores, labels), lambda: f1_max(bad_scores, labels),
                 lambda: auroc(bad_maps, masks), lambda: aupro(bad_maps, masks), lambda: pixel_curves(bad_maps, masks),
                 lambda: compute_metrics(bad_scores, labels, types, maps, masks),
                 lambda: compute_metrics(scores, labels, types, bad_maps, masks),
                 # no metric would rank them: good images only, no masks
                 lambda: compute_metrics(bad_scores[:8], labels[:8]),
                 lambda: compute_metrics(scores, labels, types, bad_maps, None)):
        with pytest.raises(ValueError, match="are NaN or infinite"):
            call()
    with pytest.raises(ValueError):
        skm.roc_auc_score(labels, bad_scores)


def test_any_label_not_zero_is_defective_as_sklearn_reads_it(test_set):
    scores, labels, types, maps, masks = test_set
    out = compute_metrics(scores, labels * 2, n_boot=50)
    assert np.isclose(out["image_auroc"], skm.roc_auc_score(labels * 2, scores), rtol=0, atol=1e-12)
    assert out == compute_metrics(scores, labels, n_boot=50)


def test_speed_benchmark_checks_both_ways_agree_and_names_the_machine():
    script = Path(__file__).parents[2] / "benchmarks" / "metrics_speed.py"
    out = subprocess.run([sys.executable, str(script), "--images", "30", "--sizes", "16", "--repeats", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\| 16² \| 0\.0 M \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", out, flags=re.M), out
    assert "machine: " in out and "cores; numpy" in out
