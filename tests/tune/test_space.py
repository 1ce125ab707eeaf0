"""Search spaces: the shipped files, sampling with Optuna, conditional parameters and every kind of mistake."""

from __future__ import annotations

import json
import os

import optuna
import pytest

from rayad.cli import main
from rayad.config import Config
from rayad.errors import ConfigError, RayadError
from rayad.settings import Cluster, SearchSettings
from rayad.tune.space import SPACES_DIR, load_space, parse_space, resolve_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space, base: Config, n: int, seed: int = 0) -> list[dict]:
    """Ask Optuna for `n` trials (the first is the enqueued default point); returns each trial's params."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(space.default_point(base))
    out = []
    for _ in range(n):
        trial = study.ask()
        space.define_by_run(trial)
        study.tell(trial, 0.5)
        out.append(trial.params)
    return out


@pytest.mark.parametrize("name", ["demo", "quick", "quality", "paper", "ablation"])
def test_shipped_spaces_load_and_every_sample_is_a_valid_config(name):
    space = load_space(resolve_space(name))
    base = Config().replace(space.fixed)
    assert space.searched and space.metric == "val_image_auroc"
    for params in sample(space, base, 12):
        cfg = base.replace(space.trial_overrides(params))
        for key, value in space.trial_overrides(params).items():
            section, _, field = key.partition(".")
            got = getattr(getattr(cfg, section), field)
            assert (list(got) if isinstance(got, tuple) else got) == value


def test_first_trial_is_the_base_config():
    space = load_space(resolve_space("paper"))
    base = Config().replace(space.fixed)
    first = space.trial_overrides(sample(space, base, 1)[0])
    assert base.replace(first) == base


def test_conditional_parameter_is_sampled_only_when_its_condition_holds():
    space = parse_space({"params": {
        "model.encoder": {"choice": ["sdc", "resnet18"]},
        "model.widths": {"choice": [[8, 16], [16, 32]], "when": {"model.encoder": "sdc"}},
    }}, Config())
    seen = {"sdc": 0, "resnet18": 0}
    for params in sample(space, Config(), 16, seed=1):
        seen[params["model.encoder"]] += 1
        assert ("model.widths" in params) == (params["model.encoder"] == "sdc")
        if "model.widths" in params:
            assert json.loads(params["model.widths"]) in ([8, 16], [16, 32])
    assert seen["sdc"] and seen["resnet18"]


def test_a_condition_on_a_fixed_parameter_holds_or_not_by_its_value():
    """`_active` looked only at searched parameters: such a parameter was never sampled, silently."""
    space = parse_space({"params": {"train.steps": 4, "train.checkpoint_every": 2,
                                    "train.lr": {"uniform": [0.001, 0.01], "when": {"train.steps": 4}}}}, Config())
    assert all("train.lr" in params for params in sample(space, Config(), 3, seed=0))
    assert set(space.default_point(Config().replace({"train.lr": 0.002}))) == {"train.lr"}


def test_fixed_values_and_fixed_mappings():
    space = parse_space({"params": {"train.steps": 50, "train.checkpoint_every": 25,
                                    "corruption.fill_sources": {"fixed": {"patch": 1.0}},
                                    "train.lr": {"uniform": [0.001, 0.002]}}}, Config())
    assert space.fixed == {"train.steps": 50, "train.checkpoint_every": 25, "corruption.fill_sources": {"patch": 1.0}}
    assert [p.key for p in space.searched] == ["train.lr"]


@pytest.mark.parametrize(("params", "message"), [
    ({"train.lr": {"normal": [0, 1]}}, r"params.train.lr: unknown distribution \['normal'\]"),
    ({"train.learning_rate": {"uniform": [0.1, 0.2]}}, r"params.train.learning_rate: not a config key"),
    ({"train.lr": {"uniform": [0.01, 0.001]}}, r"params.train.lr: low 0.01 > high 0.001"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, r"params.train.lr: loguniform needs low > 0"),
    ({"train.lr": {"uniform": ["a", 1]}}, r"params.train.lr: uniform needs \[low, high\] numbers"),
    ({"train.batch_size": {"uniform": [4, 16]}}, r"params.train.batch_size: uniform gives floats"),
    ({"corruption.max_shapes": {"int": [1.5, 3]}}, r"params.corruption.max_shapes: int needs integer bounds"),
    ({"model.skip": {"choice": ["ccm", "bogus"]}}, r"params.model.skip.*'bogus' is not one of"),
    ({"model.skip": {"choice": []}}, r"params.model.skip: choice needs a non-empty list"),
    ({"corruption.p_corrupt": {"uniform": [0.5, 1.5]}}, r"corruption.p_corrupt = 1.5 is out of range"),
    ({"train.steps": {"int": [100, 200]}}, r"params.train.steps: train.steps sets the trial budget"),
    ({"model.widths": {"choice": [[8]], "when": {"model.encoder": "sdc"}}}, r"when refers to 'model.encoder'"),
    ({"train.lr": {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}}, r"give exactly one distribution"),
    ({"model.encoder": {"choice": ["sdc"]}, "model.skip": {"choice": ["add"], "when": {"model.encoder": "resnet99"}}},
     r"params.model.skip: when model.encoder is 'resnet99', which model.encoder never takes \(its values: \['sdc'\]"),
    # a float range takes a given value with probability 0: the parameter was never sampled, unsaid
    ({"train.lr": {"uniform": [0.001, 0.01]}, "train.w_clean": {"uniform": [0.2, 1.0], "when": {"train.lr": 0.005}}},
     r"params.train.w_clean: when train.lr, which takes any float in a range: a condition needs a choice"),
    ({"corruption.max_shapes": {"int": [1, 4]},
      "model.skip": {"choice": ["add"], "when": {"corruption.max_shapes": 9}}},
     r"when corruption.max_shapes is 9, which corruption.max_shapes never takes \(its values: 1 to 4\)"),
    ({"corruption.max_shapes": {"int": [1, 4]},
      "model.skip": {"choice": ["add"], "when": {"corruption.max_shapes": 2.5}}}, r"max_shapes is 2.5, which"),
])
def test_bad_spaces_fail_naming_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_space({"params": params}, Config(), "bad.yaml")


def test_bad_top_level_fails():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['metrics'\]"):
        parse_space({"metrics": "x", "params": {"train.lr": 0.001}}, Config())
    with pytest.raises(ConfigError, match="non-empty 'params'"):
        parse_space({"params": {}}, Config())
    with pytest.raises(ConfigError, match="mode = 'up'"):
        parse_space({"mode": "up", "params": {"train.lr": 0.001}}, Config())


def test_resolve_space_names_the_shipped_ones(tmp_path):
    assert resolve_space("quick") == SPACES_DIR / "quick.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("params: {train.lr: 0.001}\n")
    assert resolve_space(own) == own
    with pytest.raises(ConfigError, match=r"not one of \['ablation', 'demo', 'paper', 'quality', 'quick'\]"):
        resolve_space("nope")


def test_cli_rejects_a_bad_space_before_any_trial(tmp_path, demo_root, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  train.lr: {uniform: [0.01, 0.001]}\n")
    code = main(["tune", "--data", str(demo_root), "--category", "brick", "--space", str(bad),
                 "--out", str(tmp_path / "exp")])
    assert code == 2
    assert "params.train.lr: low 0.01 > high 0.001" in capsys.readouterr().err
    assert not (tmp_path / "exp" / "tune").exists()


@pytest.mark.parametrize(("space", "overrides", "message"), [
    # checked against the file alone: --set made the space's lower area bounds invalid, and every trial failed
    ("quick", ["--set", "corruption.area_min=0.04"],
     "quick.yaml: params.corruption.area_max = 0.03: corruption.area_max = 0.03 is out of range [0.04, 1.0]"),
    ("paper", ["--image-size", "40"], "params.model.widths = [32, 64, 128, 256]: data.image_size = 40 must be a"),
    # each bound was valid alone; a sampled 33, or two bounds that cross, failed in a trial
    ({"data.image_size": {"int": [32, 64]}}, [], "params.data.image_size = 33: data.image_size = 33 must be a"),
    ({"corruption.area_min": {"uniform": [0.01, 0.06]}, "corruption.area_max": {"uniform": [0.02, 0.5]}}, [],
     "params.corruption.area_min = 0.06 with params.corruption.area_max = 0.02: corruption.area_max = 0.02 is out"),
    # only building the model, the corruption or the autocast checks these: the trials failed, with tracebacks
    ({"model.act": {"choice": ["relu", "foo"]}}, [], "params.model.act = 'foo': model.act = 'foo' is not an"),
    ({"corruption.shapes": {"choice": [["ellipse"], ["bogus"]]}}, [], "params.corruption.shapes = ['bogus']: "),
    ({"train.precision": {"choice": ["bf16", "fp16"]}}, [], "params.train.precision = 'fp16': precision fp16 needs"),
])
def test_cli_rejects_values_a_trial_would_fail_on_before_ray_starts(space, overrides, message, tmp_path, demo_root,
                                                                    capsys):
    if isinstance(space, dict):
        (tmp_path / "space.yaml").write_text(json.dumps({"params": space}))
        space = str(tmp_path / "space.yaml")
    budget = ["--trials", "1", "--steps", "2", "--set", "train.checkpoint_every=2"]  # short, should a check miss
    code = main(["tune", "--data", str(demo_root), "--category", "brick", "--space", space,
                 "--out", str(tmp_path / "exp"), *budget, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "exp").exists()


def test_conditions_keep_pairs_that_no_trial_samples_out_of_the_check():
    """A parameter of one encoder is never combined with a parameter of the other: 4 levels of widths need an
    image size that is a multiple of 16, which the resnet branch's 40 is not."""
    params = {"model.encoder": {"choice": ["sdc", "resnet18"]},
              "model.widths": {"choice": [[8, 16, 32, 64]], "when": {"model.encoder": "sdc"}},
              "data.image_size": {"choice": [40], "when": {"model.encoder": "resnet18"}}}
    parse_space({"params": params}, Config()).check_on(Config())
    narrow = {"model.widths": [[8, 16]]}  # two conditions on a list-valued choice: lists are no set members
    parse_space({"params": {"model.widths": {"choice": [[8, 16], [8, 16, 32]]},
                            "model.norm": {"choice": ["group"], "when": narrow},
                            "model.act": {"choice": ["silu"], "when": narrow}}}, Config()).check_on(Config())
    del params["data.image_size"]["when"]
    with pytest.raises(ConfigError, match=r"params.model.widths = \[8, 16, 32, 64\] with params.data.image_size = 40"):
        parse_space({"params": params}, Config()).check_on(Config())


def test_cli_rejects_a_test_metric(tmp_path, demo_root, capsys):
    code = main(["tune", "--data", str(demo_root), "--category", "brick", "--space", "quick",
                 "--metric", "image_auroc", "--out", str(tmp_path / "exp")])
    assert code == 2
    assert "validation metrics only" in capsys.readouterr().err


def test_cli_rejects_setting_a_searched_parameter(tmp_path, demo_root, capsys):
    code = main(["tune", "--data", str(demo_root), "--category", "brick", "--space", "quick",
                 "--set", "train.lr=0.001", "--out", str(tmp_path / "exp")])
    assert code == 2
    assert "['train.lr']: searched by" in capsys.readouterr().err


@pytest.mark.parametrize(("where", "message"), [
    ("space", "train.log_every in SPACE: a search reports at every checkpoint"),  # trials crashed in ASHA
    ("--set", "train.log_every in --set: a search reports at every checkpoint"),  # silently overridden
    ("seed", "search setting search_seed = -1 (--search-seed): must be from 0 to 4294967295"),  # Optuna's traceback
    ("config", "train.lr = 0.05 in CONFIG: outside what the space searches (loguniform [0.001, 0.008]), and "
               "CONFIG sets the first trial"),  # the first trial was silently another
])
def test_a_search_the_trials_could_not_run_as_asked_is_refused_before_it_starts(tiny_space, tmp_path, where,
                                                                                 message):
    from rayad.tune.search import plan_search

    space, config = tmp_path / "space.yaml", tmp_path / "config.yaml"
    space.write_text(tiny_space.read_text() + ("  train.log_every: 2\n" if where == "space" else ""))
    config.write_text("train:\n  lr: 0.05\n")
    with pytest.raises(ConfigError) as error:
        plan_search(SearchSettings(data_root="d", category="c", space=str(space),
                                   search_seed=-1 if where == "seed" else 0,
                                   overrides={"train.log_every": 2} if where == "--set" else {},
                                   config_file=str(config) if where == "config" else None))
    assert message.replace("SPACE", str(space)).replace("CONFIG", str(config)) in str(error.value)


def test_a_default_outside_the_space_is_left_to_the_sampler_and_a_config_inside_it_is_the_first_trial(tmp_path):
    from rayad.tune.search import plan_search

    narrow, config = tmp_path / "narrow.yaml", tmp_path / "config.yaml"
    narrow.write_text("params:\n  train.lr: {loguniform: [1.0e-4, 1.0e-3]}\n")  # the default is 0.002
    config.write_text("train:\n  lr: 0.0005\n")
    assert plan_search(SearchSettings(data_root="d", category="c", space=str(narrow))).space.default_point(
        Config()) == {}
    plan = plan_search(SearchSettings(data_root="d", category="c", space=str(narrow), config_file=str(config)))
    assert plan.space.default_point(plan.base) == {"train.lr": 0.0005}


def test_a_space_s_mode_is_its_own_metric_s_direction(tmp_path):
    """A space's `mode: min` was applied to another metric given by --metric, which was then minimised."""
    from rayad.tune.search import plan_search

    space = tmp_path / "space.yaml"
    space.write_text("metric: val_aupro\nmode: min\nparams:\n  train.lr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    for metric, modes in [((), ("min",)), (("val_aupro",), ("min",)), (("val_image_auroc",), ("max",))]:
        plan = plan_search(SearchSettings(data_root="d", category="c", space=str(space), metric=metric))
        assert plan.modes == modes, metric


def test_resume_trusts_only_state_of_this_user_not_writable_by_others(tmp_path):
    from rayad.tune.search import check_trusted

    tune_dir = tmp_path / "exp" / "tune"
    (tune_dir / "trial_1").mkdir(parents=True)
    (tune_dir / "tuner.pkl").write_bytes(b"state")
    check_trusted(tune_dir)
    (tune_dir / "trial_1").chmod(0o777)
    with pytest.raises(RayadError, match="trial_1: writable by its group or others"):
        check_trusted(tune_dir)
    (tune_dir / "trial_1").chmod(0o775)  # a umask of 002: every path is named at once, with one command for all
    (tune_dir / "tuner.pkl").chmod(0o664)
    with pytest.raises(RayadError, match=rf"trial_1 \(and 1 more there\): .* chmod -R go-w {tmp_path / 'exp'},"):
        check_trusted(tune_dir)
    (tune_dir / "tuner.pkl").chmod(0o644)
    (tune_dir / "trial_1").chmod(0o755)
    (tmp_path / "link").symlink_to(tmp_path / "exp")  # --out given as a link: its target is the experiment
    check_trusted(tmp_path / "link" / "tune")
    (tune_dir / "searcher-state.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    with pytest.raises(RayadError, match="searcher-state.pkl: a symbolic link"):
        check_trusted(tune_dir)


def test_a_search_writes_nothing_its_group_may_change_under_a_umask_of_002(tmp_path):
    from rayad.tune.search import private_writes

    before = os.umask(0o002)
    try:
        first, second = private_writes(), private_writes()  # two searches in threads of one process
        first.__enter__()
        (tmp_path / "state").mkdir()
        second.__enter__()
        first.__exit__(None, None, None)  # the first ends while the second still writes
        (tmp_path / "state" / "tuner.pkl").write_bytes(b"state")
        second.__exit__(None, None, None)
        assert os.umask(0o002) == 0o002, "the caller's umask comes back"
    finally:
        os.umask(before)
    assert [oct(p.stat().st_mode & 0o777) for p in (tmp_path / "state", tmp_path / "state" / "tuner.pkl")] == [
        "0o755", "0o644"]


@pytest.mark.parametrize("trials, startup, expected", [(1, None, 1), (8, None, 2), (60, None, 10), (8, 5, 5)])
def test_tpe_models_results_after_a_third_of_a_small_search(trials, startup, expected):
    settings = SearchSettings(data_root="d", category="c", space="s", trials=trials, startup_trials=startup)
    assert settings.tpe_startup_trials == expected


def test_cli_rejects_zero_startup_trials(tmp_path, demo_root, capsys):
    code = main(["tune", "--data", str(demo_root), "--category", "brick", "--space", "quick",
                 "--startup-trials", "0", "--out", str(tmp_path / "exp")])
    assert code == 2
    assert "startup_trials = 0 (--startup-trials): must be >= 1" in capsys.readouterr().err


def test_settings_hold_absolute_paths_and_take_one_metric_as_a_string(tmp_path, monkeypatch):
    """A trial runs in its own working folder: a relative data root (the README's example) failed every
    trial. Ray reads a relative storage path as a URI."""
    monkeypatch.chdir(tmp_path)
    s = SearchSettings(data_root="demo_data", category="grass", space="quick.yaml", val_root="val",
                       storage="ckpt", metric="val_image_auroc", mode="max")
    assert (s.data_root, s.val_root, s.storage) == (str(tmp_path / "demo_data"), str(tmp_path / "val"),
                                                    str(tmp_path / "ckpt"))
    assert s.space == str(tmp_path / "quick.yaml")  # a resume from elsewhere read another, or none
    assert (s.metric, s.mode) == (("val_image_auroc",), ("max",))
    assert SearchSettings(data_root="d", category="c", space="s", storage="s3://bucket/x").storage == "s3://bucket/x"
    assert Cluster(storage="ckpt").storage == str(tmp_path / "ckpt")


@pytest.mark.parametrize("field, value", [("trials", "8"), ("trials", 2.5), ("cpus_per_worker", None),
                                          ("search_seed", "a")])
def test_settings_of_the_wrong_type_are_named(field, value):
    with pytest.raises(ConfigError, match=f"SearchSettings.{field} = {value!r}: expected"):
        SearchSettings(data_root="d", category="c", space="s", **{field: value})


def test_a_space_file_that_is_not_utf8_or_gives_a_key_twice_is_one_error(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_bytes(b"params:\n  train.lr: \xff\n")
    with pytest.raises(ConfigError, match="space.yaml: not a UTF-8 text file"):  # a UnicodeDecodeError's trace
        load_space(space)
    space.write_text("params:\n  train.steps: 6\n  train.steps: 8\n")  # the last one won, silently
    with pytest.raises(ConfigError, match=r"space.yaml: not valid YAML \(key 'train.steps' given twice at line 3"):
        load_space(space)
