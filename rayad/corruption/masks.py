"""Random corruption masks: unions of strokes, ellipses and noise blobs with an exact total area.

Every shape is a scalar field that peaks at 1 inside it. The union's field is their maximum, and the
mask is its top `area` fraction of pixels, so the area is exact and each shape keeps its form (a
level set of an ellipse's field is an ellipse, of a stroke's a stroke of some thickness).

A shape is drawn (its random parameters, `(n, ...)`) apart from being rendered (its `(n, H, W)` field),
so every slot draws every kind, keeping the random stream independent of the outcome, while only the
slots that show a kind render it (docs/design.md, "The method").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from rayad.filters import size_randint, upsample_bicubic


class Shape(NamedTuple):
    draw: Callable[[int, torch.Generator, torch.device], torch.Tensor]  # (n, ...) parameters of n shapes
    render: Callable[[torch.Tensor, int, int], torch.Tensor]  # parameters (m, ...) -> fields (m, H, W)


SHAPES: dict[str, Shape] = {}


def register_shape(name: str, draw: Callable[[int, torch.Generator, torch.device], torch.Tensor]):
    """Registers the decorated render function with its `draw` under `name`."""
    def wrap(render: Callable[[torch.Tensor, int, int], torch.Tensor]):
        SHAPES[name] = Shape(draw, render)
        return render
    return wrap


def _coords(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.linspace(0, 1, h, device=device).view(1, h, 1)
    xs = torch.linspace(0, 1, w, device=device).view(1, 1, w)
    return ys, xs


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _draw_ellipses(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 5): centre y, x in [0.1, 0.9], radii y, x in [0.05, 0.3], angle in [0, pi)."""
    cy, cx = (_uniform(n, 0.1, 0.9, gen, device) for _ in range(2))
    ry, rx = (_uniform(n, 0.05, 0.3, gen, device) for _ in range(2))
    return torch.stack([cy, cx, ry, rx, _uniform(n, 0, torch.pi, gen, device)], dim=1)


@register_shape("ellipse", _draw_ellipses)
def ellipse_field(params: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Rotated ellipses: 1 at the centre, falling linearly with the normalised radius."""
    ys, xs = _coords(h, w, params.device)
    cy, cx, ry, rx, theta = params.T[..., None, None]
    dy, dx = ys - cy, xs - cx
    u = dx * torch.cos(theta) + dy * torch.sin(theta)
    v = -dx * torch.sin(theta) + dy * torch.cos(theta)
    return 1 - torch.sqrt((u / rx) ** 2 + (v / ry) ** 2)


def _draw_strokes(n: int, gen: torch.Generator, device, vertices: int = 8) -> torch.Tensor:
    """(n, 2 * vertices + 1): a random-walk polyline's vertices as (y, x) pairs, then its half-width."""
    start = _uniform(2 * n, 0.15, 0.85, gen, device).view(n, 1, 2)
    angles = _uniform(n, 0, 2 * torch.pi, gen, device).view(n, 1) + torch.cumsum(
        torch.randn((n, vertices - 1), generator=gen, device=device) * 0.8, dim=1)
    steps = _uniform(n * (vertices - 1), 0.05, 0.15, gen, device).view(n, vertices - 1, 1)
    deltas = steps * torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)
    points = torch.cat([start, start + torch.cumsum(deltas, dim=1)], dim=1)  # (n, V, 2) as (y, x)
    width = _uniform(n, 0.005, 0.03, gen, device).view(n, 1)
    return torch.cat([points.flatten(1), width], dim=1)


@register_shape("stroke", _draw_strokes)
def stroke_field(params: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Free-form brush strokes: 1 on the polyline, falling with the distance to it.

    Thin (1-8 px at 128 px) so that scratch- and crack-like lines are learnt too."""
    ys, xs = _coords(h, w, params.device)
    points, width = params[:, :-1].unflatten(1, (-1, 2)), params[:, -1, None, None]
    dist = torch.full((len(params), h, w), float("inf"), device=params.device)
    for a, b in zip(points[:, :-1].unbind(1), points[:, 1:].unbind(1), strict=True):
        dist = torch.minimum(dist, _segment_distance(ys, xs, a, b))
    return 1 - dist / width


def _draw_blobs(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """(n, cells + 1, cells + 1): a grid of value noise, with 2 to 6 cells a side (one count for all n)."""
    cells = size_randint(2, 7, gen, salt=1)
    return torch.rand((n, cells + 1, cells + 1), generator=gen, device=device)


@register_shape("blob", _draw_blobs)
def blob_field(params: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Thresholded Perlin-style noise: irregular blobs wherever the noise peaks."""
    noise = upsample_bicubic(params, h, w)
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
    shown = torch.arange(max_shapes, device=device).view(1, -1) < n_shapes
    fields = torch.full((batch * max_shapes, h, w), -float("inf"), device=device)
    for k, name in enumerate(shapes):
        params = SHAPES[name].draw(batch * max_shapes, gen, device)
        slots = ((kinds == k) & shown).flatten()
        if fields.is_cuda:  # a GPU renders every slot at once: picking the slots would cost a host sync
            fields = torch.where(slots.view(-1, 1, 1), SHAPES[name].render(params, h, w), fields)
        else:
            index = slots.nonzero().squeeze(1)
            fields[index] = SHAPES[name].render(params[index], h, w)
    union, owner = fields.view(batch, max_shapes, h, w).max(dim=1)
    area = _uniform(batch, area_min, area_max, gen, device)
    k = (area * h * w).round().clamp(min=1).long()
    # The k-th largest value of each union is its threshold; k is at most round(area_max * h * w).
    k_bound = min(h * w, int(area_max * h * w) + 2)
    top = union.flatten(1).topk(k_bound, dim=1).values
    threshold = top.gather(1, (k - 1).view(-1, 1)).view(batch, 1, 1)
    return union >= threshold, owner
