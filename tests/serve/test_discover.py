"""Which models `rayad serve --run` finds: a run, an experiment's best model, or a folder of them."""

from __future__ import annotations

import json
import shutil

import pytest

from rayad.errors import RayadError
from rayad.serve import discover_models
from rayad.serve.app import model_card


def test_run_experiment_and_folder(trained_run, tmp_path):
    assert discover_models(trained_run) == {trained_run.name: str(trained_run.absolute())}
    exp = tmp_path / "demo" / "exp-a"
    shutil.copytree(trained_run, exp / "best")
    (exp / "experiment.json").write_text(json.dumps({"category": "brick"}))
    (exp / "best" / "test_metrics.json").write_text(json.dumps({"image_auroc": 0.75}))
    shutil.copytree(trained_run, tmp_path / "demo" / "grass")
    (tmp_path / "demo" / "data").mkdir()  # not a model: ignored
    models = discover_models(tmp_path / "demo")
    assert models == {"brick": str((exp / "best").absolute()), "grass": str((tmp_path / "demo" / "grass").absolute())}
    card = model_card("brick", models["brick"])
    assert card["metrics"]["image_auroc"] == 0.75 and card["image_size"] == 32
    assert card["name"] == "brick" and model_card("grass", models["grass"])["category"] == "brick"  # trained on
    with pytest.raises(RayadError, match="no model found"):
        discover_models(tmp_path / "demo" / "data")
    with pytest.raises(RayadError, match="model.json: a file; give a run's folder"):  # it said "no model found"
        discover_models(tmp_path / "demo" / "grass" / "model.json")


def test_two_experiments_of_one_category_and_a_damaged_record_are_all_served(trained_run, tmp_path):
    folder = tmp_path / "runs"
    for name, record in [("exp-a", {"category": "brick"}), ("exp-b", {"category": "brick"}), ("exp-c", None)]:
        shutil.copytree(trained_run, folder / name / "best")
        (folder / name / "experiment.json").write_text(json.dumps(record) if record else "{")  # exp-c: damaged
    models = discover_models(folder)  # one of them used to hide the other, and the damaged record stopped all
    assert models == {name: str((folder / name / "best").absolute()) for name in ("exp-a", "exp-b", "exp-c")}


def test_damaged_test_metrics_leave_the_card_without_metrics_not_the_server_without_models(trained_run, tmp_path,
                                                                                           caplog):
    exp = tmp_path / "exp"
    shutil.copytree(trained_run, exp / "best")
    (exp / "best" / "test_metrics.json").write_text('{"image_auroc": 0.7')  # cut short: every deployment failed
    card = model_card("exp", str(exp / "best"))
    assert card["metrics"] and set(card["metrics"].values()) == {None} and card["name"] == "exp"
    assert "its card shows no test metrics" in caplog.text
