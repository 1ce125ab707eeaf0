"""Search spaces: YAML files, checked before any trial. The bundled ones live in `tune_spaces/` (schema in
tune_spaces/README.md), installed as rayad._bundled.tune_spaces.

    metric: val_image_auroc        # default for --metric (optional)
    mode: max                      # max | min (optional)
    params:
      train.steps: 300             # a fixed value
      train.lr: {loguniform: [5.0e-4, 5.0e-3]}
      corruption.p_corrupt: {uniform: [0.5, 1.0]}
      corruption.max_shapes: {int: [1, 4]}
      model.skip: {choice: [ccm, add]}
      model.encoder: {choice: [sdc, resnet18]}
      model.pretrained_file: {choice: [null, weights/resnet18.safetensors], when: {model.encoder: resnet18}}

Keys are config keys. `when` makes a parameter conditional on earlier ones. Choices may be lists or
mappings (e.g. widths); Optuna records those as JSON strings.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayad._bundled import bundled
from rayad.config import Config, load_yaml, yaml_problem
from rayad.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "fixed")
TOP_LEVEL = ("description", "metric", "mode", "params")
SPACES_DIR = bundled("tune_spaces")
BUDGET_KEYS = ("train.steps", "train.checkpoint_every")  # the trial budget and ASHA's unit: fixed
MAX_INT_VALUES = 1000  # an int range checked value by value (SearchSpace.check_on); a longer one at its ends


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # one of DISTRIBUTIONS
    args: tuple  # (low, high) for ranges, the choices for choice, (value,) for fixed
    when: dict[str, tuple] = field(default_factory=dict)

    @property
    def encoded(self) -> bool:
        """Choices that are not scalars are given to Optuna as JSON strings."""
        return self.kind == "choice" and any(isinstance(c, list | dict) for c in self.args)

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for a value."""
        if self.kind == "uniform":
            return trial.suggest_float(self.key, *self.args)
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, *self.args, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.args)
        return trial.suggest_categorical(self.key, [self.encode(c) for c in self.args])

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def values(self) -> tuple:
        """The values to check: every value of a small int range, else `args` (a range's ends, or the choices)."""
        if self.kind == "int" and self.args[1] - self.args[0] < MAX_INT_VALUES:
            return tuple(range(self.args[0], self.args[1] + 1))
        return self.args

    def contains(self, value: Any) -> bool:
        if self.kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return False
        if self.kind in ("uniform", "loguniform", "int"):
            return isinstance(value, int | float) and self.args[0] <= value <= self.args[1]
        return value in self.args


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    metric: str | None = None
    mode: str | None = None
    source: str = "space"

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind != "fixed")

    @property
    def fixed(self) -> dict[str, Any]:
        return {p.key: p.args[0] for p in self.params if p.kind == "fixed"}

    def fixed_from(self, base: Config) -> SearchSpace:
        """This space with its fixed values taken from `base` (where --config and --set may change them)."""
        flat = _flatten(base.to_dict())
        params = tuple(dataclasses.replace(p, args=(flat[p.key],)) if p.kind == "fixed" else p for p in self.params)
        return dataclasses.replace(self, params=params)

    def define_by_run(self, trial) -> dict[str, Any]:
        """Optuna's define-by-run function: suggests the active parameters, returns the fixed values."""
        chosen = dict(self.fixed)  # a condition may name a fixed parameter too
        for p in self.searched:
            if self._active(p, chosen):
                chosen[p.key] = p.decode(p.suggest(trial))
        return self.fixed

    def trial_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Config overrides of one trial from Tune's config (Optuna's values, JSON choices decoded)."""
        by_key = {p.key: p for p in self.params}
        return {key: by_key[key].decode(value) for key, value in params.items() if key in by_key}

    def default_point(self, base: Config) -> dict[str, Any]:
        """The base config's values of the searched parameters: enqueued as the first trial, so the search
        always measures the default too. Values outside a parameter's range are left to the sampler."""
        point, _ = self._base_point(base)
        return {k: self._param(k).encode(v) for k, v in point.items()}

    def check_first_trial(self, base: Config, default: Config, source: str) -> None:
        """The first trial is the base config: a searched value that `source` (a --config file) set apart from
        `default` must lie in the space; a default outside it is left to the sampler."""
        _, outside = self._base_point(base)
        given, defaults = _flatten(base.to_dict()), _flatten(default.to_dict())
        changed = [p for p in outside if given[p.key] != defaults[p.key]]
        if changed:
            p = changed[0]
            raise ConfigError(f"{p.key} = {given[p.key]!r} in {source}: outside what the space searches ({p.kind} "
                              f"{list(p.args)}), and {source} sets the first trial; change one of them")

    def _base_point(self, base: Config) -> tuple[dict[str, Any], list[Param]]:
        """The active searched parameters' values in `base` that lie in their ranges, and those whose do not."""
        flat = _flatten(base.to_dict())
        point: dict[str, Any] = {}
        outside = []
        for p in self.searched:
            if self._active(p, {**self.fixed, **point}):
                if p.contains(flat[p.key]):
                    point[p.key] = flat[p.key]
                else:
                    outside.append(p)
        return point, outside

    def check_on(self, base: Config) -> None:
        """Every value of a searched parameter, and every pair of two, makes a valid config on top of `base` (the
        file, --set and the fixed values), so that a trial does not fail on its config: ranges at their ends (the
        rules between two keys, such as area_min <= area_max, are monotone), int ranges of up to MAX_INT_VALUES
        values at every value (an image size must be a multiple of the network's reduction). Rules among three
        keys are not tried."""
        searched = self.searched
        for p in searched:
            for value in p.values():
                base.replace({p.key: value}, f"{self.source}: params.{p.key} = {value!r}")
        for i, p in enumerate(searched):
            for q in searched[i + 1:]:
                for a, b in itertools.product(p.args, q.args):
                    if _together(p, a, q, b):
                        base.replace({p.key: a, q.key: b},
                                     f"{self.source}: params.{p.key} = {a!r} with params.{q.key} = {b!r}")

    def choice_configs(self, base: Config) -> Iterator[tuple[Config, str]]:
        """`base` with each choice of each searched choice parameter (its conditions met), and where it comes
        from: what only building the run checks (model and corruption names, fp16 off CUDA) is checked on each."""
        for p in self.searched:
            if p.kind == "choice":
                parents = {key: values[0] for key, values in p.when.items()}
                for value in p.args:
                    yield base.replace({**parents, p.key: value}), f"{self.source}: params.{p.key} = {value!r}"

    def _param(self, key: str) -> Param:
        return next(p for p in self.params if p.key == key)

    @staticmethod
    def _active(p: Param, chosen: dict[str, Any]) -> bool:
        return all(k in chosen and chosen[k] in values for k, values in p.when.items())


def resolve_space(name_or_path: str | Path) -> Path:
    """A space file path, or the name of one in tune_spaces/ ("quick" -> tune_spaces/quick.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path.absolute()
    bundled = SPACES_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    raise ConfigError(f"search space {str(name_or_path)!r}: no such file, and not one of {names} in {SPACES_DIR}")


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and check a space file against `base` (default: the default config)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read search space ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    return parse_space(raw, base or Config(), str(path))


def parse_space(raw: Any, base: Config, source: str = "space") -> SearchSpace:
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{source}: expected a mapping with a non-empty 'params' mapping")
    unknown = set(raw) - set(TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; valid: {list(TOP_LEVEL)}")
    if raw.get("mode") not in (None, "max", "min"):
        raise ConfigError(f"{source}: mode = {raw['mode']!r} must be max or min")
    params: list[Param] = []
    for key, spec in raw["params"].items():
        params.append(_parse_param(str(key), spec, base, [p.key for p in params], f"{source}: params.{key}"))
    fixed = base.replace({p.key: p.args[0] for p in params if p.kind == "fixed"}, source)
    by_key = {p.key: p for p in params}
    for p in params:
        _check_values(p, fixed, source)
        _check_conditions(p, by_key, source)
    return SearchSpace(tuple(params), raw.get("metric"), raw.get("mode"), source=source)


def _parse_param(key: str, spec: Any, base: Config, earlier: list[str], where: str) -> Param:
    if key not in _flatten(base.to_dict()):
        raise ConfigError(f"{where}: not a config key (keys look like section.name, e.g. train.lr)")
    if not isinstance(spec, dict):
        return Param(key, "fixed", (spec,))
    kinds = sorted(set(spec) - {"when"})
    if not set(kinds) <= set(DISTRIBUTIONS):
        raise ConfigError(f"{where}: unknown distribution {sorted(set(kinds) - set(DISTRIBUTIONS))}; valid: "
                          f"{list(DISTRIBUTIONS)} (write a fixed mapping as {{fixed: ...}})")
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one distribution, got {kinds}")
    kind, args = kinds[0], spec[kinds[0]]
    if key in BUDGET_KEYS and kind != "fixed":
        raise ConfigError(f"{where}: {key} sets the trial budget and ASHA's unit; give it a fixed value")
    when = _parse_when(spec.get("when"), earlier, where)
    return Param(key, kind, _parse_args(kind, args, where), when)


def _parse_args(kind: str, args: Any, where: str) -> tuple:
    if kind == "fixed":
        return (args,)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list")
        return tuple(args)
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if low > high:
        raise ConfigError(f"{where}: low {low} > high {high}")
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: int needs integer bounds, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    return (low, high) if kind == "int" else (float(low), float(high))


def _parse_when(when: Any, earlier: list[str], where: str) -> dict[str, tuple]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}: when must map earlier parameters to a value or a list of values")
    for key in when:
        if key not in earlier:
            raise ConfigError(f"{where}: when refers to {key!r}, which is not a parameter listed before it")
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}


def _check_values(p: Param, base: Config, source: str) -> None:
    """Every value a parameter can take must make a valid config (type and range) on top of `base`."""
    where = f"{source}: params.{p.key}"
    if p.kind in ("uniform", "loguniform"):
        if _field_type(base, p.key) is not float:
            raise ConfigError(f"{where}: {p.kind} gives floats, but {p.key} is not a float (use int or choice)")
        if not all(math.isfinite(v) for v in p.args):
            raise ConfigError(f"{where}: bounds must be finite")
    for value in p.args:
        base.replace({p.key: value}, where)


def _together(p: Param, a: Any, q: Param, b: Any) -> bool:
    """Whether a trial can give p the value a and q the value b, as far as their `when:` conditions tell."""
    if (p.key in q.when and a not in q.when[p.key]) or (q.key in p.when and b not in p.when[q.key]):
        return False
    return all(any(v in q.when[key] for v in p.when[key]) for key in p.when.keys() & q.when.keys())


def _check_conditions(p: Param, params: dict[str, Param], source: str) -> None:
    """A `when:` value its parent can never take would leave the parameter never sampled."""
    for key, values in p.when.items():
        parent = params[key]
        if parent.kind in ("uniform", "loguniform"):
            raise ConfigError(f"{source}: params.{p.key}: when {key}, which takes any float in a range: a condition "
                              "needs a choice, an int range or a fixed value")
        never = [v for v in values if not parent.contains(v)]
        if never:
            takes = f"{parent.args[0]} to {parent.args[1]}" if parent.kind == "int" else list(parent.args)
            raise ConfigError(f"{source}: params.{p.key}: when {key} is {never[0]!r}, which {key} never takes "
                              f"(its values: {takes})")


def _field_type(base: Config, key: str) -> type:
    section, _, name = key.partition(".")
    return type(getattr(getattr(base, section), name))


def _flatten(raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{name}": value for section, values in raw.items() for name, value in values.items()}
