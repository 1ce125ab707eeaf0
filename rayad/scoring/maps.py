"""Anomaly maps and image scores as plain tensor functions (docs/design.md, "The method")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rayad.filters import gaussian_blur


def anomaly_map(x: torch.Tensor, reconstruction: torch.Tensor, sigma: float, kind: str = "l2") -> torch.Tensor:
    """Residual map, Gaussian-smoothed: (B, 1, H, W). `l2`: channel mean of the squared residual;
    `msgms`: 1 - multi-scale gradient-magnitude similarity (RIAD), which compares local structure and
    ignores small intensity offsets."""
    reconstruction = reconstruction.float()
    if kind == "msgms":
        residual = 1.0 - msgms(x, reconstruction)
    else:
        residual = (x - reconstruction).pow(2).mean(dim=1, keepdim=True)
    return gaussian_blur(residual, sigma)


GMS_C = 0.0026  # RIAD's stabilising constant for images in [0, 1]
GMS_SCALES = 4  # full, 1/2, 1/4 and 1/8 resolution


def msgms(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over scales of the gradient-magnitude similarity of the grayscale images, each scale brought
    back to full resolution: (B, 1, H, W) in [0, 1], 1 where the structure is the same."""
    x, y = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    size = x.shape[-2:]
    total = torch.zeros_like(x)
    for scale in range(GMS_SCALES):
        if scale:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        gx, gy = _gradient_magnitude(x), _gradient_magnitude(y)
        gms = (2 * gx * gy + GMS_C) / (gx.pow(2) + gy.pow(2) + GMS_C)
        total += F.interpolate(gms, size=size, mode="bilinear", align_corners=False) if scale else gms
    return total / GMS_SCALES


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of (B, 1, H, W), replicate-padded."""
    kernel = torch.tensor([[1.0, 0.0, -1.0]] * 3, device=x.device, dtype=x.dtype) / 3
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kernel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, kernel.t().contiguous().view(1, 1, 3, 3))
    return torch.sqrt(gx.pow(2) + gy.pow(2) + 1e-12)


def image_score(maps: torch.Tensor, mode: str = "mean", topk: float = 0.01) -> torch.Tensor:
    """Mean of the map, its max, or the mean of its top `topk` fraction of pixels: (B,)."""
    flat = maps.flatten(1)
    if mode == "mean":
        return flat.mean(dim=1)
    if mode == "max":
        return flat.amax(dim=1)
    k = max(1, round(topk * math.prod(int(size) for size in maps.shape[1:])))  # int(): a traced size is a tensor
    return flat.topk(k, dim=1).values.mean(dim=1)
