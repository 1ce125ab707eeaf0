"""Synthetic test defects painted on real photographs, with exact masks.

Deliberately independent of `rayad.corruption` (numpy + PIL drawing here, torch fields there) so that
evaluating on these defects does not reward a model for recognising its own training corruption.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, giving anti-aliased alpha


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` on a uint8 image, grayscale (H, W) or colour (H, W, C); returns
    (defective image, bool mask (H, W))."""
    img = image.astype(np.float32)
    alpha, paint = DEFECTS[kind](img, rng)
    mask = alpha > 0.3
    alpha = np.where(mask, alpha, 0)  # the mask is exact: no pixel outside it changes
    if img.ndim == 3:
        alpha = alpha[..., None]
        paint = paint if paint.ndim == 3 else paint[..., None]
    out = img * (1 - alpha) + paint * alpha
    return np.clip(out, 0, 255).astype(np.uint8), mask


def _scratch(img, rng):
    """A thin bright or dark curved line."""
    h, w = img.shape[:2]
    length = rng.uniform(0.2, 0.5) * w
    start = rng.uniform(0.2, 0.8, 2) * (w, h)
    angle = rng.uniform(0, np.pi)
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    bend = (start + end) / 2 + rng.normal(0, 0.15 * length, 2)
    t = np.linspace(0, 1, 40)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
    alpha = _draw(img.shape[:2], lambda d, s: d.line([tuple(p * s) for p in curve], fill=255,
                                                 width=int(rng.integers(1, 4) * s)))
    sign = rng.choice([-1, 1])
    return alpha, img + sign * rng.uniform(60, 120)


def _crack(img, rng):
    """A dark, jagged, branching random walk."""
    h, w = img.shape[:2]
    points = [rng.uniform(0.25, 0.75, 2) * (w, h)]
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(8, 16))):
        heading += rng.normal(0, 0.6)
        points.append(points[-1] + rng.uniform(3, 7) * np.array([np.cos(heading), np.sin(heading)]))
    branch_at = int(rng.integers(2, len(points) - 2))
    branch = [points[branch_at]]
    for _ in range(int(rng.integers(3, 7))):
        branch.append(branch[-1] + rng.uniform(3, 6) * np.array([np.cos(heading + 1.2), np.sin(heading + 1.2)]))

    def draw(d, s):
        width = int(rng.integers(1, 3) * s)
        d.line([tuple(p * s) for p in points], fill=255, width=width)
        d.line([tuple(p * s) for p in branch], fill=255, width=width)

    return _draw(img.shape[:2], draw), img * rng.uniform(0.15, 0.45)


def _hole(img, rng):
    """A dark elliptical pit, darkest in its centre."""
    h, w = img.shape[:2]
    cx, cy = rng.uniform(0.2, 0.8, 2) * (w, h)
    rx, ry = rng.uniform(4, 12, 2)
    alpha = _draw(img.shape[:2], lambda d, s: d.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s],
                                                    fill=255))
    yy, xx = np.mgrid[:h, :w]
    radial = np.clip(np.hypot((xx - cx) / rx, (yy - cy) / ry), 0, 1)
    return alpha, rng.uniform(5, 40) + radial * rng.uniform(20, 60)


def _stain(img, rng):
    """A soft-edged blotch that darkens or lightens the surface."""
    blob = _blob(img.shape[:2], rng, radius=rng.uniform(8, 20))
    alpha = np.clip(blob * rng.uniform(0.7, 1.0), 0, 1)
    factor = rng.choice([rng.uniform(0.35, 0.6), rng.uniform(1.5, 1.9)])
    return alpha, img * factor


def _spot(img, rng):
    """A small foreign-material particle of a different, grainy intensity."""
    blob = _blob(img.shape[:2], rng, radius=rng.uniform(4, 9))
    alpha = (blob > 0.5).astype(np.float32)
    level = 230 if img.mean() < 128 else 25
    return alpha, level + rng.normal(0, 12, img.shape)


def _blob(shape, rng, radius):
    """A smooth irregular blob in [0, 1] around a random centre."""
    h, w = shape
    cx, cy = rng.uniform(0.2, 0.8, 2) * (w, h)
    yy, xx = np.mgrid[:h, :w]
    noise = ndimage.gaussian_filter(rng.normal(size=shape), radius / 3)
    noise /= noise.std() + 1e-8
    field = 1 - np.hypot(xx - cx, yy - cy) / radius + 0.25 * noise
    return np.clip(field * 3, 0, 1).astype(np.float32)


def _draw(shape, draw_fn: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    h, w = shape
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw_fn(ImageDraw.Draw(canvas), SUPERSAMPLE)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


DEFECTS: dict[str, Callable] = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain,
                                "spot": _spot}
