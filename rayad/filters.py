"""Small tensor filters shared by corruption and scoring."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius 4 sigma (as scipy.ndimage.gaussian_filter)."""
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; sigma <= 0 returns x."""
    if sigma <= 0:
        return x
    kernel = gaussian_kernel1d(sigma, x.device, x.dtype)
    radius = kernel.numel() // 2
    channels = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    if pad_h < radius or pad_w < radius:  # image smaller than the kernel: fall back to replicate padding
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def smooth_noise(shape: tuple[int, int, int, int], cells: int, generator: torch.Generator,
                 device=None) -> torch.Tensor:
    """Perlin-style value noise: a random `cells` x `cells` grid upsampled bicubically to (B, C, H, W)."""
    b, c, h, w = shape
    grid = torch.rand((b, c, cells + 1, cells + 1), generator=generator, device=device)
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)


def fractal_noise(shape: tuple[int, int, int, int], generator: torch.Generator, device=None,
                  octaves: int = 4, base_cells: int = 4) -> torch.Tensor:
    """Sum of `octaves` smooth noises at doubling frequency and halving amplitude, scaled to about [0, 1]."""
    total = torch.zeros(shape, device=device)
    for octave in range(octaves):
        total += smooth_noise(shape, base_cells * 2**octave, generator, device) * 0.5**octave
    return total / (2 - 0.5 ** (octaves - 1))
