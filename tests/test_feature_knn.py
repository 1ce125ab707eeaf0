"""benchmarks/feature_knn.py: the pretrained weights load into timm's network, and the kNN score."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "feature_knn.py"
spec = importlib.util.spec_from_file_location("feature_knn", SCRIPT)
feature_knn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(feature_knn)


def test_the_wheels_weights_are_imagenets_in_timms_network():
    x = F.interpolate(torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255, size=224,
                      mode="bilinear", antialias=True)
    mean, std = (torch.tensor(v)[:, None, None] for v in (feature_knn.IMAGENET_MEAN, feature_knn.IMAGENET_STD))
    with torch.no_grad():
        top = feature_knn.imagenet_lite0()((x - mean) / std).argmax(1).item()
    assert 281 <= top <= 285  # ImageNet's domestic cats: the photograph is of a cat


def test_knn_score_is_zero_on_the_bank_and_rises_with_a_defect():
    gravel = skimage.data.gravel()
    images = np.stack([np.repeat(gravel[r:r + 64, c:c + 64, None], 3, 2) for r, c in ((0, 0), (0, 256), (256, 0))])
    knn = feature_knn.KnnScorer(feature_knn.pretrained_encoder(), images, size=10**6)  # every position kept
    assert knn.bank.shape == (3 * 64 * 64, 64)
    defective = images[:1].copy()
    defective[0, 20:44, 20:44] = 0  # a black square
    # Zero on the bank's own images, but for the rounding of cdist's matrix-product form.
    assert knn(images).max() < 0.01 * knn(defective)[0]
