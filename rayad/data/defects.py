"""Synthetic test defects painted on real photographs, with exact masks.

Small and thin defects (scratch, crack, hole, stain, spot), and the kinds real lines have beyond them:
branching fine cracks (`fine_crack`), low-contrast diffuse blobs of a few grey levels (`faint`), and
large-area defects covering 10-40 % of the image (`broad_stain`, `dark_region`: an inactive region cut off
along a jagged line from the border, `missing`: material gone, a flat substrate showing).

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
    out, alpha = paint_defect_alpha(image, kind, rng)
    return out, alpha > 0


def paint_defect_alpha(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`paint_defect`, returning the defect's opacity (H, W) instead of its mask: 0 outside the mask, over 0.3
    inside it."""
    img = image.astype(np.float32)
    alpha, paint = DEFECTS[kind](img, rng)
    alpha = np.where(alpha > 0.3, alpha, 0)  # the mask is exact: no pixel outside it changes
    if img.ndim == 3:
        opacity = alpha[..., None]
        paint = paint if paint.ndim == 3 else paint[..., None]
    else:
        opacity = alpha
    out = img * (1 - opacity) + paint * opacity
    return np.clip(out, 0, 255).astype(np.uint8), alpha


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


def _fine_crack(img, rng):
    """A network of 1 px dark cracks: a long jagged line with 2-4 branches, some branching again."""
    size = np.array(img.shape[1::-1], dtype=float)  # (w, h)
    start = rng.uniform(0.25, 0.75, 2) * size
    lines = _crack_tree(start, rng.uniform(0, 2 * np.pi), int(rng.integers(20, 36)), 2, size, rng)

    def draw(d, s):
        for line in lines:
            d.line([tuple(p * s) for p in line], fill=255, width=s)

    alpha = _draw(img.shape[:2], draw)
    return np.where(_largest_region(alpha > 0.3), alpha, 0), img * rng.uniform(0.3, 0.6)


def _crack_tree(start, heading, steps, depth, size, rng) -> list[list[np.ndarray]]:
    """Polylines of a random walk from `start` that turns back at the image border, and of the branches
    that leave it (`depth` levels)."""
    points = [np.asarray(start, dtype=float)]
    for _ in range(steps):
        heading += rng.normal(0, 0.3)
        step = rng.uniform(2, 5) * np.array([np.cos(heading), np.sin(heading)])
        if not ((points[-1] + step >= 1) & (points[-1] + step <= size - 2)).all():
            heading, step = heading + np.pi, -step
        points.append(points[-1] + step)
    lines = [points]
    if depth:
        n_branches = int(rng.integers(2, 5)) if depth == 2 else int(rng.integers(0, 2))
        for at in rng.choice(np.arange(2, steps), size=n_branches, replace=False):
            turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
            lines += _crack_tree(points[at], heading + turn, max(3, steps // 2), depth - 1, size, rng)
    return lines


def _faint(img, rng):
    """A low-contrast diffuse blob: 4-10 grey levels at its centre, fading out, over 8-30 % of the image."""
    field = _radial_field(img.shape[:2], rng, jitter=6, sigma=10)
    level, inside = _region(field, rng.uniform(0.08, 0.3))
    dome = np.clip((field - level) / (field.max() - level), 0, 1)
    alpha = np.where(inside, 0.3 + 0.7 * np.sqrt(dome), 0).astype(np.float32)
    return alpha, img + rng.choice([-1, 1]) * rng.uniform(4, 10)


def _broad_stain(img, rng):
    """A broad discolouration with soft edges over 10-40 % of the image."""
    field = _radial_field(img.shape[:2], rng, jitter=8, sigma=8)
    alpha = _area_alpha(field, rng.uniform(0.1, 0.38), edge=rng.uniform(6, 14))
    factor = rng.choice([rng.uniform(0.55, 0.75), rng.uniform(1.3, 1.5)])
    return alpha, img * factor


def _dark_region(img, rng):
    """A dark inactive region over 10-40 % of the image, cut off from the border along a jagged line; the
    texture still shows through."""
    h, w = img.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:h, :w]
    field = (xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)
    field = field + _smooth_noise((h, w), rng, sigma=6) * rng.uniform(2, 6)
    return _area_alpha(field, rng.uniform(0.1, 0.38), edge=1.5), img * rng.uniform(0.15, 0.45)


def _missing(img, rng):
    """Missing material over 10-40 % of the image: a hard, ragged rim around a flat dark or bright
    substrate with no texture."""
    field = _radial_field(img.shape[:2], rng, jitter=5, sigma=3, centre=(0.1, 0.9))
    alpha = _area_alpha(field, rng.uniform(0.1, 0.38), edge=1.0)
    level = rng.uniform(15, 50) if rng.random() < 0.5 else rng.uniform(200, 240)
    return alpha, level + 3 * _smooth_noise(img.shape[:2], rng, sigma=4)


def _radial_field(shape, rng, jitter, sigma, centre=(0.2, 0.8)) -> np.ndarray:
    """Minus the distance (px) to a random centre, roughened by smooth noise of `jitter` px."""
    h, w = shape
    cx, cy = rng.uniform(*centre, 2) * (w, h)
    yy, xx = np.mgrid[:h, :w]
    return -np.hypot(xx - cx, yy - cy) + jitter * _smooth_noise(shape, rng, sigma)


def _area_alpha(field: np.ndarray, area: float, edge: float) -> np.ndarray:
    """Alpha over the `area` fraction of the image where `field` is highest: 0.3 at the rim (the mask's
    threshold), rising to 1 over `edge` field units inside, 0 outside."""
    level, inside = _region(field, area)
    return np.where(inside, np.clip(0.3 + 0.7 * (field - level) / edge, 0, 1), 0).astype(np.float32)


def _region(field: np.ndarray, area: float) -> tuple[float, np.ndarray]:
    """(level, region): the largest 8-connected region where `field` > level, level bisected so that the
    region covers at least the `area` fraction of the image."""
    lo, hi = float(field.min()), float(field.max())
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _largest_region(field > mid).mean() > area else (lo, mid)
    return lo, _largest_region(field > lo)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of `mask`: stray specks would each count as a defect region in AUPRO."""
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n <= 1:
        return mask
    return labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))


def _smooth_noise(shape, rng, sigma) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return noise / (noise.std() + 1e-8)


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
                                "spot": _spot, "fine_crack": _fine_crack, "faint": _faint,
                                "broad_stain": _broad_stain, "dark_region": _dark_region, "missing": _missing}
LARGE_AREA = ("broad_stain", "dark_region", "missing")  # each covers 10-40 % of the image
