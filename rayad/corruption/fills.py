"""Fill sources: what replaces the masked region. Each takes clean images (B, C, H, W) and returns fills."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rayad.filters import fractal_noise, size_randint, smooth_noise

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
    """Another training image of the batch, rotated by a multiple of 90 degrees (square images), mirrored
    half the time and rolled to another location: one gather of each output pixel from its source pixel."""
    b, c, h, w = x.shape
    offsets = torch.randint(1, max(b, 2), (b,), generator=gen, device=x.device)
    source = x[(torch.arange(b, device=x.device) + offsets) % b]
    rot, flip, dy, dx = (torch.randint(n, (b,), generator=gen, device=x.device).view(b, 1, 1)
                         for n in (4, 2, h, w))
    # Undo the roll, then the mirror, then the rotation (torch.rot90 over (H, W), k times).
    y = (torch.arange(h, device=x.device).view(1, h, 1) - dy) % h
    xx = (torch.arange(w, device=x.device).view(1, 1, w) - dx) % w
    xx = torch.where(flip == 1, w - 1 - xx, xx)
    rot = rot if h == w else torch.zeros_like(rot)
    src_y = torch.where(rot == 0, y, torch.where(rot == 1, xx, torch.where(rot == 2, h - 1 - y, w - 1 - xx)))
    src_x = torch.where(rot == 0, xx, torch.where(rot == 1, h - 1 - y, torch.where(rot == 2, w - 1 - xx, y)))
    index = (src_y * w + src_x).view(b, 1, h * w).expand(b, c, h * w)
    return source.flatten(2).gather(2, index).view(b, c, h, w)


@register_fill("texture")
def texture_fill(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A foreign procedural texture: fractal noise of random mean, contrast and (half the time) colour."""
    b, c, h, w = x.shape
    gray = torch.rand((b, 1, 1, 1), generator=gen, device=x.device) < 0.5
    cells = size_randint(2, 9, gen, salt=2)
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
