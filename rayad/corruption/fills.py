"""Fill sources: what replaces the masked region. Each takes clean images (B, C, H, W) and returns fills."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rayad.filters import fractal_noise, smooth_noise

Fill = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
FILLS: dict[str, Fill] = {}


def register_fill(name: str):
    def wrap(fn: Fill) -> Fill:
        FILLS[name] = fn
        return fn
    return wrap


def _rand(shape, gen, device, low=0.0, high=1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, device=device)


@register_fill("patch")
def patch_fill(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Another training image of the batch, flipped/rotated and shifted to another location."""
    b, _, h, w = x.shape
    offsets = torch.randint(1, max(b, 2), (b,), generator=gen, device=x.device)
    source = x[(torch.arange(b, device=x.device) + offsets) % b]
    out = []
    for img, rot, flip, dy, dx in zip(source,
                                      torch.randint(4, (b,), generator=gen, device=x.device).tolist(),
                                      torch.randint(2, (b,), generator=gen, device=x.device).tolist(),
                                      torch.randint(h, (b,), generator=gen, device=x.device).tolist(),
                                      torch.randint(w, (b,), generator=gen, device=x.device).tolist(),
                                      strict=True):
        img = torch.rot90(img, rot, dims=(1, 2)) if h == w else img
        img = img.flip(-1) if flip else img
        out.append(torch.roll(img, shifts=(dy, dx), dims=(1, 2)))
    return torch.stack(out)


@register_fill("texture")
def texture_fill(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A foreign procedural texture: fractal noise of random mean, contrast and (half the time) colour."""
    b, c, h, w = x.shape
    gray = torch.rand((b, 1, 1, 1), generator=gen, device=x.device) < 0.5
    cells = int(torch.randint(2, 9, (1,), generator=gen, device=x.device))
    noise = fractal_noise((b, c, h, w), gen, x.device, base_cells=cells)
    noise = torch.where(gray, noise[:, :1].expand(-1, c, -1, -1), noise)
    mean = _rand((b, c, 1, 1), gen, x.device)
    mean = torch.where(gray, mean[:, :1].expand(-1, c, -1, -1), mean)
    contrast = _rand((b, 1, 1, 1), gen, x.device, 0.2, 1.5)
    return mean + contrast * (noise - noise.mean(dim=(2, 3), keepdim=True))


@register_fill("distort")
def distort_fill(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The image itself under a smooth random elastic displacement of up to ~10% of its size."""
    b, _, h, w = x.shape
    amplitude = _rand((b, 1, 1, 1), gen, x.device, 0.03, 0.2)
    flow = (smooth_noise((b, 2, h, w), 4, gen, x.device) - 0.5) * 2 * amplitude
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).unsqueeze(0) + flow.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


@register_fill("shift")
def shift_fill(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The image itself with an intensity/colour shift: a random gain and offset per channel."""
    b, c, _, _ = x.shape
    gain = _rand((b, 1, 1, 1), gen, x.device, 0.5, 1.5) * _rand((b, c, 1, 1), gen, x.device, 0.85, 1.15)
    offset = _rand((b, 1, 1, 1), gen, x.device, -0.25, 0.25)
    return x * gain + offset
