"""Evaluate a model artifact on a dataset's test split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from rayad.artifact import Predictor, trained_category
from rayad.config import DataConfig
from rayad.data.dataset import load_split
from rayad.data.manifest import build_manifest
from rayad.errors import DataError, RayadError
from rayad.metrics import METRIC_NAMES, compute_metrics
from rayad.settings import PREDICT_BATCH

log = logging.getLogger("rayad")


def evaluate(predictor: Predictor | str | Path, data_root: str | Path, category: str,
             data: DataConfig | None = None, batch_size: int = PREDICT_BATCH) -> dict[str, Any]:
    """Metrics of the model on the test split: the keys of METRIC_NAMES, both thresholds, n_images, per_defect, the
    per-image scores (with paths, labels, defect types, mask paths) and pixel ROC/PR curves where masks exist."""
    if not isinstance(predictor, Predictor):
        predictor = Predictor.load(predictor)
    data = data or predictor.config.data
    manifest = build_manifest(data_root, category, data)  # a category that is not there fails before the warning
    trained_on = trained_category(predictor.metadata)
    if trained_on not in (None, category):
        log.warning("the model was trained on %s and is evaluated on %s", trained_on, category)
    # "error" whatever the model trained with: a test split that dropped images would score another test
    test = load_split(manifest, "test", predictor.image_size, "error", data.max_pixels,
                      skip_hint="every test image is scored: fix or remove them")
    if len(test.images) == 0:
        raise DataError(f"{data_root}/{category}: the test split is empty")
    preds = predictor.predict_arrays(test.images, batch_size)
    bad = np.flatnonzero(~np.isfinite(preds.scores) | ~np.isfinite(preds.maps).all(axis=(1, 2)))
    if bad.size:
        raise RayadError(f"the model's output is NaN or infinite on {len(bad)} of {len(preds.scores)} test images "
                         f"(first: {test.rows['path'][int(bad[0])]}): it has no metrics")
    metrics = compute_metrics(preds.scores, test.labels, test.defect_types, preds.maps, test.masks, curves=True)
    return {**metrics, "threshold": predictor.threshold, "pixel_threshold": predictor.pixel_threshold,
            "scores": preds.scores.tolist(),
            "paths": test.rows["path"].to_pylist(), "labels": test.labels.tolist(),
            "defect_types": test.defect_types, "mask_paths": test.rows["mask_path"].to_pylist(),
            "accuracy": float(np.mean(preds.labels == test.labels.astype(bool)))}


def format_table(metrics: dict[str, Any]) -> str:
    """Overall and per-defect metrics as an aligned text table, with the threshold's accuracy."""
    lines = metrics_table(metrics)
    lines.append(f"threshold {metrics['threshold']:.6g}, accuracy at threshold {metrics['accuracy']:.3f}")
    if metrics.get("image_auroc") is None:
        lines.append("no metric where '-': they rank anomalous images against good ones, and the test split lacks one "
                     "of the two")
    elif metrics.get("pixel_auroc") is None:
        why = ("the masks of its anomalous images mark no pixel, or every pixel, as a defect (any non-zero pixel "
               "does; Pillow reads a 16-bit colour PNG by its high bytes)" if any(metrics["mask_paths"]) else
               "its anomalous images have no ground-truth masks")
        lines.append(f"no pixel metric where '-': {why}")
    return "\n".join(lines)


def metrics_table(metrics: dict[str, Any], names: tuple[str, ...] = METRIC_NAMES) -> list[str]:
    """The lines of a table of `names`, overall and per defect type, and the bootstrap intervals."""
    rows = [("all", metrics), *sorted(metrics["per_defect"].items())]
    header = f"{'defect':<14}{'images':>7}" + "".join(f"{name:>13}" for name in names)
    lines = [header, "-" * len(header)]
    for name, m in rows:
        lines.append(f"{name:<14}{m['n_images']:>7}" + "".join(f"{format_metric(m.get(k)):>13}" for k in names))
    intervals = [f"{name} 95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" for name, ci in
                 (("image AUROC", metrics.get("image_auroc_ci")), ("pixel AUROC", metrics.get("pixel_auroc_ci"))) if ci]
    if intervals:
        lines.append(", ".join(intervals) + " (bootstrap over images)")
    return lines


def format_metric(value: float | None) -> str:
    """A metric in a table: 4 decimals, or "-" where it is not defined."""
    return "-" if value is None else f"{value:.4f}"
