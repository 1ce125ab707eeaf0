"""Ray Tune + Optuna + ASHA over Ray Train on the real 2-node test cluster: the results store, the best
model, and resuming after the driver is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from tiny import SEARCH_STEPS, TINY_BASE

from rayad.artifact import Predictor
from rayad.cli import main
from rayad.errors import Interrupted
from rayad.evaluate import METRIC_NAMES, evaluate
from rayad.layout import EVALUATION, TRIAL_ENDED, VAL_METRICS
from rayad.tracking import TrialRuns
from rayad.train.checkpoint import recorded_reports
from rayad.tune.store import trial_run_name, write_rows

pytestmark = pytest.mark.slow


def test_trials_table_has_one_row_per_trial_with_params_metrics_and_status(tiny_experiment):
    exp, record = tiny_experiment
    trials = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    assert {t["status"] for t in trials} <= {"completed", "stopped_early"}
    assert all((t["status"] == "completed") == (t["iterations"] == 2) for t in trials)  # 4 steps, every 2
    default = [t for t in trials if t["is_default"]]
    assert len(default) == 1 and default[0]["config/train.lr"] == 2e-3 and default[0]["config/model.skip"] == "ccm"
    for t in trials:
        assert 0.0 <= t["best_value"] <= 1.0 and t["duration_s"] > 0 and os.path.isdir(t["checkpoint_path"])
        assert (t["config/corruption.noise_std"] is None) == (t["config/model.skip"] == "ccm")
        assert all(t[f"final_{m}"] is not None for m in VAL_METRICS)
    assert record["trials"]["completed"] + record["trials"]["stopped_early"] == 4


def test_history_has_every_evaluation(tiny_experiment):
    exp, _ = tiny_experiment
    trials = pq.read_table(exp / "trials.parquet").to_pylist()
    history = pq.read_table(exp / "history.parquet").to_pylist()
    assert len(history) == sum(t["iterations"] for t in trials)
    for t in trials:
        rows = sorted((h for h in history if h["trial_id"] == t["trial_id"]), key=lambda h: h["iteration"])
        assert [h["step"] for h in rows] == [2 * (i + 1) for i in range(t["iterations"])]
        assert max(h["val_image_auroc"] for h in rows) == t["best_value"]


def test_set_wins_over_the_spaces_fixed_values_in_every_trial(tiny_experiment):
    exp, record = tiny_experiment
    for t in pq.read_table(exp / "trials.parquet").to_pylist():
        state = json.loads((Path(t["checkpoint_path"]) / "state.json").read_text())
        assert state["config"]["train"]["steps"] == SEARCH_STEPS  # --set, not the space's 6
        assert state["config"]["train"]["checkpoint_every"] == 2  # the space's, where --set is silent
        assert state["config"]["data"]["image_size"] == TINY_BASE["data.image_size"]
    saved = json.loads((exp / "experiment.json").read_text())
    assert saved["base_config"]["train"]["steps"] == SEARCH_STEPS
    assert saved["space"]["params"]["train.steps"]["args"] == [SEARCH_STEPS]


def test_optuna_study_is_stored_in_sqlite_and_multi_objective(tiny_experiment):
    exp, _ = tiny_experiment
    study = optuna.load_study(study_name="brick", storage=f"sqlite:///{exp / 'study.db'}")
    assert len(study.trials) == 4 and len(study.directions) == 2
    assert study.trials[0].params["train.lr"] == 2e-3  # the default config ran first
    trials = {t["config/train.lr"]: t for t in pq.read_table(exp / "trials.parquet").to_pylist()}
    state = {"completed": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}
    for trial in study.trials:  # the study's states and values are those of trials.parquet
        row = trials[trial.params["train.lr"]]
        assert trial.state == state[row["status"]]
        if row["status"] == "completed":  # both objectives of the trial's last evaluation, at the full budget
            assert trial.values == pytest.approx([row["final_val_image_auroc"], row["final_val_aupro"]])
        else:  # stopped by ASHA at a lower budget: pruned, not ranked beside finished trials
            assert trial.values is None


def test_best_model_is_the_best_trial_evaluated_once_on_test(tiny_experiment, demo_root):
    exp, record = tiny_experiment
    trials = pq.read_table(exp / "trials.parquet").to_pylist()
    best = max(trials, key=lambda t: t["best_value"])
    assert record["best"]["validation"]["val_image_auroc"] == best["best_value"]
    saved = json.loads((exp / "best" / "test_metrics.json").read_text())
    again = evaluate(Predictor.load(exp / "best"), demo_root, "brick")
    for name in METRIC_NAMES:
        assert saved[name] == pytest.approx(again[name]) and record["best"]["test"][name] == saved[name]
    meta = json.loads((exp / "best" / "model.json").read_text())
    assert meta["train"]["validation"]["val_image_auroc"] == best["best_value"]
    assert meta["train"]["search_trial"] == best["trial_id"] == record["best"]["trial_id"]
    assert meta["train"]["threads"] == 1  # a 1-CPU worker's
    # the precision the trial trained in (its checkpoint's), as `rayad train` records it
    assert meta["precision"]["train"]["precision"] in ("fp32", "bf16")
    assert meta["precision"]["train"]["reason"] == "as the trial trained (its checkpoint)"
    written = json.loads((exp / "experiment.json").read_text())
    assert written["status"] == "finished" and written["objective"]["split"] == "validation"
    assert written["resources"] == {"concurrent_trials": 2, "per_trial": "1 worker(s) x 1 CPU"}


def _table(path):
    """The rows of a Parquet file of the results store while a search may be replacing it."""
    try:
        return pq.read_table(path).to_pylist() if path.is_file() else []
    except OSError:
        return []


def _rows(exp):
    return _table(exp / "trials.parquet")


def _history(exp):
    return _table(exp / "history.parquet")


def test_sigterm_stops_the_search_as_ctrl_c_does_and_resume_finishes_it(ray_cluster, demo_root, tiny_space,
                                                                        tmp_path, capsys):
    """Stopped while the second trial runs, after its first evaluation: resumed, that trial continues from its
    checkpoint, where Tune counts its iterations from 1 again (it was recorded as stopped early, and its
    first evaluations were overwritten)."""
    exp = tmp_path / "exp"
    budget = {**TINY_BASE, "train.steps": 12, "train.checkpoint_every": 2}  # 6 evaluations a trial
    args = ["tune", "--data", str(demo_root), "--category", "brick", "--space", str(tiny_space), "--trials", "2",
            "--concurrent", "1", "--scheduler", "fifo", "--out", str(exp), "--address", ray_cluster.address,
            "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}",
            *[a for k, v in budget.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    log = tmp_path / "driver.err"
    with log.open("w") as err:
        driver = subprocess.Popen([sys.executable, "-m", "rayad.cli", *args], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while not (any(r["status"] in TRIAL_ENDED for r in _rows(exp)) and len(_rows(exp)) == 2
                   and len(_history(exp)) > 6):  # the second trial has reported an evaluation
            assert driver.poll() is None and time.time() < deadline, "the second trial did not report"
            time.sleep(0.1)
        # rayad hands SIGTERM to the SIGINT handler, Ray Tune's, which saves its state and returns (Ray's own
        # SIGTERM handler aborted with a C++ stack dump); the search is not finished
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 130
    said = [line for line in log.read_text().splitlines() if line.startswith("rayad tune:")]  # among Ray's logs
    assert said == [f"rayad tune: interrupted: 1 of 2 trials ended; the state is saved: resume with rayad tune "
                    f"--out {exp} --resume"]
    record = json.loads((exp / "experiment.json").read_text())
    assert record["status"] == "interrupted" and record["stopped_at"] and not (exp / "best").exists()
    before = {r["trial_id"]: r for r in _rows(exp) if r["status"] in TRIAL_ENDED}
    assert len(before) == 1 and [r["status"] for r in _rows(exp) if r["trial_id"] not in before] == ["interrupted"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    stopped = client.search_runs([client.get_experiment_by_name("exp").experiment_id], "tags.status = 'interrupted'")
    assert [r.info.status for r in stopped] == ["KILLED"]  # the trial stopped with the search
    _forget_the_last_evaluation_ray_train_recorded(exp, next(r["trial_id"] for r in _rows(exp)
                                                             if r["trial_id"] not in before))

    resume = ["tune", "--out", str(exp), "--resume", "--address", ray_cluster.address]
    state = exp / "tune" / "tuner.pkl"
    state.chmod(0o666)  # anyone could have planted code in it: --resume refuses to unpickle it
    before_bytes, record_bytes = state.read_bytes(), (exp / "experiment.json").read_bytes()
    assert main(resume) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rayad tune:")]
    assert len(err) == 1 and "tuner.pkl: writable by its group or others; --resume unpickles" in err[0]
    assert state.read_bytes() == before_bytes and (exp / "experiment.json").read_bytes() == record_bytes
    state.chmod(0o644)

    assert main(resume) == 0
    after = {r["trial_id"]: r for r in _rows(exp)}
    assert len(after) == 2 and all(r["status"] == "completed" and r["iterations"] == 6 for r in after.values())
    for trial_id, row in after.items():  # each evaluation recorded once (one that Tune did not deliver as the
        # signal came is recovered from Ray Train's record), and the best checkpoint is the one Ray Train kept
        records = [(h["iteration"], h["step"]) for h in _history(exp) if h["trial_id"] == trial_id]
        assert sorted(records) == [(k, 2 * k) for k in range(1, 7)], records
        assert Path(row["checkpoint_path"], "state.json").is_file()
        run = exp / "trials" / trial_run_name(trial_id)
        kept = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
        assert kept <= recorded_reports(str(exp / "trials"), run.name).keys()  # none that Ray Train did not record
    _mlflow_runs_equal_the_store(exp, f"sqlite:///{tmp_path / 'mlflow.db'}")  # the resumed trial in its own run
    for trial_id, row in before.items():  # finished trials were not run again
        assert after[trial_id]["ended_at"] == row["ended_at"] and after[trial_id]["best_value"] == row["best_value"]
    study = optuna.load_study(study_name="brick", storage=f"sqlite:///{exp / 'study.db'}")
    assert len(study.trials) == 2
    record = json.loads((exp / "experiment.json").read_text())
    assert record["status"] == "finished" and len(record["resumed_at"]) == 1 and record["stopped_at"] is None
    assert (exp / "best" / "model.json").is_file()


def _forget_the_last_evaluation_ray_train_recorded(exp, trial_id):
    """As when Ctrl-C comes between Ray Train's record of a checkpoint and Tune's delivery of its report (the
    resumed trial goes on after that checkpoint, and Tune never reports it again)."""
    recorded = recorded_reports(str(exp / "trials"), trial_run_name(trial_id))
    last = max(m[EVALUATION] for m in recorded.values())
    history = [h for h in _history(exp) if (h["trial_id"], h["iteration"]) != (trial_id, last)]  # if delivered
    pq.write_table(pa.Table.from_pylist(history), exp / "history.parquet")


@pytest.mark.parametrize("raised, status, error", [(KeyboardInterrupt(), "interrupted", None),
                                                    (RuntimeError("the head node left"), "failed",
                                                     "RuntimeError: the head node left")])
def test_a_search_that_ends_early_says_so_in_its_record(ray_cluster, demo_root, tiny_space, tmp_path, monkeypatch,
                                                        raised, status, error):
    """A search stopped by Ctrl-C where Ray Tune does not catch it (a second Ctrl-C, or one while the best model is
    evaluated) or ended by an error is no longer shown as running, nor are the trials it left running."""
    from rayad.tune import SearchSettings, run_search

    class Tuner:
        def fit(self):
            write_rows([{"trial_id": "a1", "status": "running"}, {"trial_id": "b2", "status": "completed"}],
                       tmp_path / "exp" / "trials.parquet")
            raise raised

    monkeypatch.setattr("rayad.tune.search._tuner", lambda *args: Tuner())
    settings = SearchSettings(data_root=str(demo_root), category="brick", space=str(tiny_space), trials=2,
                              overrides=TINY_BASE)
    with pytest.raises(type(raised)) as ended:
        run_search(settings, tmp_path / "exp", address=ray_cluster.address, verbose=0)
    record = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert record["status"] == status and record["error"] == error and record["stopped_at"]
    assert [r["status"] for r in _rows(tmp_path / "exp")] == ["interrupted", "completed"]
    if status == "interrupted":  # the CLI said only "interrupted"
        resume = f"rayad tune --out {tmp_path / 'exp'} --resume"
        assert str(ended.value) == f"stopped; the state is saved: resume with {resume}"


def test_ctrl_c_while_the_best_model_is_exported_stops_the_search_and_resume_exports_it(ray_cluster, demo_root,
                                                                                       tiny_space, tmp_path,
                                                                                       monkeypatch):
    """Ray Tune leaves its SIGINT handler in place after fit(), which took Ctrl-C (and SIGTERM) while the best model
    was exported and evaluated, and did nothing."""
    from rayad.tune import SearchSettings, run_search

    exp, exported = tmp_path / "exp", []

    def interrupted_export(*args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # Python runs the handler between two bytecodes
        exported.append(args)

    monkeypatch.setattr("rayad.tune.search.export_best", interrupted_export)
    settings = SearchSettings(data_root=str(demo_root), category="brick", space=str(tiny_space), trials=1,
                              overrides=TINY_BASE)
    with pytest.raises(Interrupted, match=f"stopped; the state is saved: resume with rayad tune --out {exp} --resume"):
        run_search(settings, exp, address=ray_cluster.address, verbose=0)
    assert not exported and json.loads((exp / "experiment.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    record = run_search(settings, exp, address=ray_cluster.address, resume=True, verbose=0)
    assert record["status"] == "finished" and (exp / "best" / "model.json").is_file()


def test_mlflow_runs_equal_the_results_store(tiny_experiment):
    exp, record = tiny_experiment
    client, runs = _mlflow_runs_equal_the_store(exp, record["settings"]["mlflow"])
    (best,) = [r for r in runs if r.data.tags.get("rayad") == "best"]
    assert best.data.tags["trial_id"] == record["best"]["trial_id"]
    test = json.loads((exp / "best" / "test_metrics.json").read_text())
    assert best.data.metrics["test_image_auroc"] == pytest.approx(test["image_auroc"])
    artifacts = {a.path for a in client.list_artifacts(best.info.run_id, "model")}
    assert {"model/model.safetensors", "model/model.json"} <= artifacts


def _mlflow_runs_equal_the_store(exp, uri):
    """One MLflow run per trial, with its parameters, every evaluation of history.parquet at its number, and
    its end; returns the client and the experiment's runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(exp.name).experiment_id])
    trials = {t["trial_id"]: t for t in _rows(exp)}
    by_trial = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("rayad") == "trial"}
    assert len(by_trial) == sum(r.data.tags.get("rayad") == "trial" for r in runs)
    assert by_trial.keys() == trials.keys()
    for trial_id, run in by_trial.items():
        row = trials[trial_id]
        for key in ("train.lr", "corruption.p_corrupt", "model.skip"):
            assert run.data.params[key] == str(row[f"config/{key}"])
        curve = client.get_metric_history(run.info.run_id, "val_image_auroc")
        expected = sorted((h["iteration"], h["val_image_auroc"]) for h in _history(exp) if h["trial_id"] == trial_id)
        logged = sorted((m.step, m.value) for m in curve)
        assert [step for step, _ in logged] == [step for step, _ in expected]
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected])
        assert run.info.status == TrialRuns.END_STATUS[row["status"]] and run.data.tags["status"] == row["status"]
    return client, runs


def _as_if_begun_there(exp: Path) -> None:
    record = json.loads((exp / "experiment.json").read_text())
    (exp / "experiment.json").write_text(json.dumps({**record, "folder": os.path.realpath(exp)}))


def test_a_search_never_overwrites_or_merges_with_an_experiment_and_damage_is_named(tiny_experiment, demo_root,
                                                                                     tiny_space, tmp_path, capsys):
    exp = tmp_path / "exp"
    shutil.copytree(tiny_experiment[0], exp)
    before = {name: (exp / name).read_bytes() for name in ("experiment.json", "trials.parquet")}
    new = ["tune", "--data", str(demo_root), "--category", "grass", "--space", str(tiny_space), "--out", str(exp)]
    damaged_json, damaged_rows, lost_rows = tmp_path / "damaged_json", tmp_path / "damaged_rows", tmp_path / "lost"
    older, other_space, fewer = tmp_path / "older", tmp_path / "other_space", tmp_path / "fewer"
    for copy in (damaged_json, damaged_rows, lost_rows, older, other_space, fewer):
        shutil.copytree(exp, copy)
        _as_if_begun_there(copy)
    record = json.loads((older / "experiment.json").read_text())
    record["versions"]["rayad"] = "0.0.9"
    (older / "experiment.json").write_text(json.dumps(record))
    record = json.loads((other_space / "experiment.json").read_text())  # as if the space file had changed since
    record["space"]["params"][next(iter(record["space"]["params"]))]["args"] = [0.5, 0.6]  # a trial crashed
    (other_space / "experiment.json").write_text(json.dumps(record))
    shutil.copytree(demo_root, tmp_path / "data")  # as if an image had gone since: a resumed trial trained without it
    next((tmp_path / "data" / "brick" / "train" / "good").iterdir()).unlink()
    moved = json.loads((fewer / "experiment.json").read_text())
    (fewer / "experiment.json").write_text(json.dumps({**moved, "data_root": str(tmp_path / "data"), "settings": {
        **moved["settings"], "data_root": str(tmp_path / "data")}}))
    (damaged_json / "experiment.json").write_text("[]")
    (damaged_rows / "trials.parquet").write_bytes(before["trials.parquet"][:100])
    (lost_rows / "trials.parquet").unlink()  # resuming used to end "interrupted" again, every time
    for args, message in [
        (new, "already holds an experiment; resume it"),  # it used to merge the two searches
        (["tune", "--out", str(exp), "--resume", "--category", "grass"], "--category with --resume"),
        (["tune", "--out", str(exp), "--resume", "--scheduler", "asha"], "--scheduler with --resume"),  # the default
        # its manifest was replaced, and serve found the run's model, not the search's best
        (new[:-1] + [str(exp / "best")], f"{exp / 'best'} holds a model (model.json); give the search a new folder"),
        (new[:-1] + [str(tmp_path / "other"), "--cpus-per-worker", "0.00001"],  # Ray's error, after it began
         "cpus_per_worker = 1e-05 (--cpus-per-worker): must be a count to 4 decimal places (Ray's)"),
        (["tune", "--out", str(exp), "--resume", "--trials", "5", "--set", "train.lr=0.5"],  # silently ignored
         "--trials, --set with --resume: a search resumes as it began"),
        (["tune", "--out", str(other_space), "--resume"], f"{other_space}: its space changed since the search began "
                                                          f"({record['settings']['space']} changed)"),
        (new[:-1] + [str(tmp_path / "other"), "--concurrent", "-1"], "concurrent = -1 (--concurrent): must be >= 1"),
        (["tune", "--out", str(damaged_json), "--resume"], "experiment.json: not an experiment record"),
        (["tune", "--out", str(damaged_rows), "--resume"], "trials.parquet: unreadable"),
        (["tune", "--out", str(lost_rows), "--resume"], "trials.parquet: lacks 4 of the 4 trials Ray Tune has"),
        (["tune", "--out", str(older), "--resume"], f"started with rayad 0.0.9, ray {ray.__version__}, optuna "
                                                   f"{optuna.__version__}, and only those versions can resume it"),
        # Ray Tune's state names the folder: a copy wrote into the original, a moved search crashed in SQLite
        (["tune", "--out", str(exp), "--resume"], f"the search began in {os.path.realpath(tiny_experiment[0])}, "
                                                  "and a search cannot move"),
        (["tune", "--out", str(fewer), "--resume"], "manifest.parquet: the search began on other images than"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert {name: (exp / name).read_bytes() for name in before} == before
    assert json.loads((damaged_rows / "experiment.json").read_text())["status"] == "finished"
