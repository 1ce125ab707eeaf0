import pytest
import torch

from rayad.config import ModelConfig
from rayad.errors import ConfigError
from rayad.models import create_model, list_models

TINY = {"widths": (8, 16, 16), "dilations": (1, 2)}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, **TINY))
    x = torch.rand(2, 3, 32, 48)
    out = model(x)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("skip", ["ccm", "add", "none"])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_variants(skip, norm):
    model = create_model(ModelConfig(skip=skip, norm=norm, act="gelu", **TINY))
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_ccm_gate_is_convex_combination():
    from rayad.models.layers import ConvexSkip

    skip = ConvexSkip(4)
    enc, dec = torch.zeros(1, 4, 5, 5), torch.ones(1, 4, 5, 5)
    out = skip(enc, dec)
    assert torch.all((out > 0) & (out < 1))


def test_skip_none_ignores_encoder_detail():
    """Without skips the output depends on the input only through the bottleneck."""
    model = create_model(ModelConfig(name="sdc_ae", **TINY)).eval()
    assert all(type(s).__name__ == "NoSkip" for s in model.skips)


def test_timm_encoder_reads_channels_from_feature_info():
    model = create_model(ModelConfig(encoder="resnet18", widths=(1, 1, 1)))  # only the level count is used
    assert model.encoder.channels == [64, 64, 128]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_size_not_divisible_is_a_clear_error():
    model = create_model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 20, 20))


@pytest.mark.parametrize("kw, needle", [
    ({"name": "nope"}, "registered models"),
    ({"encoder": "not_a_timm_model"}, "model.encoder"),
    ({"act": "nope"}, "model.act"),
    ({"encoder": "resnet18", "pretrained_file": "/missing.safetensors"}, "pretrained_file"),
])
def test_bad_model_config(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        create_model(ModelConfig(**{**TINY, **kw}))
