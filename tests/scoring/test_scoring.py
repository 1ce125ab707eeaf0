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


def test_a_sigma_below_float32_blurs_nothing():
    """1e-300 is 0 in float32: the kernel's centre was 0/0, every score NaN and the model uncalibrated."""
    img = torch.rand(1, 1, 8, 8)
    assert torch.equal(gaussian_blur(img, 1e-300), img)


@pytest.mark.parametrize("sigma", [0.75, 4.0])
def test_gaussian_blur_gives_an_image_the_same_bits_alone_or_in_a_batch(sigma):
    """The batch's channels are blurred together (one depthwise convolution): an image's map must not depend
    on its neighbours, to the last bit, so a served score equals `rayad predict` whatever the batching."""
    x = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0)) ** 4
    together = gaussian_blur(x, sigma)
    for i in range(5):
        assert torch.equal(gaussian_blur(x[i:i + 1], sigma), together[i:i + 1])
        assert torch.equal(gaussian_blur(x[i:i + 1, :1], sigma), together[i:i + 1, :1])


def test_image_score_mean_max_and_topk():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 0, :3] = torch.tensor([3.0, 2.0, 1.0])
    assert image_score(maps).item() == pytest.approx(0.06)  # the default: the mean
    assert image_score(maps, "max").item() == 3.0
    assert image_score(maps, "topk", topk=0.02).item() == pytest.approx(2.5)


def test_thresholds():
    assert quantile_threshold(np.arange(101.0), 0.99) == pytest.approx(99.0)
    scores, labels = np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    assert f1_threshold(scores, labels) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="val_fraction"):
        quantile_threshold(np.array([]), 0.99)


def test_predictor_labels_only_once_calibrated():
    from rayad.artifact import Predictor
    from rayad.config import Config

    model = AnomalyModel(Darken(), ScoringConfig(sigma=0))
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    predictor = Predictor(model, Config().replace({"data.image_size": 8}), {})
    raw = predictor.predict_arrays(images)
    assert raw.threshold is None and raw.labels is None and raw.normalized is None
    with pytest.raises(RuntimeError, match="not calibrated"):
        raw.masks()
    model.calibrate(raw.scores[:2], raw.maps[:2].max(axis=(1, 2)))
    assert model.is_calibrated and predictor.threshold == pytest.approx(np.quantile(raw.scores[:2], 0.99))
    assert predictor.pixel_threshold == pytest.approx(np.quantile(raw.maps[:2].max(axis=(1, 2)), 0.99))
    out = predictor.predict_arrays(images, batch_size=2)
    np.testing.assert_array_equal(out.scores, raw.scores)
    np.testing.assert_array_equal(out.labels, out.scores >= predictor.threshold)
    np.testing.assert_array_equal(out.masks(), out.maps >= predictor.pixel_threshold)
    good = raw.scores[:2]
    np.testing.assert_allclose(out.normalized[:2], (good - good.mean()) / good.std(), rtol=1e-5)


def test_explicit_threshold_overrides_quantile():
    model = AnomalyModel(Darken(), ScoringConfig())
    model.calibrate(np.array([0.1, 0.2]), np.array([0.5, 0.6]), threshold=0.7)
    assert float(model.threshold) == pytest.approx(0.7)


def test_msgms_map_sees_structure_not_intensity_offsets():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert anomaly_map(x, x, 0.0, "msgms").abs().max() < 1e-6  # identical: no residual
    brighter = (x + 0.05).clamp(0, 1)
    blurred = gaussian_blur(x, 1.5)
    l2 = {name: float(anomaly_map(x, y, 0.0, "l2").mean()) for name, y in (("offset", brighter), ("blur", blurred))}
    gms = {name: float(anomaly_map(x, y, 0.0, "msgms").mean()) for name, y in (("offset", brighter), ("blur", blurred))}
    # lost structure against a small brightness change: msgms tells them apart far better than l2
    assert gms["blur"] / gms["offset"] > 10 * l2["blur"] / l2["offset"]
    scratch = x.clone()
    scratch[:, :, 30:32, 8:56] = x.mean()
    m = anomaly_map(x, scratch, 0.0, "msgms")[:, 0]
    assert m.shape == (2, 64, 64) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert m[:, 28:34, 8:56].mean() > 5 * m[:, :20].mean()  # highest on the scratch


class Template(nn.Module):
    """A network that has memorised one image: whatever it is shown, it returns the template."""

    def __init__(self, template: torch.Tensor):
        super().__init__()
        self.template = template

    def forward(self, x):
        return self.template.expand(len(x), -1, -1, -1)


def test_flips_average_the_mirrored_back_reconstructions():
    from rayad.inference import FLIPS, reconstruct

    x = torch.rand(2, 3, 8, 8)
    template = Template(torch.rand(1, 3, 8, 8))
    expected = sum(template(x).flip(d) if d else template(x) for d in FLIPS) / 4
    torch.testing.assert_close(reconstruct(template, x, flips=True), expected)
    torch.testing.assert_close(reconstruct(template, x, flips=False), template(x))
    flipped = AnomalyModel(template, ScoringConfig(sigma=0, tta="flips"))(x)
    torch.testing.assert_close(flipped.reconstruction, expected)
    # Unsettled `auto` (a model never calibrated, or saved before scoring.tta existed) scores without flips.
    torch.testing.assert_close(AnomalyModel(template, ScoringConfig(sigma=0))(x).reconstruction, template(x))


@pytest.mark.parametrize("symmetric, choice", [(True, "flips"), (False, "none")])
def test_auto_tta_picks_flips_only_for_material_that_looks_the_same_mirrored(symmetric, choice):
    from rayad.artifact import Predictor
    from rayad.config import Config

    ramp = torch.linspace(0, 1, 16)
    template = (ramp.view(1, 1, 1, 16) * ramp.view(1, 1, 16, 1)).expand(1, 3, 16, 16)
    if symmetric:  # the same mirrored either way
        template = (template + template.flip(-1) + template.flip(-2) + template.flip(-2, -1)) / 2
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 3, (8, 16, 16, 3))
    good = np.clip(template[0].permute(1, 2, 0).numpy() * 255 + noise, 0, 255).astype(np.uint8)
    predictor = Predictor(AnomalyModel(Template(template), ScoringConfig()), Config(), {}, precision="fp32")
    decided = predictor.resolve_tta(good)
    assert decided["choice"] == choice == predictor.config.scoring.tta == predictor.model.scoring.tta
    assert (max(decided["mirror_error_ratios"]) <= 1.1) == symmetric
    # Configured values are kept as they are.
    fixed = Predictor(AnomalyModel(Template(template), ScoringConfig(tta="none")), Config().replace(
        {"scoring.tta": "none"}), {}, precision="fp32")
    assert fixed.resolve_tta(good) == {"choice": "none", "reason": "configured"}
