"""Encoders return a feature pyramid plus its channels and reductions, read off the module, never assumed."""

from __future__ import annotations

import torch
from torch import nn

from rayad.errors import ConfigError
from rayad.models.layers import ConvNormAct


class SDCEncoder(nn.Module):
    """Strided conv stages: stage i halves the resolution and has widths[i] channels."""

    def __init__(self, in_chans: int, widths: tuple[int, ...], norm: str, act: str):
        super().__init__()
        chans = (in_chans, *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvNormAct(cin, cout, norm, act, stride=2), ConvNormAct(cout, cout, norm, act))
            for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        self.channels = list(widths)
        self.reductions = [2 ** (i + 1) for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class TimmEncoder(nn.Module):
    """A timm backbone with features_only=True; weights only from a local file, never downloaded."""

    def __init__(self, name: str, in_chans: int, depth: int, pretrained_file: str | None = None):
        super().__init__()
        import timm  # here, not at the top: the default encoder needs none of it (rayad.models.layers.TORCH_ACTS)

        if name not in timm.list_models():
            raise ConfigError(f"model.encoder = {name!r} is neither 'sdc' nor a timm model name "
                              "(see timm.list_models())")
        def create(weights: str | None) -> nn.Module:
            return timm.create_model(name, features_only=True, out_indices=tuple(range(depth)), in_chans=in_chans,
                                     pretrained=bool(weights),
                                     pretrained_cfg_overlay={"file": weights} if weights else None)

        try:
            self.body = create(None)
        except (IndexError, AssertionError, RuntimeError) as e:
            raise ConfigError(f"model.encoder = {name!r}: cannot build {depth} feature levels ({e})") from None
        if pretrained_file:
            try:
                self.body = create(pretrained_file)
            except Exception as e:  # noqa: BLE001 - torch's and timm's loaders raise anything on a file of no weights
                raise ConfigError(f"model.pretrained_file: {pretrained_file} is not a weights file for {name} "
                                  f"({type(e).__name__}: {e})") from None
        self.channels = self.body.feature_info.channels()
        self.reductions = self.body.feature_info.reduction()
        self.channels_last_features = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")  # e.g. Swin

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        return [f.permute(0, 3, 1, 2) for f in features] if self.channels_last_features else features
