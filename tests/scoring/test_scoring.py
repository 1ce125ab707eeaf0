import numpy as np
import pytest
import torch
from torch import nn

from rayad.config import ScoringConfig
from rayad.filters import gaussian_blur
from rayad.inference import AnomalyModel
from rayad.scoring import anomaly_map, f1_threshold, image_score, quantile_threshold


class Darken(nn.Module):
    """A stand-in 'reconstruction' network: the input scaled by 0.5."""

    def forward(self, x):
        return 0.5 * x


def test_anomaly_map_is_smoothed_channel_mean_of_squared_residual():
    x = torch.rand(2, 3, 16, 16)
    recon = torch.rand(2, 3, 16, 16)
    raw = ((x - recon) ** 2).mean(dim=1, keepdim=True)
    assert torch.allclose(anomaly_map(x, recon, sigma=0), raw)
    assert torch.allclose(anomaly_map(x, recon, sigma=2), gaussian_blur(raw, 2))


def test_gaussian_blur_matches_scipy():
    from scipy import ndimage

    img = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(img)[None, None], 1.5)[0, 0].numpy()
    ref = ndimage.gaussian_filter(img, 1.5, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_image_score_max_and_topk():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 0, :3] = torch.tensor([3.0, 2.0, 1.0])
    assert image_score(maps, "max").item() == 3.0
    assert image_score(maps, "topk", topk=0.02).item() == pytest.approx(2.5)


def test_thresholds():
    assert quantile_threshold(np.arange(101.0), 0.99) == pytest.approx(99.0)
    scores, labels = np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    assert f1_threshold(scores, labels) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="val_fraction"):
        quantile_threshold(np.array([]), 0.99)


def test_anomaly_model_refuses_to_score_until_calibrated():
    model = AnomalyModel(Darken(), ScoringConfig(sigma=0))
    x = torch.rand(3, 3, 8, 8)
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(x)
    scores = model.raw(x)[2].numpy()
    model.calibrate(scores[:2])
    assert model.is_calibrated and float(model.threshold) == pytest.approx(np.quantile(scores[:2], 0.99))
    out = model(x)
    assert torch.equal(out.pred_label, out.pred_score >= model.threshold)
    assert torch.equal(out.pred_mask, out.anomaly_map >= model.threshold)
    z = model.normalized_score(torch.tensor(scores[:2], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(z, (scores[:2] - scores[:2].mean()) / scores[:2].std(), rtol=1e-5)


def test_explicit_threshold_overrides_quantile():
    model = AnomalyModel(Darken(), ScoringConfig())
    model.calibrate(np.array([0.1, 0.2]), threshold=0.7)
    assert float(model.threshold) == pytest.approx(0.7)
