import os
import re
import subprocess
import sys

import pytest
import torch

from rayad.config import ModelConfig, load_config
from rayad.errors import ConfigError
from rayad.filters import gaussian_blur, resize_bilinear
from rayad.models import create_model, list_models
from rayad.models.layers import TORCH_ACTS, ConvNormAct, make_act

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


def test_ccm_gate_is_a_learned_convex_combination():
    """out = a * enc + (1 - a) * dec with a = sigmoid(gate([enc, dec])), computed independently here."""
    from rayad.models.layers import ConvexSkip

    torch.manual_seed(0)
    skip = ConvexSkip(4)
    enc, dec = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    a = torch.sigmoid(torch.nn.functional.conv2d(torch.cat([enc, dec], 1), skip.gate.weight, skip.gate.bias))
    torch.testing.assert_close(skip(enc, dec), a * enc + (1 - a) * dec)
    lo, hi = torch.minimum(enc, dec), torch.maximum(enc, dec)
    assert torch.all((skip(enc, dec) >= lo - 1e-6) & (skip(enc, dec) <= hi + 1e-6)), "between enc and dec"
    with torch.no_grad():  # the gate decides: saturated towards enc, the skip passes the encoder through
        skip.gate.weight.zero_()
        skip.gate.bias.fill_(20.0)
    torch.testing.assert_close(skip(enc, dec), enc, atol=1e-6, rtol=0)


def _output_with_shallow_features_perturbed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output when every encoder level but the deepest (the bottleneck's input) gets noise."""
    def perturb(module, inputs, features):
        return [f + torch.randn_like(f) for f in features[:-1]] + [features[-1]]

    handle = model.encoder.register_forward_hook(perturb)
    try:
        return model(x)
    finally:
        handle.remove()


@torch.no_grad()
def test_skip_none_ignores_encoder_detail():
    """Without skips the output depends on the input only through the bottleneck: changing the shallower
    encoder features leaves it as it was; with skips (ccm, add) the same change reaches the output."""
    x = torch.rand(1, 3, 32, 32)
    for name, skip, reaches in (("sdc_ae", "ccm", False), ("sdc_ccm", "none", False), ("sdc_ccm", "ccm", True),
                                ("sdc_ccm", "add", True)):
        torch.manual_seed(0)
        model = create_model(ModelConfig(name=name, skip=skip, **TINY)).eval()
        changed = not torch.allclose(model(x), _output_with_shallow_features_perturbed(model, x))
        assert changed == reaches, (name, skip)


def test_timm_encoder_reads_channels_from_feature_info():
    model = create_model(ModelConfig(encoder="resnet18", widths=(1, 1, 1)))  # only the level count is used
    assert model.encoder.channels == [64, 64, 128]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_size_not_divisible_is_a_clear_error():
    model = create_model(ModelConfig(**TINY))
    with pytest.raises(ConfigError, match="divisible by 8"):
        model(torch.rand(1, 3, 20, 20))


@pytest.mark.parametrize("overrides, needle", [
    ({"data.image_size": 100}, "multiple of 8 .* try 96 or 104"),
    ({"model.widths": [8] * 9}, "multiple of 512 .* 9 levels"),
    ({"data.image_size": 8, "model.widths": [8, 16, 32, 64]}, "multiple of 16"),
])
def test_image_size_that_the_encoder_cannot_halve_fails_in_the_config(overrides, needle):
    with pytest.raises(ConfigError, match=f"overrides \\(--set\\): data.image_size = .*{needle}"):
        load_config(overrides=overrides)


@pytest.mark.parametrize("kw, needle", [
    ({"name": "nope"}, "registered models"),
    ({"encoder": "not_a_timm_model"}, "model.encoder"),
    ({"act": "nope"}, "model.act"),
    ({"encoder": "resnet18", "pretrained_file": "/missing.safetensors"}, "pretrained_file"),
])
def test_bad_model_config(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        create_model(ModelConfig(**{**TINY, **kw}))


def test_eval_mode_folds_batch_norm_into_the_conv_without_changing_the_output():
    """The folded conv (docs/design.md, "Precision") against conv, then batch norm with its running
    statistics, then the activation, run apart; training mode still normalises with batch statistics."""
    torch.manual_seed(0)
    block = ConvNormAct(4, 6, "batch", "relu")
    with torch.no_grad():
        block[1].running_mean.uniform_(-0.5, 0.5)
        block[1].running_var.uniform_(0.5, 2.0)
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 4, 10, 10)
    conv, norm, act = block
    block.eval()
    with torch.no_grad():
        assert torch.allclose(block(x), act(norm(conv(x))), atol=1e-6)
    block.train()
    batch_stats = torch.nn.functional.batch_norm(conv(x), None, None, norm.weight, norm.bias, training=True)
    assert torch.allclose(block(x), act(batch_stats), atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_pass_fuses_conv_and_relu_with_the_same_outputs(monkeypatch, precision, channels_last):
    """An eval pass without autograd runs each conv + ReLU as one oneDNN op (layers.conv_relu), with the outputs
    of the two ops (the same bits at the default network's shapes on the CPUs measured; oneDNN may pick
    another kernel for other shapes). With autograd, the ops stay apart, and gradients flow."""
    from rayad.models import layers
    from rayad.precision import autocast

    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels (tested by the next test)")
    torch.manual_seed(0)
    model = create_model(ModelConfig(**TINY))
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))  # running statistics that are not the initial ones
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fused_calls, conv_relu = [], layers.conv_relu
    monkeypatch.setattr(layers, "conv_relu", lambda *args: fused_calls.append(1) or conv_relu(*args))
    with torch.no_grad(), autocast(precision, "cpu"):
        fused, alone = model(x), model(x[1:2])
        blocks = [m for m in model.modules() if isinstance(m, ConvNormAct)]
        assert len(fused_calls) == 2 * (len(blocks) + 1), "every conv + ReLU, the head's included"
        with monkeypatch.context() as apart_only:
            apart_only.setattr(layers, "fusable", lambda x: False)
            apart, apart_alone = model(x), model(x[1:2])
    tolerance = {"atol": 1e-6, "rtol": 0} if precision == "fp32" else {}  # else bf16's: one rounding
    torch.testing.assert_close(fused, apart, **tolerance)
    torch.testing.assert_close(alone, apart_alone, **tolerance)
    fused_calls.clear()
    model(x).sum().backward()
    assert not fused_calls and model.head[0].weight.grad is not None


@pytest.mark.parametrize("case", ["float64", "bf16 without oneDNN's bf16 kernels"])
def test_eval_pass_keeps_the_ops_apart_where_onednn_cannot_fuse(monkeypatch, case):
    """A dtype oneDNN has no fused kernel for runs torch's own ops: a float64 network, or bf16 on a CPU without
    bf16 instructions (AVX2 only), where torch falls back to its reference convolution."""
    from rayad.models import layers
    from rayad.precision import autocast

    torch.manual_seed(0)
    model, x = create_model(ModelConfig(**TINY)).eval(), torch.rand(2, 3, 32, 32)
    if case == "float64":
        model, x = model.double(), x.double()
    else:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(layers, "conv_relu", lambda *args: pytest.fail("fused"))
    with torch.no_grad(), autocast("fp32" if case == "float64" else "bf16", "cpu"):
        assert torch.isfinite(model(x)).all()


def test_ccm_blend_promotes_mixed_precisions():
    """A timm encoder's features may stay fp32 under bf16 autocast (e.g. after a layer norm); the blend computes
    in the wider type, as `a * enc + (1 - a) * dec` would."""
    from rayad.models.layers import ConvexSkip

    skip = ConvexSkip(4)
    enc, dec = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5).bfloat16()
    with torch.no_grad():
        out = skip(enc, dec)
        a = torch.sigmoid(skip.gate(torch.cat([enc, dec.float()], 1)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a * enc + (1 - a) * dec.float())


def test_torch_activations_are_the_classes_timm_gives_those_names():
    from timm.layers import get_act_layer

    for name, cls in TORCH_ACTS.items():
        assert get_act_layer(name) is cls, name
    assert type(make_act("gelu")) is get_act_layer("gelu")  # other names still go to timm


def test_the_default_model_loads_and_scores_without_importing_timm(trained_run):
    """timm pulls in torchvision and torch._dynamo, over a second of every process's start."""
    code = ("import sys; from rayad.artifact import Predictor; import numpy as np; "
            f"Predictor.load({str(trained_run)!r}, device='cpu').predict_arrays(np.zeros((1, 32, 32, 3), np.uint8)); "
            "assert 'timm' not in sys.modules and 'torch._dynamo' not in sys.modules, 'timm or dynamo imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture
def deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("size_in, size_out", [((4, 4), (8, 8)), ((5, 3), (16, 9)), ((16, 12), (32, 24)),
                                               ((8, 8), (8, 8))])
def test_deterministic_bilinear_resize_is_torchs(size_in, size_out, deterministic_algorithms):
    """Under deterministic algorithms a differentiated resize takes matrix products (interpolate's CUDA backward
    throws there): the same values and gradients as F.interpolate, within rounding."""
    x = torch.rand(2, 3, *size_in, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.rand(2, 3, *size_out, generator=torch.Generator().manual_seed(1))
    got = resize_bilinear(x, size_out)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    torch.use_deterministic_algorithms(False)
    expected = torch.nn.functional.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


def test_scoring_under_deterministic_algorithms_is_unchanged(deterministic_algorithms):
    """Without gradients, the resize is interpolate's own, so scores never depend on the mode."""
    model = create_model(ModelConfig(**TINY)).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = model(x)
        torch.use_deterministic_algorithms(False)
        off = model(x)
    assert torch.equal(on, off)


def test_deterministic_blur_pads_as_torch_does(deterministic_algorithms):
    """The SSIM loss blurs the reconstruction: under deterministic algorithms its reflect padding is done by
    copies (ReflectionPad2d's CUDA backward throws there), with the same bits and gradients."""
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    got = gaussian_blur(x, 1.5)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    torch.use_deterministic_algorithms(False)
    expected = gaussian_blur(x, 1.5)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    assert torch.equal(got, expected)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_a_timm_encoder_that_gives_channels_last_features_feeds_the_decoder_channels_first():
    """Swin's features come NHWC from timm; the decoder's convolutions take NCHW."""
    model = create_model(ModelConfig(encoder="swin_tiny_patch4_window7_224", widths=(1, 1))).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 3, 224, 224)


@pytest.mark.parametrize(("encoder", "size", "needle"), [
    ("vit_tiny_patch16_224", 32, "model.encoder = 'vit_tiny_patch16_224' does not run at data.image_size = 32"),
    ("resnet18", 32, None),
])
def test_an_encoder_that_does_not_take_the_image_size_is_refused_before_the_run_writes(encoder, size, needle):
    from rayad.train.loop import check_buildable

    cfg = load_config(overrides={"model.encoder": encoder, "model.widths": [1, 1], "data.image_size": size})
    if needle is None:
        check_buildable(cfg, "cpu")
        return
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_buildable(cfg, "cpu")


def test_a_pretrained_file_that_holds_no_weights_is_named(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match=f"model.pretrained_file: {re.escape(str(junk))} is not a weights file"):
        create_model(ModelConfig(encoder="resnet18", widths=(1, 1), pretrained_file=str(junk)))


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"model.widths": [8, 200000]}, "model.widths: needs widths from 1 to 4096"),
    ({"train.lr": 0}, "train.lr = 0: the network would never change"),
    ({"train.w_corrupt": 0, "train.w_clean": 0}, "the loss would be 0"),
])
def test_values_that_would_train_nothing_or_exhaust_memory_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(overrides=overrides)


def test_sdc_ae_records_the_skip_it_builds_and_the_sdc_encoder_refuses_a_pretrained_file(tmp_path):
    from rayad.train.loop import check_buildable

    assert load_config(overrides={"model.name": "sdc_ae", "model.skip": "add"}).model.skip == "none"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    cfg = load_config(overrides={"model.pretrained_file": str(weights)})
    with pytest.raises(ConfigError, match="only a timm model.encoder reads one"):
        check_buildable(cfg, "cpu")


def test_a_relative_pretrained_file_is_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ModelConfig(encoder="resnet18", pretrained_file="w/r.safetensors").pretrained_file == str(
        tmp_path / "w" / "r.safetensors")


def test_a_model_trained_from_a_pretrained_file_loads_without_it(tmp_path, demo_root, monkeypatch):
    """Its artifact holds every weight: the file it began from may be gone, or relative to another folder."""
    import timm
    from safetensors.torch import save_file
    from tiny import TINY

    from rayad.artifact import Predictor
    from rayad.train import fit

    weights = tmp_path / "weights" / "resnet18.safetensors"
    weights.parent.mkdir()
    save_file(timm.create_model("resnet18").state_dict(), str(weights))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={**TINY, "train.steps": 2, "model.encoder": "resnet18", "model.widths": [1, 1],
                                 "model.pretrained_file": "weights/resnet18.safetensors"})
    run = fit(cfg, demo_root, "brick", tmp_path / "run", progress=False)
    before = Predictor.load(run).predict_files([demo_root / "brick" / "test" / "good" / "000.png"])[0].scores
    weights.unlink()
    monkeypatch.chdir(run)
    after = Predictor.load(run).predict_files([demo_root / "brick" / "test" / "good" / "000.png"])[0].scores
    assert before.tolist() == after.tolist()


def test_folded_weights_are_kept_until_a_weight_or_statistic_changes():
    torch.manual_seed(0)
    block = ConvNormAct(4, 6, "batch", "relu").eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        first = block(x)
        kept = block.folded(torch.float32)[0]
        assert block.folded(torch.float32)[0] is kept and torch.equal(block(x), first)
        block[1].running_var.mul_(4.0)  # a statistic changed in place: folded again
        assert block.folded(torch.float32)[0] is not kept
        assert torch.allclose(block(x), block[2](block[1](block[0](x))), atol=1e-6)
    block.load_state_dict(ConvNormAct(4, 6, "batch", "relu").state_dict())
    with torch.no_grad():
        assert torch.allclose(block(x), block[2](block[1](block[0](x))), atol=1e-6)
    out = block(x)  # with autograd: nothing kept, gradients reach the conv
    out.sum().backward()
    assert block[0].weight.grad is not None
