"""Typed configuration: one frozen dataclass per section, loaded strictly from YAML and `key=value` overrides.

The same `Config` object drives the CLI, training, evaluation and the saved artifact (`model.json`).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rayad.data.images import MAX_IMAGE_PIXELS, PILLOW_MAX_PIXELS
from rayad.errors import ConfigError

MAX_SEED = 2**32 - 1  # the largest seed numpy's generators take
MAX_WIDTH = 4096  # channels of an encoder level
Layout = Literal["auto", "mvtec", "mvtec2", "visa", "folder"]  # a reader each in rayad.data.layouts, but auto
LAYOUTS = typing.get_args(Layout)
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # rayad.precision; fp16 on CUDA only


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are prepared."""

    layout: Layout = "auto"
    image_size: int = 128
    val_fraction: float = 0.1
    split_seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    augment: Literal["none", "flip", "dihedral"] = "none"  # of good training images: flips (+ 90° turns)
    max_pixels: int = MAX_IMAGE_PIXELS  # larger images are refused unread (possible decompression bombs)
    # Folder layout only: sub-directories of ROOT/<category>.
    normal_dir: str = "good"
    abnormal_dir: str = "defect"
    mask_dir: str | None = None
    test_fraction: float = 0.2

    def __post_init__(self):
        _check_range("data.image_size", self.image_size, 8, 4096)
        _check_range("data.val_fraction", self.val_fraction, 0.0, 0.9)
        _check_range("data.test_fraction", self.test_fraction, 0.0, 0.9)
        _check_range("data.max_pixels", self.max_pixels, 1, PILLOW_MAX_PIXELS)
        _check_range("data.split_seed", self.split_seed, 0, MAX_SEED)


@dataclass(frozen=True)
class CorruptionConfig:
    """Structured corruption of training images; `kind` switches to the ablation baselines."""

    kind: Literal["structured", "gaussian", "none"] = "structured"
    p_corrupt: float = 0.85
    max_shapes: int = 3
    shapes: tuple[str, ...] = ("stroke", "ellipse", "blob")
    area_min: float = 0.005
    area_max: float = 0.08
    fill_sources: dict[str, float] = field(
        default_factory=lambda: {"patch": 1.0, "texture": 1.0, "distort": 1.0, "shift": 1.0}
    )
    blend_min: float = 0.6
    edge_sigma: float = 0.75
    noise_std: float = 0.0
    gaussian_std: float = 0.1  # only for kind="gaussian": i.i.d. noise on the input, clean target

    def __post_init__(self):
        _check_range("corruption.p_corrupt", self.p_corrupt, 0.0, 1.0)
        _check_range("corruption.max_shapes", self.max_shapes, 1, 32)
        _check_range("corruption.area_min", self.area_min, 0.0, 1.0)
        _check_range("corruption.area_max", self.area_max, self.area_min, 1.0)
        _check_range("corruption.blend_min", self.blend_min, 0.0, 1.0)
        _check_range("corruption.edge_sigma", self.edge_sigma, 0.0, 64.0)
        _check_range("corruption.noise_std", self.noise_std, 0.0, 1.0)
        _check_range("corruption.gaussian_std", self.gaussian_std, 0.0, 1.0)
        if not self.shapes:
            raise ConfigError("corruption.shapes: needs at least one shape")
        weights = list(self.fill_sources.values())
        # relative weights, sampled in float32: 1e-300 is 0 there, 1e39 infinite
        if not any(weights) or not all(w == 0 or FILL_WEIGHTS[0] <= w <= FILL_WEIGHTS[1] for w in weights):
            raise ConfigError(f"corruption.fill_sources: weights must be 0 or from {FILL_WEIGHTS[0]:g} to "
                              f"{FILL_WEIGHTS[1]:g}, and not all 0, got {self.fill_sources}")


FILL_WEIGHTS = (1e-30, 1e30)  # the range of a positive corruption.fill_sources weight: normal floats in float32


@dataclass(frozen=True)
class ModelConfig:
    """The SDC-CCM network; `name` picks a registered model."""

    name: str = "sdc_ccm"
    encoder: str = "sdc"  # "sdc" or a timm model name (then only len(widths), the level count, is used)
    widths: tuple[int, ...] = (32, 64, 128)
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    skip: Literal["ccm", "add", "none"] = "ccm"
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    act: str = "relu"
    in_chans: int = 3
    pretrained_file: str | None = None  # timm encoders only: a local weights file, never a download

    def __post_init__(self):
        if not self.widths or min(self.widths) < 1 or max(self.widths) > MAX_WIDTH:
            raise ConfigError(f"model.widths: needs widths from 1 to {MAX_WIDTH}, got {self.widths}")
        if self.name == "sdc_ae":  # SDC-AE is the network without skips: say so in what is saved
            object.__setattr__(self, "skip", "none")
        if self.pretrained_file:  # read where the run, a trial or a Ray worker runs, maybe in another folder
            object.__setattr__(self, "pretrained_file", str(Path(self.pretrained_file).absolute()))
        if min(self.dilations, default=1) < 1:
            raise ConfigError(f"model.dilations: must be >= 1, got {self.dilations}")
        if self.in_chans != 3:
            raise ConfigError(f"model.in_chans = {self.in_chans}: must be 3 (every image is read as RGB)")

    @property
    def depth(self) -> int:
        return len(self.widths)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, step budget and loss weights."""

    steps: int = 600  # 2-6 minutes at 128² on 2 CPU cores, by CPU and precision (docs/benchmarks.md)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0
    precision: Precision = "auto"
    num_threads: int | None = None  # torch intra-op threads; None: the CPUs the process may run on
    deterministic: bool = False  # CUDA: deterministic kernels and no TF32 (repeatable runs, slower)
    w_corrupt: float = 1.0
    w_clean: float = 1.0
    ssim_weight: float = 0.0

    def __post_init__(self):
        _check_range("train.steps", self.steps, 1, 10**8)
        _check_range("train.batch_size", self.batch_size, 1, 4096)
        _check_range("train.lr", self.lr, 0.0, 10.0)
        _check_range("train.checkpoint_every", self.checkpoint_every, 1, 10**8)
        _check_range("train.log_every", self.log_every, 1, 10**8)
        _check_range("train.ssim_weight", self.ssim_weight, 0.0, 100.0)
        _check_range("train.weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range("train.warmup_steps", self.warmup_steps, 0, 10**8)
        _check_range("train.grad_clip", self.grad_clip, 0.0, 10**6)
        _check_range("train.w_corrupt", self.w_corrupt, 0.0, 100.0)
        _check_range("train.w_clean", self.w_clean, 0.0, 100.0)
        _check_range("train.seed", self.seed, 0, MAX_SEED)
        if self.lr == 0:
            raise ConfigError("train.lr = 0: the network would never change; give a learning rate > 0")
        if self.w_corrupt == self.w_clean == self.ssim_weight == 0:
            raise ConfigError("train.w_corrupt, train.w_clean and train.ssim_weight are all 0: the loss would be 0; "
                              "give one of them a weight")
        if self.num_threads is not None:
            _check_range("train.num_threads", self.num_threads, 1, 4096)


@dataclass(frozen=True)
class ScoringConfig:
    """Anomaly maps, image scores and threshold calibration."""

    sigma: float = 2.0  # Gaussian smoothing of the residual map, in input pixels (chosen on validation)
    map: Literal["l2", "msgms"] = "l2"  # squared residual, or multi-scale gradient-magnitude dissimilarity
    image_score: Literal["mean", "max", "topk"] = "mean"  # mean of the map (chosen on validation)
    topk: float = 0.01  # fraction of pixels averaged when image_score="topk"
    threshold_quantile: float = 0.99  # quantile of validation good scores
    precision: Precision = "auto"  # of the network's forward pass
    # Test-time mirror views: flips averages 4 reconstructions; auto picks flips at calibration when every
    # mirror view reconstructs the good validation images as well as the image (rayad.artifact.Predictor.resolve_tta).
    tta: Literal["auto", "flips", "none"] = "auto"
    # torch.compile the network for scoring (docs/design.md, "Precision"): 1.1-1.6x by CPU and precision
    # (docs/benchmarks.md), seconds to compile per batch shape and process; set at training, so that
    # calibration compiles too.
    compile: bool = False

    def __post_init__(self):
        _check_range("scoring.sigma", self.sigma, 0.0, 64.0)
        _check_range("scoring.topk", self.topk, 1e-6, 1.0)
        _check_range("scoring.threshold_quantile", self.threshold_quantile, 0.5, 1.0)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self):
        # The sdc encoder halves the input once per model.widths level (a timm encoder checks at its first batch).
        reduction = 2 ** self.model.depth
        if self.model.encoder == "sdc" and self.data.image_size % reduction:
            size = self.data.image_size
            near = sorted({max(reduction, size // reduction * reduction), (size // reduction + 1) * reduction})
            raise ConfigError(f"data.image_size = {size} must be a multiple of {reduction} (the encoder halves "
                              f"it once per model.widths level, {self.model.depth} levels); "
                              f"try {' or '.join(map(str, near))}")
        # training normalises the encoder's last level (image_size / reduction on a side) over its batch (batch
        # norm) or its pixels (instance norm): a 1x1 map has one value to normalise
        one_value = self.model.norm == "instance" or (self.model.norm == "batch" and self.train.batch_size == 1)
        if self.model.encoder == "sdc" and self.data.image_size == reduction and one_value:
            statistics = "one value per channel" if self.model.norm == "instance" else "a batch of one image"
            raise ConfigError(f"data.image_size = {self.data.image_size} leaves the encoder's last level 1x1, where "
                              f"model.norm = {self.model.norm} has {statistics} to normalise; give data.image_size "
                              f">= {2 * reduction} or fewer model.widths levels")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """Build from nested dicts; unknown sections or keys are errors naming them and `source`."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        sections = typing.get_type_hints(cls)
        raw = _migrate(raw)
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(map(str, unknown))}; valid: {sorted(sections)}")
        # an empty section (`train:`) reads as YAML's null; `train: 0` is a mistake, named
        built = {name: _build_section(tp, {} if raw.get(name) is None else raw[name], name, source)
                 for name, tp in sections.items()}
        try:
            return cls(**built)
        except ConfigError as e:  # a rule across sections
            raise ConfigError(f"{source}: {e}") from None

    def replace(self, overrides: dict[str, Any], source: str = "overrides (--set)") -> Config:
        """A copy with dotted-key overrides such as {"train.steps": 100}."""
        if not isinstance(overrides, dict) or not all(isinstance(key, str) for key in overrides):
            raise ConfigError(f"{source}: must map dotted keys to values, such as "
                              f"{{'train.steps': 100}}; got {overrides!r}")
        raw = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in raw or not name:
                raise ConfigError(f"{source}: '{key}' is not of the form section.key; sections: {sorted(raw)}")
            raw[section][name] = value
        return Config.from_dict(raw, source)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None, source: str = "overrides (--set)") -> Config:
    """Load a YAML config (or the defaults) and apply `key=value` overrides (`source` names them in errors).
    `defaults` (dotted keys, such as a search space's fixed values) replace rayad's own defaults: the file and
    the overrides win over them."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = load_yaml(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from e
    config = Config.from_dict(raw, str(path or "config"))
    if defaults:
        in_file = {f"{section}.{key}" for section, keys in _migrate(raw).items() if isinstance(keys, dict)
                   for key in keys}
        config = config.replace({k: v for k, v in defaults.items() if k not in in_file}, "defaults")
    if overrides:
        if isinstance(overrides, list | tuple):
            overrides = parse_overrides(list(overrides))
        config = config.replace(overrides, source)
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `["train.steps=100", "model.skip=add"]`; values are YAML scalars or lists."""
    out = {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"overrides: 'key=value' strings or a dict of dotted keys, not a {type(item).__name__} "
                            f"({item!r})")
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected key=value, e.g. train.steps=500")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set '{item}': value is not valid YAML ({yaml_problem(e)})") from e
    return out


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Configs saved by rayad 0.1 (model.json, checkpoints): train.amp became train.precision."""
    train = raw.get("train")
    if not isinstance(train, dict) or "amp" not in train:
        return raw
    train = {k: v for k, v in train.items() if k != "amp"}
    return {**raw, "train": {"precision": "auto" if raw["train"]["amp"] else "fp32", **train}}


def _build_section(cls: type, raw: Any, section: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(f'{section}.{k}' for k in unknown)}; "
                          f"valid: {sorted(hints)}")
    values = {k: coerce(v, hints[k], f"{source}: {section}.{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a field's type annotation, converting YAML lists to tuples, ints to floats and
    numpy numbers to Python's."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        return tuple(coerce(v, args[0], where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a mapping")
        return {coerce(k, args[0], where): coerce(v, args[1], where) for k, v in value.items()}
    if tp in (int, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's too
        if tp is float:
            return float(value)
        if isinstance(value, numbers.Integral):
            return int(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where} = {value!r}: expected {tp.__name__}")
    return value


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, except that `1e-3` and `1.0e3` are floats (YAML 1.2, and how
    people write a learning rate), not the strings YAML 1.1 makes of an exponent without a dot or a sign, and
    that a key given twice in a mapping is an error (PyYAML keeps the last, and one of two values is lost)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # PyYAML refuses it below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


# Integers as YAML 1.2 reads them: decimal only. YAML 1.1 read --set train.seed=010 as octal 8 (and 0x10, 1_0 as
# 16, 10), where --seed 010 gives 10.
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, regexp) for tag, regexp in _resolvers if tag != "tag:yaml.org,2002:int"]
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def load_yaml(text: str) -> Any:
    """Parse a config, a search space or a `--set` value."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} = {value!r} is out of range [{low}, {high}]")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj
