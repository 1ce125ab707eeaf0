"""The scoring model: network + anomaly maps + calibration, the one path every consumer scores through."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from rayad.config import ScoringConfig
from rayad.scoring import anomaly_map, image_score, quantile_threshold


class InferenceBatch(NamedTuple):
    pred_score: torch.Tensor  # (B,) image anomaly score
    pred_label: torch.Tensor  # (B,) bool, score >= threshold
    anomaly_map: torch.Tensor  # (B, H, W) at the model's input size
    pred_mask: torch.Tensor  # (B, H, W) bool, map >= threshold
    reconstruction: torch.Tensor  # (B, C, H, W)


class AnomalyModel(nn.Module):
    """Wraps the reconstruction network with scoring. Calibration lives in buffers that start as NaN."""

    def __init__(self, network: nn.Module, scoring: ScoringConfig):
        super().__init__()
        self.network = network
        self.scoring = scoring
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("score_mean", torch.tensor(float("nan")))
        self.register_buffer("score_std", torch.tensor(float("nan")))

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, anomaly map (B, 1, H, W), image score) without any calibration."""
        reconstruction = self.network(x)
        maps = anomaly_map(x, reconstruction, self.scoring.sigma)
        return reconstruction, maps, image_score(maps, self.scoring.image_score, self.scoring.topk)

    def forward(self, x: torch.Tensor) -> InferenceBatch:
        if torch.isnan(self.threshold):
            raise RuntimeError("the model is not calibrated: call calibrate() on good validation images first")
        reconstruction, maps, scores = self.raw(x)
        return InferenceBatch(scores, scores >= self.threshold, maps[:, 0], maps[:, 0] >= self.threshold,
                              reconstruction)

    @property
    def is_calibrated(self) -> bool:
        return not bool(torch.isnan(self.threshold))

    def normalized_score(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores in standard deviations above the mean good validation score."""
        return (scores - self.score_mean) / self.score_std

    @torch.no_grad()
    def calibrate(self, good_scores: np.ndarray, threshold: float | None = None) -> None:
        """Set the threshold (default: the configured quantile of good scores) and the score statistics."""
        good_scores = np.asarray(good_scores, dtype=np.float64)
        if threshold is None:
            threshold = quantile_threshold(good_scores, self.scoring.threshold_quantile)
        self.threshold.fill_(threshold)
        self.score_mean.fill_(good_scores.mean())
        self.score_std.fill_(max(good_scores.std(), 1e-12))
