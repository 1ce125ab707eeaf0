"""The validation set that model selection sees. Never the test split.

By default: the held-out good images of `data.val_fraction`, plus copies of them with defects painted by
the demo's synthesiser (`rayad.data.defects`, which shares no code with the training corruption). Or a
labelled validation dataset the user provides: its test split (any supported layout) is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from rayad.artifact import Predictor
from rayad.config import Config
from rayad.data.dataset import load_split
from rayad.data.defects import DEFECTS, paint_defect
from rayad.data.manifest import build_manifest
from rayad.errors import DataError
from rayad.inference import AnomalyModel
from rayad.layout import METRIC_NAMES
from rayad.metrics import compute_metrics
from rayad.settings import PREDICT_BATCH

DEFECT_CANVAS = 128  # defects are painted at the scale the synthesiser was made for (the demo's 128² crops)
DEFECTS_PER_IMAGE = 5  # painted copies of each good validation image: 24 good images give 12 of every kind


@dataclass
class ValidationSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int (N,)
    masks: np.ndarray | None  # bool (N, H, W)
    defect_types: list[str]

    @property
    def has_masks(self) -> bool:
        return self.masks is not None and bool(self.masks.any())


def synthesize_validation(good: np.ndarray, seed: int, defects_per_image: int = DEFECTS_PER_IMAGE) -> ValidationSet:
    """The good images, plus `defects_per_image` defective copies of each (defect kinds in turn)."""
    rng = np.random.default_rng([seed, 0x5EED])
    kinds = list(DEFECTS)
    images, masks, types = [*good], [np.zeros(good.shape[1:3], bool)] * len(good), ["good"] * len(good)
    for i in range(len(good) * defects_per_image):
        kind = kinds[i % len(kinds)]
        image, mask = _paint_on_canvas(good[i % len(good)], kind, rng)
        images.append(image)
        masks.append(mask)
        types.append(kind)
    labels = np.array([t != "good" for t in types], dtype=np.int64)
    return ValidationSet(np.stack(images), labels, np.stack(masks), types)


def _paint_on_canvas(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint at DEFECT_CANVAS² and bring the defect back to the image's size the way test images are
    resized (bilinear, masks nearest). Only the defect's change is resampled: pixels away from it stay
    exactly as they were, so resampling blur cannot give the defective copies away."""
    size = image.shape[0]
    if size == DEFECT_CANVAS:
        return paint_defect(image, kind, rng)
    canvas = _resize(image, DEFECT_CANVAS, Image.Resampling.BILINEAR)
    painted, mask = paint_defect(canvas, kind, rng)
    change = (_resize(painted, size, Image.Resampling.BILINEAR).astype(np.int16)
              - _resize(canvas, size, Image.Resampling.BILINEAR).astype(np.int16))
    small_mask = _resize(mask.astype(np.uint8) * 255, size, Image.Resampling.NEAREST) > 127
    return np.clip(image.astype(np.int16) + change, 0, 255).astype(np.uint8), small_mask


def _resize(array: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), method))


def load_validation(cfg: Config, data_root: str | Path, category: str, val_root: str | Path | None = None
                    ) -> ValidationSet:
    """The synthesised validation set of `data_root/category`, or the test split of `val_root/category`."""
    size, policy, limit = cfg.data.image_size, cfg.data.on_bad_image, cfg.data.max_pixels
    if val_root is None:
        good = load_split(build_manifest(data_root, category, cfg.data), "val", size, policy, limit).images
        if len(good) == 0:
            raise DataError(f"{data_root}/{category}: no validation images (set data.val_fraction > 0)")
        return synthesize_validation(good, cfg.data.split_seed)
    split = load_split(build_manifest(val_root, category, cfg.data), "test", size, policy, limit)
    if not 0 < split.labels.sum() < len(split.labels):
        raise DataError(f"{val_root}/{category}: a validation set needs both good and defective images")
    return ValidationSet(split.images, split.labels, split.masks, split.defect_types)


def validation_metrics(network: nn.Module, cfg: Config, vset: ValidationSet, device: torch.device | str,
                       batch_size: int = PREDICT_BATCH) -> dict[str, float | None]:
    """`val_<metric>` for every metric of METRIC_NAMES, scored as `rayad evaluate` scores the test split
    (`scoring.tta=auto` settled as calibration settles it; the network is scored in eval mode, then put
    back in the mode it was in)."""
    was_training = network.training
    predictor = Predictor(AnomalyModel(network, cfg.scoring), cfg, {}, str(device))
    predictor.resolve_tta(vset.images[vset.labels == 0])
    preds = predictor.predict_arrays(vset.images, batch_size)
    network.train(was_training)
    metrics = compute_metrics(preds.scores, vset.labels, None, preds.maps, vset.masks if vset.has_masks else None,
                              n_boot=0)
    return {f"val_{name}": metrics[name] for name in METRIC_NAMES}
