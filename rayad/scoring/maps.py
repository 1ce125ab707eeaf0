"""Anomaly maps and image scores as plain tensor functions (docs/design.md, "The method")."""

from __future__ import annotations

import torch

from rayad.filters import gaussian_blur


def anomaly_map(x: torch.Tensor, reconstruction: torch.Tensor, sigma: float) -> torch.Tensor:
    """Channel mean of the squared residual, Gaussian-smoothed: (B, 1, H, W)."""
    residual = (x - reconstruction.float()).pow(2).mean(dim=1, keepdim=True)
    return gaussian_blur(residual, sigma)


def image_score(maps: torch.Tensor, mode: str = "max", topk: float = 0.01) -> torch.Tensor:
    """Max of the map, or the mean of its top `topk` fraction of pixels: (B,)."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)
