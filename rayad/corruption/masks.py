"""Random corruption masks: unions of strokes, ellipses and noise blobs with an exact total area.

Every shape is a scalar field that peaks at 1 inside it. The union's field is their maximum, and the
mask is its top `area` fraction of pixels, so the area is exact and each shape keeps its form (a
level set of an ellipse's field is an ellipse, of a stroke's a stroke of some thickness).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rayad.filters import smooth_noise

ShapeField = Callable[[int, int, int, torch.Generator, torch.device], torch.Tensor]
SHAPES: dict[str, ShapeField] = {}


def register_shape(name: str):
    def wrap(fn: ShapeField) -> ShapeField:
        SHAPES[name] = fn
        return fn
    return wrap


def _coords(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.linspace(0, 1, h, device=device).view(1, h, 1)
    xs = torch.linspace(0, 1, w, device=device).view(1, 1, w)
    return ys, xs


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


@register_shape("ellipse")
def ellipse_field(n: int, h: int, w: int, gen: torch.Generator, device) -> torch.Tensor:
    """Rotated ellipses: 1 at the centre, falling linearly with the normalised radius."""
    ys, xs = _coords(h, w, device)
    cy, cx = (_uniform(n, 0.1, 0.9, gen, device).view(n, 1, 1) for _ in range(2))
    ry, rx = (_uniform(n, 0.05, 0.3, gen, device).view(n, 1, 1) for _ in range(2))
    theta = _uniform(n, 0, torch.pi, gen, device).view(n, 1, 1)
    dy, dx = ys - cy, xs - cx
    u = dx * torch.cos(theta) + dy * torch.sin(theta)
    v = -dx * torch.sin(theta) + dy * torch.cos(theta)
    return 1 - torch.sqrt((u / rx) ** 2 + (v / ry) ** 2)


@register_shape("stroke")
def stroke_field(n: int, h: int, w: int, gen: torch.Generator, device, vertices: int = 8) -> torch.Tensor:
    """Free-form brush strokes: a random-walk polyline; 1 on the line, falling with the distance to it.

    Thin (1-8 px at 128 px) so that scratch- and crack-like lines are learnt too."""
    ys, xs = _coords(h, w, device)
    start = _uniform(2 * n, 0.15, 0.85, gen, device).view(n, 1, 2)
    angles = _uniform(n, 0, 2 * torch.pi, gen, device).view(n, 1) + torch.cumsum(
        torch.randn((n, vertices - 1), generator=gen, device=device) * 0.8, dim=1)
    steps = _uniform(n * (vertices - 1), 0.05, 0.15, gen, device).view(n, vertices - 1, 1)
    deltas = steps * torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)
    points = torch.cat([start, start + torch.cumsum(deltas, dim=1)], dim=1)  # (n, V, 2) as (y, x)
    width = _uniform(n, 0.005, 0.03, gen, device).view(n, 1, 1)
    dist = torch.full((n, h, w), float("inf"), device=device)
    for a, b in zip(points[:, :-1].unbind(1), points[:, 1:].unbind(1), strict=True):
        dist = torch.minimum(dist, _segment_distance(ys, xs, a, b))
    return 1 - dist / width


@register_shape("blob")
def blob_field(n: int, h: int, w: int, gen: torch.Generator, device) -> torch.Tensor:
    """Thresholded Perlin-style noise: irregular blobs wherever the noise peaks."""
    cells = int(torch.randint(2, 7, (1,), generator=gen, device=device))
    noise = smooth_noise((n, 1, h, w), cells, gen, device)[:, 0]
    low = noise.amin(dim=(1, 2), keepdim=True)
    high = noise.amax(dim=(1, 2), keepdim=True)
    return (noise - low) / (high - low + 1e-8)


def _segment_distance(ys, xs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from every pixel to the segment a-b, for n segments at once: (n, H, W)."""
    ay, ax = a[:, 0].view(-1, 1, 1), a[:, 1].view(-1, 1, 1)
    by, bx = b[:, 0].view(-1, 1, 1), b[:, 1].view(-1, 1, 1)
    vy, vx = by - ay, bx - ax
    t = (((ys - ay) * vy + (xs - ax) * vx) / (vy**2 + vx**2 + 1e-12)).clamp(0, 1)
    return torch.hypot(ys - (ay + t * vy), xs - (ax + t * vx))


def random_masks(batch: int, h: int, w: int, shapes: tuple[str, ...], max_shapes: int,
                 area_min: float, area_max: float, gen: torch.Generator, device=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (B, H, W) bool of 1..max_shapes shapes with area in [area_min, area_max] of the image.

    Also returns the index (B, H, W) of the shape that owns each pixel, so each shape can get its own fill.
    """
    kinds = torch.randint(len(shapes), (batch, max_shapes), generator=gen, device=device)
    n_shapes = torch.randint(1, max_shapes + 1, (batch, 1), generator=gen, device=device)
    fields = torch.full((batch, max_shapes, h, w), -float("inf"), device=device)
    for k, name in enumerate(shapes):
        # Generate every slot with every kind keeps the random stream independent of the outcome.
        field = SHAPES[name](batch * max_shapes, h, w, gen, device).view(batch, max_shapes, h, w)
        fields = torch.where((kinds == k).view(batch, max_shapes, 1, 1), field, fields)
    unused = torch.arange(max_shapes, device=device).view(1, -1) >= n_shapes
    fields = fields.masked_fill(unused.view(batch, max_shapes, 1, 1), -float("inf"))
    union, owner = fields.max(dim=1)
    area = _uniform(batch, area_min, area_max, gen, device)
    k = (area * h * w).round().clamp(min=1).long()
    sorted_vals = union.flatten(1).sort(dim=1, descending=True).values
    threshold = sorted_vals.gather(1, (k - 1).view(-1, 1)).view(batch, 1, 1)
    return union >= threshold, owner
