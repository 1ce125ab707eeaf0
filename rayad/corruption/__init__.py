"""Structured corruption, the self-supervision signal of the autoencoder (docs/design.md, "The method").

`Corruptor(cfg)(x, generator)` takes clean images in [0, 1] and returns the network input, the target
and the blend mask, batched on x's device and deterministic given the generator's seed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rayad.config import CorruptionConfig
from rayad.corruption.fills import FILLS
from rayad.corruption.masks import SHAPES, random_masks
from rayad.errors import ConfigError
from rayad.filters import gaussian_blur

__all__ = ["Corrupted", "Corruptor", "FILLS", "SHAPES"]


class Corrupted(NamedTuple):
    inputs: torch.Tensor  # x~, what the network sees
    targets: torch.Tensor  # clean x (plus the identity-anchored noise, when enabled)
    mask: torch.Tensor  # (B, 1, H, W) blend weight in [0, 1]; 0 where the image is untouched


class Corruptor:
    def __init__(self, cfg: CorruptionConfig):
        unknown = set(cfg.fill_sources) - set(FILLS)
        if unknown:
            raise ConfigError(f"corruption.fill_sources: unknown {sorted(unknown)}; valid: {sorted(FILLS)}")
        unknown = set(cfg.shapes) - set(SHAPES)
        if unknown:
            raise ConfigError(f"corruption.shapes: unknown {sorted(unknown)}; valid: {sorted(SHAPES)}")
        self.cfg = cfg
        self.fill_names = [name for name, weight in cfg.fill_sources.items() if weight > 0]
        self.fill_weights = torch.tensor([cfg.fill_sources[n] for n in self.fill_names], dtype=torch.float)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> Corrupted:
        with torch.autocast(x.device.type, enabled=False):  # fp32 (its matrix products too) in any caller
            return self._corrupt(x, gen)

    def _corrupt(self, x: torch.Tensor, gen: torch.Generator) -> Corrupted:
        cfg = self.cfg
        if cfg.kind == "none":
            return Corrupted(x, x, torch.zeros_like(x[:, :1]))
        if cfg.kind == "gaussian":
            noise = torch.randn(x.shape, generator=gen, device=x.device) * cfg.gaussian_std
            return Corrupted(x + noise, x, torch.zeros_like(x[:, :1]))
        corrupted, mask = self._structured(x, gen)
        if cfg.noise_std > 0:
            noise = torch.randn(x.shape, generator=gen, device=x.device) * cfg.noise_std
            return Corrupted(corrupted + noise, x + noise, mask)
        return Corrupted(corrupted, x, mask)

    def _structured(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, device = self.cfg, x.device
        b, _, h, w = x.shape
        hard, owner = random_masks(b, h, w, cfg.shapes, cfg.max_shapes, cfg.area_min, cfg.area_max, gen, device)
        # One fill source per shape slot; every pixel takes the fill of the shape that owns it.
        self.fill_weights = self.fill_weights.to(device)  # copied to a GPU once, not at every step
        source = torch.multinomial(self.fill_weights.expand(b * cfg.max_shapes, -1), 1,
                                   replacement=True, generator=gen).view(b, cfg.max_shapes)
        pixel_source = source.gather(1, owner.flatten(1)).view(b, 1, h, w)
        fill = torch.zeros_like(x)
        for index, name in enumerate(self.fill_names):
            fill = torch.where(pixel_source == index, FILLS[name](x, gen), fill)
        corrupt = torch.rand((b, 1, 1, 1), generator=gen, device=device) < cfg.p_corrupt
        strength = cfg.blend_min + (1 - cfg.blend_min) * torch.rand((b, 1, 1, 1), generator=gen, device=device)
        mask = gaussian_blur(hard.unsqueeze(1).float(), cfg.edge_sigma) * strength * corrupt
        return (1 - mask) * x + mask * fill, mask
