"""The scoring model: network + anomaly map + image score, with the calibration held in buffers.

`AnomalyModel(x)` is a pure function of the pixels (no calibration), the graph that training-time
validation, `Predictor` and the exports all run; with `scoring.tta=flips` it averages the reconstructions
of the image's four mirror views. Labels, normalised scores and masks are applied to its outputs by
`rayad.artifact.Predictions` (docs/design.md, "Scoring").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from rayad.config import ScoringConfig
from rayad.precision import autocast
from rayad.scoring import anomaly_map, image_score, quantile_threshold

FLIPS = ((), (-1,), (-2,), (-2, -1))  # the image, mirrored left-right, upside down, and both (180°)
TTA_TOLERANCE = 1.1  # auto: a mirror view may reconstruct good images at most 10% worse than the image


class InferenceBatch(NamedTuple):
    pred_score: torch.Tensor  # (B,) image anomaly score
    anomaly_map: torch.Tensor  # (B, H, W) at the model's input size
    reconstruction: torch.Tensor  # (B, C, H, W)


class AnomalyModel(nn.Module):
    """Wraps the reconstruction network with scoring. Calibration lives in buffers that start as NaN."""

    def __init__(self, network: nn.Module, scoring: ScoringConfig):
        super().__init__()
        self.network = network
        self.scoring = scoring
        self.register_buffer("threshold", torch.tensor(float("nan")))  # on image scores: the label
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))  # on the map: the mask
        self.register_buffer("score_mean", torch.tensor(float("nan")))
        self.register_buffer("score_std", torch.tensor(float("nan")))

    def forward(self, x: torch.Tensor, precision: str = "fp32", network: nn.Module | None = None
                ) -> InferenceBatch:
        """Score a float batch in [0, 1]; the network (or `network`, a compiled one) runs in `precision`,
        the map and score in fp32."""
        with autocast(precision, x.device):
            reconstruction = reconstruct(self.network if network is None else network, x, self.scoring.tta == "flips")
        maps = anomaly_map(x, reconstruction, self.scoring.sigma, self.scoring.map)
        return InferenceBatch(image_score(maps, self.scoring.image_score, self.scoring.topk), maps[:, 0],
                              reconstruction)

    @property
    def is_calibrated(self) -> bool:
        return not bool(torch.isnan(self.threshold))

    @torch.no_grad()
    def calibrate(self, good_scores: np.ndarray, good_map_maxima: np.ndarray, threshold: float | None = None
                  ) -> None:
        """Set the image threshold (default: the configured quantile of good scores), the pixel threshold
        (that quantile of the good images' map maxima: so many good images get an empty mask, whatever the
        image score) and the score statistics."""
        good_scores = np.asarray(good_scores, dtype=np.float64)
        quantile = self.scoring.threshold_quantile
        if threshold is None:
            threshold = quantile_threshold(good_scores, quantile)
        self.threshold.fill_(threshold)
        self.pixel_threshold.fill_(quantile_threshold(np.asarray(good_map_maxima, dtype=np.float64), quantile))
        self.score_mean.fill_(good_scores.mean())
        self.score_std.fill_(max(good_scores.std(), 1e-12))


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def reconstruct(network: nn.Module, x: torch.Tensor, flips: bool) -> torch.Tensor:
    """The network's reconstruction, or with `flips` the mean of the reconstructions of x's four mirror
    images, each mirrored back (one batch of 4B): test-time augmentation that averages out the network's
    view-dependent error on stochastic texture."""
    if not flips:
        return network(x)
    views = network(torch.cat([_flip(x, dims) for dims in FLIPS])).float().unflatten(0, (len(FLIPS), -1))
    return torch.stack([_flip(views[i], dims) for i, dims in enumerate(FLIPS)]).mean(dim=0)


@torch.no_grad()
def mirror_error_ratios(network: nn.Module, good: torch.Tensor, precision: str) -> list[float]:
    """Mean squared residual of good images reconstructed through each mirror view (left-right, upside down,
    both) over that of the image itself: about 1 where the material looks the same mirrored."""
    errors = []
    for dims in FLIPS:
        with autocast(precision, good.device):
            back = _flip(network(_flip(good, dims)).float(), dims)
        errors.append(float((good - back).pow(2).mean()))
    return [e / max(errors[0], 1e-12) for e in errors[1:]]
