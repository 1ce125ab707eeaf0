"""Heatmap rendering shared by `rayad predict` (and later Serve and the dashboard)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchors of a perceptually ordered palette (black - purple - red - yellow - white, like "inferno").
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB."""
    pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def heatmap_image(anomaly_map: np.ndarray, threshold: float, size: tuple[int, int] | None = None) -> Image.Image:
    """Colour a map so that the threshold sits in the middle of the palette; optionally resize to (w, h)."""
    image = Image.fromarray(colorize(anomaly_map / (2 * threshold)))
    return image.resize(size, Image.Resampling.BILINEAR) if size else image
