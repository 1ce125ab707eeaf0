"""SDC-CCM (docs/design.md, "The method"): encoder, stacked dilated bottleneck, decoder with convex-combination skips.

`forward(x)` returns the reconstruction; scoring lives in `rayad.scoring`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rayad.config import ModelConfig
from rayad.errors import ConfigError
from rayad.filters import resize_bilinear
from rayad.models.encoders import SDCEncoder, TimmEncoder
from rayad.models.layers import SKIPS, ConvActConv, ConvNormAct, DilatedBottleneck, make_act
from rayad.models.registry import register_model


class SDCCCM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.skip not in SKIPS:
            raise ConfigError(f"model.skip = {cfg.skip!r}; valid: {sorted(SKIPS)}")
        if cfg.pretrained_file and not Path(cfg.pretrained_file).is_file():
            raise ConfigError(f"model.pretrained_file: {cfg.pretrained_file} not found")
        if cfg.encoder == "sdc":
            self.encoder = SDCEncoder(cfg.in_chans, cfg.widths, cfg.norm, cfg.act)
        else:
            self.encoder = TimmEncoder(cfg.encoder, cfg.in_chans, cfg.depth, cfg.pretrained_file)
        chans, self.reduction = self.encoder.channels, self.encoder.reductions[-1]
        self.bottleneck = DilatedBottleneck(chans[-1], cfg.dilations, cfg.norm, cfg.act)
        # Decoder level i brings level i+1's features up to level i, merges the skip, then refines.
        self.up_convs = nn.ModuleList(ConvNormAct(chans[i + 1], chans[i], cfg.norm, cfg.act)
                                      for i in range(len(chans) - 1))
        self.skips = nn.ModuleList(SKIPS[cfg.skip](c) for c in chans[:-1])
        self.refines = nn.ModuleList(ConvNormAct(c, c, cfg.norm, cfg.act) for c in chans[:-1])
        head = max(chans[0] // 2, 8)
        self.head = ConvActConv(nn.Conv2d(chans[0], head, 3, padding=1), make_act(cfg.act),
                                nn.Conv2d(head, cfg.in_chans, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.reduction or w % self.reduction:
            raise ConfigError(f"input size {h}x{w} must be divisible by {self.reduction} (the encoder's "
                              "total downsampling); pick data.image_size accordingly")
        features = self.encoder(x)
        d = self.bottleneck(features[-1])
        for i in reversed(range(len(features) - 1)):
            d = self.up_convs[i](resize_bilinear(d, features[i].shape[-2:]))
            d = self.refines[i](self.skips[i](features[i], d))
        d = resize_bilinear(d, (h, w))
        return self.head(d)


@register_model("sdc_ccm")
def sdc_ccm(cfg: ModelConfig) -> SDCCCM:
    """SDC-CCM as configured (skip = ccm | add | none)."""
    return SDCCCM(cfg)


@register_model("sdc_ae")
def sdc_ae(cfg: ModelConfig) -> SDCCCM:
    """SDC-AE: the same network without skip connections (its config says model.skip = none)."""
    return SDCCCM(cfg)
