"""A timm-style explicit model registry: `@register_model(name)`, `create_model(cfg)`, `list_models()`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rayad.config import ModelConfig
from rayad.errors import ConfigError

_MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {}


def register_model(name: str):
    def wrap(fn: Callable[[ModelConfig], nn.Module]):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn
    return wrap


def create_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name not in _MODELS:
        raise ConfigError(f"model.name = {cfg.name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[cfg.name](cfg)


def list_models() -> list[str]:
    return sorted(_MODELS)
