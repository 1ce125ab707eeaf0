"""The raw-pixel nearest-neighbour baseline: against a hand computation, and on an obvious dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from rayad.baselines import nearest_neighbour, nearest_neighbour_metrics, shrink

ROOT = Path(__file__).parent.parent


def gray(images: np.ndarray) -> np.ndarray:
    r, g, b = (images[..., i].astype(np.float64) for i in range(3))
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255


def test_nearest_neighbour_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    test = np.concatenate([train[[3]], rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)])
    scores, maps = nearest_neighbour(train, test, size=8)  # no shrinking: grayscale only
    for i, image in enumerate(gray(test)):
        distances = [np.sqrt(((image - ref) ** 2).sum()) for ref in gray(train)]
        nearest = gray(train)[int(np.argmin(distances))]
        assert np.isclose(scores[i], min(distances), rtol=0, atol=1e-12)
        assert np.allclose(maps[i], (image - nearest) ** 2, rtol=0, atol=1e-12)
    assert scores[0] == 0 and not maps[0].any()  # a training image is its own nearest neighbour


def test_shrinking_averages_blocks_and_maps_come_back_at_image_size():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    test[0] = train[1]
    test[0, 2:4, 4:6] = 255  # one 2 x 2 block of a training image, one pixel of its 4 x 4 copy

    def blocks(a):
        return gray(a).reshape(len(a), 4, 2, 4, 2).mean(axis=(2, 4))

    assert np.allclose(shrink(test, 4), blocks(test), rtol=0, atol=1e-12)
    scores, maps = nearest_neighbour(train, test, size=4)
    expected = [min(np.sqrt(((t - r) ** 2).sum()) for r in blocks(train)) for t in blocks(test)]
    assert np.allclose(scores, expected, rtol=0, atol=1e-12)
    assert maps.shape == (2, 8, 8) and (maps >= 0).all()
    block = np.zeros((8, 8), bool)
    block[2:4, 4:6] = True
    assert np.isclose(scores[0], np.sqrt(((blocks(test[:1]) - blocks(train[1:2])) ** 2).sum()))
    assert np.allclose(maps[0][block], maps[0].max())  # upsampled bilinearly: the block is the peak ...
    assert not maps[0][~ndimage.binary_dilation(block, iterations=2)].any()  # ... and nothing far from it


def write_dataset(root: Path) -> Path:
    """MVTec layout: smooth good images, good test images near training ones, and bright squares."""
    rng = np.random.default_rng(2)
    base = root / "tiles"

    def texture():
        return ndimage.gaussian_filter(rng.normal(128, 40, (32, 32)), 2).clip(0, 255)

    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(array).astype(np.uint8)).save(path)

    train = [texture() for _ in range(8)]
    for i, image in enumerate(train):
        save(base / "train" / "good" / f"{i:03d}.png", image)
    for i in range(4):
        save(base / "test" / "good" / f"{i:03d}.png", train[2 * i] + rng.normal(0, 2, (32, 32)))
    for i in range(5):
        image, mask = train[i].copy(), np.zeros((32, 32), bool)
        top, left = rng.integers(2, 18, 2)
        mask[top:top + 12, left:left + 12] = True
        image[mask] = 255
        save(base / "test" / "square" / f"{i:03d}.png", image)
        save(base / "ground_truth" / "square" / f"{i:03d}_mask.png", mask * 255)
    return root


def test_obvious_defects_score_perfectly(tmp_path):
    root = write_dataset(tmp_path)
    metrics = nearest_neighbour_metrics(root, "tiles", size=8)
    assert metrics["n_train"] == 8 and metrics["n_images"] == 9 and metrics["size"] == 8
    assert metrics["image_auroc"] == 1.0 and metrics["per_defect"]["square"]["image_auroc"] == 1.0
    assert metrics["image_auroc_ci"] == [1.0, 1.0]
    assert metrics["pixel_auroc"] > 0.95 and metrics["aupro"] > 0.9
    assert metrics["pixel_auroc_ci"][0] <= metrics["pixel_auroc"] <= metrics["pixel_auroc_ci"][1]


def test_benchmark_script_prints_the_tables_and_the_machine(tmp_path):
    root = write_dataset(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--data", str(root),
                          "--size", "8", "--json", str(tmp_path / "nn.json")], capture_output=True, text=True,
                         check=True, env={**os.environ, "RAYAD_CACHE_DIR": str(tmp_path / "cache")}).stdout
    assert "tiles: nearest neighbour, 8x8 grayscale, 8 training images" in out
    assert "image AUROC 95% CI [1.0000, 1.0000]" in out and "square" in out
    assert "machine: " in out and "wall time" in out
    assert (tmp_path / "nn.json").is_file()
