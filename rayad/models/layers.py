"""Building blocks of SDC-CCM: conv-norm-act, the dilated bottleneck and the skip merges."""

from __future__ import annotations

import torch
from torch import nn

from rayad.errors import ConfigError


def make_norm(name: str, channels: int) -> nn.Module:
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "group":
        return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if channels % g == 0), channels)
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if name == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm = {name!r}; valid: batch, group, instance, none")


# The names timm maps to torch's own activations (tests/models checks them against timm). These need no timm,
# whose import pulls in torchvision and torch._dynamo: over a second of every process's start.
TORCH_ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish,
              "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "celu": nn.CELU, "selu": nn.SELU,
              "hard_sigmoid": nn.Hardsigmoid, "hard_swish": nn.Hardswish, "identity": nn.Identity}


def make_act(name: str) -> nn.Module:
    """The activation timm knows by `name`."""
    if name in TORCH_ACTS:
        return TORCH_ACTS[name]()
    from timm.layers import get_act_layer

    try:
        return get_act_layer(name)()
    except (KeyError, ValueError, TypeError, AssertionError):
        raise ConfigError(f"model.act = {name!r} is not an activation timm knows (e.g. relu, gelu, silu)") from None


class ConvNormAct(nn.Sequential):
    """3x3 conv, norm, activation. In eval mode a batch norm is folded into the conv, and a ReLU fused into it
    where oneDNN can (`conv_relu`): one pass over the activations instead of three (docs/design.md,
    "Precision"). Without autograd the folded weights are kept until a weight or statistic changes."""

    def __init__(self, cin: int, cout: int, norm: str, act: str, stride: int = 1, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=norm == "none"),
            make_norm(norm, cout),
            make_act(act),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        if self.training or not isinstance(norm, nn.BatchNorm2d):
            return act(norm(conv(x)))
        weight, bias = self.folded(compute_dtype(x))
        if isinstance(act, nn.ReLU) and fusable(x):
            return conv_relu(conv, x, weight, bias)
        return act(conv._conv_forward(x, weight, bias))

    def folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv's weight and bias with the batch norm's statistics and affine folded in, in `dtype`; kept while
        none of the tensors they come from changes (an optimiser step, load_state_dict, `.to`), except where
        autograd or a trace (exports, torch.compile) records the call."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._fold(dtype)
        conv, norm, _ = self
        sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        key = (dtype, *((t._version, t.data_ptr()) for t in sources if t is not None))
        cached = getattr(self, "_folded", None)
        if cached is None or cached[0] != key:
            self._folded = cached = key, self._fold(dtype)
        return cached[1]

    def _fold(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        conv, norm, _ = self
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return (conv.weight * scale.view(-1, 1, 1, 1)).to(dtype), bias.to(dtype)


def fusable(x: torch.Tensor) -> bool:
    """Whether oneDNN can run a conv and its activation on `x` as one op: an eager CPU pass without autograd, in
    fp32, or in bf16 where oneDNN has bf16 kernels (a CPU without them runs torch's fallback). Traces
    (exports, torch.compile) keep torch's own ops, which ONNX and inductor know."""
    if (x.device.type != "cpu" or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available()
            or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return False
    dtype = compute_dtype(x)
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution of `x` computes in: autocast's, where it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def conv_relu(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv(x)), with `weight` and `bias` in place of the conv's own where given, as oneDNN's convolution with
    a ReLU post-op: with the BN fold and one-op blend, 1.09x (fp32) and 1.16x (bf16) faster inference at batch
    16 on a Xeon with AMX; the same bits as the two ops at the default network's shapes there, within 1e-8 at
    other shapes (docs/benchmarks.md, "Precision on a CPU with AMX, 2026-12-07")."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    dtype = compute_dtype(x)
    bias = None if bias is None else bias.to(dtype)
    return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight.to(dtype), bias, conv.padding,
                                                   conv.stride, conv.dilation, conv.groups, "relu", [], "")


class ConvActConv(nn.Sequential):
    """conv, activation, conv (the network's head), the first two fused where they can be (`conv_relu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, act, last = self
        if isinstance(act, nn.ReLU) and fusable(x):
            return last(conv_relu(first, x))
        return last(act(first(x)))


class DilatedBottleneck(nn.Module):
    """Stacked dilated convolutions (SDC), each residual, so the receptive field spans large regions."""

    def __init__(self, channels: int, dilations: tuple[int, ...], norm: str, act: str):
        super().__init__()
        self.blocks = nn.ModuleList(ConvNormAct(channels, channels, norm, act, dilation=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class ConvexSkip(nn.Module):
    """CCM: out = a * enc + (1 - a) * dec, with a per-position, per-channel gate a = sigmoid(conv([enc, dec])).
    The blend is one `lerp` (one pass over the activations instead of four)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.gate(torch.cat([enc, dec], dim=1)))
        dtype = torch.promote_types(torch.promote_types(enc.dtype, dec.dtype), a.dtype)
        return torch.lerp(dec.to(dtype), enc.to(dtype), a.to(dtype))


class AddSkip(nn.Module):
    """Plain additive (U-Net-like) skip: leaks the encoder's detail, defects included."""

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return enc + dec


class NoSkip(nn.Module):
    """No skip (SDC-AE): the decoder sees only the bottleneck."""

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return dec


SKIPS = {"ccm": ConvexSkip, "add": AddSkip, "none": NoSkip}
