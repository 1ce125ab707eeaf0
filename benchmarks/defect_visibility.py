"""How visible each painted defect kind is to a detector that knows where it lies, and the ceiling that sets.

    python benchmarks/defect_visibility.py [--images 300] [--seed 7] [--categories grass gravel] [--kinds faint] \
        [--runs DIR --data ROOT]

Per category and defect kind, `--images` crops of the demo data's test tiles (cut as `rayad data demo` cuts
them) are painted by `rayad.data.defects`; each painted crop and the same crop unpainted are scored with the
defect's own opacity map A (its exact place and shape, which no real detector has):
- *contrast*: |A-weighted mean inside the mask - mean outside it|;
- *whitened*: the prewhitened matched filter |sum over frequencies but DC of conj(A) X / P|, X the crop's
  spectrum and P the material's noise spectrum averaged over `--images` training crops: the most powerful
  linear test for a known additive signal in stationary Gaussian noise.
And one score without the oracle:
- *scan*: the largest prewhitened correlation of the crop with a Gaussian blob (sigma 8, 16 or 24 px) over
  every position, in units of its spread on training crops: a linear blob detector that must find the place.
Each column is the AUROC of painted against unpainted crops; *pixels* is the kind's share of the defect
pixels. A category's image AUROC is the mean of its kinds' (every kind has as many test images) and its
pooled pixel AUROC weighs the kinds by their pixels, so the `ceiling` row estimates what a category reaches
if every kind were found as well as its best oracle score finds it: the mean of those AUROCs, and their
pixel-weighted mean (were each kind's pixels ranked as well as the oracle ranks its images), printed when
every kind is measured. Estimates, not bounds: the oracle knows the place, but it is linear.

With `--runs DIR --data ROOT` (DIR/<category> a trained run, ROOT the demo data), three columns show what the
model sees of each kind on ROOT's test split: its anomaly map's mean on the defect's pixels over its mean on
good images (a kind the network passes through stays near 1), and the kind's pixel and image AUROC, as
`rayad evaluate` reports them per defect type.
"""

from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path

import numpy as np
import skimage.data
from scipy import ndimage

from rayad.artifact import Predictor
from rayad.cli import count, run_script
from rayad.data.dataset import load_split
from rayad.data.defects import DEFECTS, paint_defect_alpha
from rayad.data.demo import CATEGORIES, TRANSFORMS, tile_crops
from rayad.data.manifest import build_manifest
from rayad.metrics import auroc, compute_metrics
from rayad.precision import cpu_summary

SCAN_SIGMAS = (8, 16, 24)
SCORES = ("contrast", "whitened", "scan")


def spectrum(crop: np.ndarray) -> np.ndarray:
    """2-D spectrum of a crop without its mean (DC 0)."""
    crop = crop.astype(np.float64)
    return np.fft.fft2(crop - crop.mean())


def noise_spectrum(spectra: list[np.ndarray]) -> np.ndarray:
    """Mean power of training crops, smoothed over neighbouring frequencies and floored (never 0)."""
    power = ndimage.uniform_filter(np.mean([np.abs(s) ** 2 for s in spectra], axis=0), 3, mode="wrap")
    return power + 1e-3 * power.mean()


def whitened_match(template: np.ndarray, x: np.ndarray, power: np.ndarray) -> float:
    """|<template, x>| in the metric of the inverse noise spectrum, DC left out."""
    terms = np.conj(template) * x / power
    terms[0, 0] = 0
    return abs(float(terms.sum().real))


class BlobScan:
    """Prewhitened correlation with Gaussian blobs at every position, each scale standardised on good crops."""

    def __init__(self, power: np.ndarray, training: list[np.ndarray]):
        h, w = power.shape
        dy, dx = np.minimum(np.arange(h), h - np.arange(h)), np.minimum(np.arange(w), w - np.arange(w))
        r2 = dy[:, None] ** 2 + dx[None, :] ** 2
        self.filters = [np.conj(np.fft.fft2(np.exp(-r2 / (2 * s**2)))) / power for s in SCAN_SIGMAS]
        self.spread = [np.std([self._map(f, x) for x in training]) for f in self.filters]

    @staticmethod
    def _map(filt: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.fft.ifft2(filt * x).real

    def __call__(self, x: np.ndarray) -> float:
        return max(float(np.abs(self._map(f, x)).max()) / s for f, s in zip(self.filters, self.spread, strict=True))


def visibility(category: str, kinds: list[str], n: int, seed: int) -> dict[str, dict[str, float]]:
    """Per kind: the AUROC of each of SCORES (painted against the same crops unpainted) and the kind's share of
    the defect pixels."""
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    photo = getattr(skimage.data, category)()
    train = tile_crops(photo, "train", TRANSFORMS[category], rng)
    training = [spectrum(next(train)) for _ in range(n)]
    power = noise_spectrum(training)
    scan = BlobScan(power, training)
    test = tile_crops(photo, "test", TRANSFORMS[category], rng)
    labels = np.repeat([1, 0], n)
    rows, area = {}, {}
    for kind in kinds:
        painted, clean, area[kind] = [], [], 0
        for _ in range(n):
            crop = next(test)
            out, alpha = paint_defect_alpha(crop, kind, rng)
            inside, template = alpha > 0, np.fft.fft2(alpha)
            area[kind] += int(inside.sum())
            for image, into in ((out, painted), (crop, clean)):
                x = image.astype(np.float64)
                contrast = abs(float((alpha * x).sum() / alpha.sum() - x[~inside].mean()))
                spec = spectrum(x)
                into.append((contrast, whitened_match(template, spec, power), scan(spec)))
        columns = np.array(painted + clean)
        rows[kind] = {name: auroc(columns[:, i], labels) for i, name in enumerate(SCORES)}
    for kind in kinds:
        rows[kind]["pixels"] = area[kind] / sum(area.values())
    return rows


def model_view(run: Path, data_root: Path, category: str) -> dict[str, dict[str, float]]:
    """Per kind: the model's map on the defect over its map on good images, and pixel and image AUROC."""
    predictor = Predictor.load(run)
    data = predictor.config.data
    test = load_split(build_manifest(data_root, category, data), "test", predictor.image_size, data.on_bad_image)
    preds = predictor.predict_arrays(test.images)
    metrics = compute_metrics(preds.scores, test.labels, test.defect_types, preds.maps, test.masks, n_boot=0)
    types = np.asarray(test.defect_types)
    good = float(preds.maps[types == "good"].mean())
    return {kind: {"on_defect": float(preds.maps[types == kind][test.masks[types == kind]].mean()) / good,
                   "pixel_auroc": m["pixel_auroc"], "image_auroc": m["image_auroc"]}
            for kind, m in metrics["per_defect"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=count, default=300, help="crops per kind (and training crops)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--kinds", nargs="+", default=list(DEFECTS), choices=list(DEFECTS))
    parser.add_argument("--runs", type=Path, help="DIR/<category>: trained runs to show beside the oracle")
    parser.add_argument("--data", type=Path, help="the demo data the runs are scored on (with --runs)")
    args = parser.parse_args()
    if (args.runs is None) != (args.data is None):
        parser.error("--runs and --data go together")
    start = time.perf_counter()
    model = ["map on defect / good", "model pixel AUROC", "model image AUROC"] if args.runs else []
    print("| " + " | ".join(["category", "kind", "contrast (oracle)", "whitened (oracle)", "scan", "pixels", *model])
          + " |")
    print("|---" * (6 + len(model)) + "|")
    for category in args.categories:
        rows = visibility(category, args.kinds, args.images, args.seed)
        seen = model_view(args.runs / category, args.data, category) if args.runs else {}
        for kind, row in rows.items():
            cells = [row["contrast"], row["whitened"], row["scan"], row["pixels"]]
            if kind in seen:
                cells += [seen[kind]["on_defect"], seen[kind]["pixel_auroc"], seen[kind]["image_auroc"]]
            print(f"| {category} | {kind} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        if set(rows) != set(DEFECTS):
            continue  # the ceiling needs every kind's AUROC and share of pixels
        best = {k: max(r["contrast"], r["whitened"]) for k, r in rows.items()}
        print(f"| {category} | **ceiling**: image AUROC {np.mean(list(best.values())):.3f}, pooled pixel AUROC "
              f"{sum(best[k] * r['pixels'] for k, r in rows.items()):.3f} |" + " |" * (4 + len(model)))
    print(f"\n{args.images} crops per kind, seed {args.seed}; {time.perf_counter() - start:.0f} s on {cpu_summary()}")


if __name__ == "__main__":
    run_script(main)
