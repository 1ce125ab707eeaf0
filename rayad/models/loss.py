"""Reconstruction loss: weighted per-pixel squared error plus an optional SSIM term."""

from __future__ import annotations

import torch

from rayad.config import TrainConfig
from rayad.filters import gaussian_blur


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        cfg: TrainConfig) -> torch.Tensor:
    """Mean of w(x) * (output - target)^2 with w = w_corrupt inside the mask, w_clean outside; + SSIM."""
    squared = (output.float() - target).pow(2)
    if cfg.w_corrupt == cfg.w_clean:
        loss = cfg.w_clean * squared.mean()
    else:
        weight = cfg.w_clean + (cfg.w_corrupt - cfg.w_clean) * mask
        loss = (weight * squared).mean()
    if cfg.ssim_weight > 0:
        loss = loss + cfg.ssim_weight * (1 - ssim(output.float(), target))
    return loss


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, c1: float = 0.01**2,
         c2: float = 0.03**2) -> torch.Tensor:
    """Mean structural similarity with a Gaussian window (Wang et al. 2004), for images in [0, 1]."""
    mu_x, mu_y = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    var_x = gaussian_blur(x * x, sigma) - mu_x**2
    var_y = gaussian_blur(y * y, sigma) - mu_y**2
    cov = gaussian_blur(x * y, sigma) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()
