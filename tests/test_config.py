import numpy as np
import pytest

from rayad.config import Config, load_config, parse_overrides
from rayad.errors import ConfigError
from rayad.tune.space import load_space


def test_defaults_round_trip_through_dict():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  skip: add\n  widths: [8, 16]\ntrain:\n  lr: 1\n")
    cfg = load_config(path, ["train.steps=7", "corruption.shapes=[ellipse]"])
    assert cfg.model.skip == "add" and cfg.model.widths == (8, 16)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.corruption.shapes == ("ellipse",)


def test_an_exponent_without_a_dot_is_a_float_in_files_overrides_and_spaces(tmp_path):
    # YAML 1.1 reads 1e-3 as a string, which train.lr refused ("expected float")
    assert parse_overrides(["train.lr=1e-3", "train.weight_decay=1E-5", "model.skip=add"]) == {
        "train.lr": 0.001, "train.weight_decay": 1e-5, "model.skip": "add"}
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-3\n")
    assert load_config(path).train.lr == 0.002
    with pytest.raises(ConfigError, match="train.warmup_steps = 10.0: expected int"):  # a float, as in YAML 1.2
        load_config(overrides=["train.warmup_steps=1e1"])
    space = tmp_path / "s.yaml"
    space.write_text("params:\n  train.lr: {loguniform: [1e-3, 4e-3]}\n")
    assert load_space(space).searched[0].args == (0.001, 0.004)


def test_an_integer_is_decimal_as_in_yaml_1_2_and_as_the_shortcut_flags_read_it(tmp_path):
    # YAML 1.1 read --set train.seed=010 as octal 8 (--seed 010 gave 10), and 0x10 as 16
    assert parse_overrides(["train.seed=010", "train.steps=+08"]) == {"train.seed": 10, "train.steps": 8}
    with pytest.raises(ConfigError, match="train.steps = '0x10'"):
        load_config(overrides=["train.steps=0x10"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seed: 010\n")
    assert load_config(path).train.seed == 10


@pytest.mark.parametrize("text, needle", [
    ("modle: {}\n", "modle"),
    ("model:\n  skpi: add\n", "model.skpi"),
    ("model:\n  skip: concat\n", "model.skip"),
    ("train:\n  steps: many\n", "train.steps"),
    ("train:\n  steps: 0\n", "train.steps"),
    ("corruption:\n  area_min: 0.5\n  area_max: 0.1\n", "corruption.area_max"),
    ("model: [1, 2]\n", "model"),
    ("model: {skip: [unclosed\n", "not valid YAML"),
    ("train:\n  steps: 6\n  lr: 0.1\n  steps: 8\n", "key 'steps' given twice at line 4"),
    # accepted, then the first training step failed with a traceback
    ("data: {image_size: 8}\nmodel: {norm: instance}\n", "leaves the encoder's last level 1x1, where model.norm = "
     "instance has one value per channel to normalise; give data.image_size >= 16"),
    ("data: {image_size: 8}\ntrain: {batch_size: 1}\n", "model.norm = batch has a batch of one image"),
    ("corruption: {fill_sources: {shift: 1.0e-300}}\n", "weights must be 0 or from 1e-30 to 1e+30"),  # 0 in float32
    ("corruption: {fill_sources: {shift: 1.0e+39, patch: 1}}\n", "weights must be 0 or from"),  # infinite there
])
def test_bad_config_names_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value) and "bad.yaml" in str(err.value)


@pytest.mark.parametrize("item", ["train.steps", "=3", "steps=3", "train.nope=1"])
def test_bad_override(item):
    with pytest.raises(ConfigError):
        load_config(overrides=parse_overrides([item]))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_file_and_overrides_win_over_given_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 40}\n")
    defaults = {"train.steps": 300, "train.checkpoint_every": 75, "train.lr": 1e-3}
    cfg = load_config(path, {"train.lr": 5e-3}, defaults=defaults)
    assert (cfg.train.steps, cfg.train.checkpoint_every, cfg.train.lr) == (40, 75, 5e-3)
    assert load_config(defaults=defaults).train.steps == 300


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"train: {steps: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(path)


def test_numpy_numbers_are_taken_as_python_ones():
    """A sweep written with numpy gives np.int64 and np.float32 values; ints stay ints, floats floats."""
    cfg = load_config(overrides={"train.steps": np.int64(5), "train.lr": np.float32(0.5), "corruption.p_corrupt": 1})
    assert (cfg.train.steps, cfg.train.lr, cfg.corruption.p_corrupt) == (5, 0.5, 1.0)
    assert type(cfg.train.steps) is int and type(cfg.train.lr) is float
    with pytest.raises(ConfigError, match="train.steps = np.float64"):
        load_config(overrides={"train.steps": np.float64(5.0)})


def test_a_1x1_last_level_is_accepted_where_its_norm_has_values_to_normalise():
    load_config(overrides={"data.image_size": 8, "train.batch_size": 2})
    load_config(overrides={"data.image_size": 8, "model.norm": "group", "train.batch_size": 1})
