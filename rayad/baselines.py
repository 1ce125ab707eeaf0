"""A raw-pixel nearest-neighbour detector: the simple method a quality table shows beside rayad.

Images are read as `rayad evaluate` reads them (the manifest of any layout, decoded and resized to
`image_size`), turned to grayscale and shrunk to `size`² by area averaging. A test image's score is the
L2 distance to its nearest training image (every image of train/good; nothing is held out, since nothing is
fitted); its anomaly map is the per-pixel squared difference to that image, upsampled bilinearly to
`image_size`², where the masks are. No learning, no threshold: only the ranking metrics mean anything.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rayad.config import DataConfig
from rayad.data.dataset import ImageSet, load_split
from rayad.data.manifest import build_manifest
from rayad.errors import DataError
from rayad.evaluate import metrics_table
from rayad.metrics import auroc, compute_metrics

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL converts RGB to "L"
SIZE = 32


def nearest_neighbour_metrics(data_root: str | Path, category: str, size: int = SIZE, layout: str = "auto",
                              image_size: int | None = None) -> dict:
    """`compute_metrics` of the nearest-neighbour detector on the test split of `data_root/category`
    (with the bootstrap intervals and per-defect metrics), plus `size`, `n_train` and `seconds`."""
    start = time.perf_counter()
    scores, maps, test, n_train = _test_split_scores(data_root, category, size, layout, image_size)
    metrics = compute_metrics(scores, test.labels, test.defect_types, maps, test.masks)
    return {**metrics, "size": size, "n_train": n_train, "seconds": time.perf_counter() - start}


def nearest_neighbour_image_auroc(data_root: str | Path, category: str) -> float:
    """The image AUROC of `nearest_neighbour_metrics`, without the metrics that need sorting every pixel."""
    scores, _, test, _ = _test_split_scores(data_root, category, SIZE, "auto", None)
    return auroc(scores, test.labels)


def _test_split_scores(data_root, category, size, layout, image_size) -> tuple[np.ndarray, np.ndarray, ImageSet, int]:
    """(scores, maps, the test split, the number of training images) of the detector on `data_root/category`."""
    data = DataConfig(layout=layout, val_fraction=0.0, **({"image_size": image_size} if image_size else {}))
    manifest = build_manifest(data_root, category, data)
    train = load_split(manifest, "train", data.image_size, data.on_bad_image)
    test = load_split(manifest, "test", data.image_size, data.on_bad_image)
    if len(test.images) == 0:
        raise DataError(f"{data_root}/{category}: the test split is empty")
    return *nearest_neighbour(train.images, test.images, size), test, len(train.images)


def nearest_neighbour(train: np.ndarray, test: np.ndarray, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), maps (N, H, W)) of uint8 (N, H, W, 3) test images against (M, H, W, 3) training
    images: L2 distance to the nearest training image at `size`² grayscale, and the squared difference to it
    upsampled to H x W."""
    small_train, small_test = shrink(train, size), shrink(test, size)
    nearest = nearest_indices(small_train.reshape(len(train), -1), small_test.reshape(len(test), -1))
    diff = (small_test - small_train[nearest]) ** 2
    maps = F.interpolate(torch.from_numpy(diff)[:, None], size=test.shape[1:3], mode="bilinear",
                         align_corners=False)[:, 0].numpy()
    return np.sqrt(diff.reshape(len(test), -1).sum(axis=1)), maps


def shrink(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> grayscale float64 (N, size, size) in [0, 1], area-averaged."""
    gray = torch.from_numpy(images.astype(np.float64) @ LUMA / 255.0)[:, None]
    return F.interpolate(gray, size=(size, size), mode="area")[:, 0].numpy()


def nearest_indices(reference: np.ndarray, queries: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Index of the nearest (L2) row of `reference` for every row of `queries`."""
    ref_sq = (reference**2).sum(axis=1)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        out.append(np.argmin(ref_sq[None] - 2 * q @ reference.T, axis=1))  # |q|² is the same for every row
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def format_table(category: str, metrics: dict) -> str:
    """A category's image AUROC (with its interval), pixel AUROC and AUPRO, overall and per defect type."""
    title = (f"{category}: nearest neighbour, {metrics['size']}x{metrics['size']} grayscale, {metrics['n_train']} "
             f"training images, {metrics['seconds']:.1f} s")
    return "\n".join([title, *metrics_table(metrics, ("image_auroc", "pixel_auroc", "aupro"))])
