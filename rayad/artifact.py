"""Model artifacts (`model.safetensors` + `model.json`) and the `Predictor` that loads them without pickle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rayad import __version__
from rayad.config import Config
from rayad.data.dataset import to_tensor
from rayad.data.images import load_image
from rayad.errors import DataError, RayadError
from rayad.inference import AnomalyModel, InferenceBatch
from rayad.models import create_model

WEIGHTS, METADATA = "model.safetensors", "model.json"


def build_anomaly_model(config: Config) -> AnomalyModel:
    return AnomalyModel(create_model(config.model), config.scoring)


def save_artifact(model: AnomalyModel, config: Config, out_dir: str | Path, extra: dict[str, Any] | None = None
                  ) -> Path:
    """Write weights and metadata; files are replaced atomically so a crash never leaves half an artifact."""
    if not model.is_calibrated:
        raise RuntimeError("refusing to save an uncalibrated model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "rayad-model/1",
        "rayad_version": __version__,
        "config": config.to_dict(),
        "image_size": config.data.image_size,
        "preprocessing": {"color": "RGB", "resize": "bilinear", "scale": "x / 255"},
        "threshold": float(model.threshold),
        "normalization": {"score_mean": float(model.score_mean), "score_std": float(model.score_std)},
        **(extra or {}),
    }
    atomic_write(out_dir / WEIGHTS, lambda p: save_file(state, str(p)))
    atomic_write(out_dir / METADATA, lambda p: p.write_text(json.dumps(metadata, indent=2)))
    return out_dir


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


@dataclass
class Predictions:
    scores: np.ndarray  # (N,) float
    labels: np.ndarray  # (N,) bool
    maps: np.ndarray  # (N, H, W) float32 at the model's input size


class Predictor:
    """Scores images with a saved model; evaluate, predict and serve all go through `score`."""

    def __init__(self, model: AnomalyModel, config: Config, metadata: dict[str, Any], device: str = "cpu"):
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)
        self.config = config
        self.metadata = metadata
        self.device = device

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None) -> Predictor:
        run_dir = Path(run_dir)
        weights, meta_path = run_dir / WEIGHTS, run_dir / METADATA
        if not weights.is_file() or not meta_path.is_file():
            raise RayadError(f"{run_dir}: not a rayad model (needs {WEIGHTS} and {METADATA}; train one with "
                             "`rayad train`)")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise RayadError(f"{meta_path}: corrupt metadata ({e})") from None
        config = Config.from_dict(metadata["config"], str(meta_path))
        model = build_anomaly_model(config)
        model.load_state_dict(load_file(str(weights)), strict=True)
        return cls(model, config, metadata, device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def threshold(self) -> float:
        return float(self.model.threshold)

    @torch.no_grad()
    def score(self, images: np.ndarray) -> InferenceBatch:
        """Score one batch of pre-processed uint8 images (N, H, W, 3)."""
        return self.model(self._to_device(images))

    def predict_arrays(self, images: np.ndarray, batch_size: int = 32) -> Predictions:
        """Score pre-processed uint8 images (N, H, W, 3) in batches."""
        size = self.image_size
        scores, labels, maps = [np.zeros(0)], [np.zeros(0, bool)], [np.zeros((0, size, size), np.float32)]
        for start in range(0, len(images), batch_size):
            out = self.score(images[start:start + batch_size])
            scores.append(out.pred_score.float().cpu().numpy())
            labels.append(out.pred_label.cpu().numpy())
            maps.append(out.anomaly_map.float().cpu().numpy())
        return Predictions(np.concatenate(scores), np.concatenate(labels), np.concatenate(maps))

    @torch.no_grad()
    def raw_scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Image scores before calibration (used to calibrate)."""
        chunks = [self.model.raw(self._to_device(images[s:s + batch_size]))[2].float().cpu().numpy()
                  for s in range(0, len(images), batch_size)]
        return np.concatenate([np.zeros(0), *chunks])

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        return to_tensor(images).to(self.device, memory_format=torch.channels_last)

    def predict_files(self, paths: list[str | Path], batch_size: int = 32
                      ) -> tuple[Predictions, list[str | None]]:
        """Score image files. Unreadable files do not stop the run: predictions cover the readable ones,
        and the second value holds, per path, None or the error message."""
        images, errors = [], []
        for p in paths:
            try:
                images.append(load_image(p, self.image_size))
                errors.append(None)
            except DataError as e:
                errors.append(str(e))
        size = self.image_size
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        return self.predict_arrays(stacked, batch_size), errors
