"""The results store's writer, fed as Ray Tune feeds it, and its recovery of reports that Ctrl-C kept from Tune."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pyarrow.parquet as pq
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
    _CheckpointManagerState,
    _TrainingResultState,
)

from rayad.layout import EVALUATION, VAL_METRICS
from rayad.tracking import TrialRuns
from rayad.train.checkpoint import SNAPSHOT
from rayad.tune.store import ResultsStore, mark_interrupted, trial_run_name

TRIAL = SimpleNamespace(trial_id="a1", config={"train.lr": 0.001}, error_file=None)


def _report(evaluation: int, auroc: float) -> dict:
    return {EVALUATION: evaluation, "step": 10 * evaluation, "loss": 0.1 / evaluation, "interval_images_per_s": 50.0,
            **{m: auroc for m in VAL_METRICS}}


def _store(exp, trials) -> ResultsStore:
    store = ResultsStore(exp, "val_image_auroc", "max", 4, ["train.lr"], {"train.lr": 0.001}, str(trials))
    store.setup()
    return store


def _record_in_ray_trains_snapshot(run, kept: list[tuple[str, dict]], latest: tuple[str, dict]) -> None:
    """The snapshot as Ray Train writes it (its own model), keeping `kept` and the latest."""
    def state(name, metrics):
        return _TrainingResultState(checkpoint_dir_name=name, metrics=metrics)
    run.mkdir(parents=True, exist_ok=True)
    (run / SNAPSHOT).write_text(_CheckpointManagerState(
        checkpoint_results=[state(*r) for r in kept], checkpoint_report_indices=list(range(len(kept))),
        latest_checkpoint_result=state(*latest), pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(kept), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[]).model_dump_json())


def test_a_resumed_trial_recovers_the_evaluations_ray_train_recorded_but_tune_never_delivered(tmp_path):
    exp, trials = tmp_path / "exp", tmp_path / "exp" / "trials"
    exp.mkdir()
    run = trials / trial_run_name(TRIAL.trial_id)
    store = _store(exp, trials)
    store.on_trial_start(0, [], TRIAL)  # a new trial: Ray Train has recorded nothing yet
    for evaluation, auroc in [(1, 0.6), (2, 0.7)]:
        store.on_trial_result(0, [], TRIAL, {**_report(evaluation, auroc), "time_total_s": 5.0 * evaluation,
                                             "checkpoint_path": f"{run}/checkpoint_{evaluation}"})
    row = pq.read_table(exp / "trials.parquet").to_pylist()[0]  # the row as a resumed search finds it
    assert (row["iterations"], row["best_value"], row["checkpoint_path"]) == (2, 0.7, f"{run}/checkpoint_2")
    # Ctrl-C: Ray Train recorded evaluation 3, the best, with its checkpoint; Tune stopped before delivering it
    lost = {**_report(3, 0.8), "logged_at": 1_700_000_000.5}
    _record_in_ray_trains_snapshot(run, kept=[("checkpoint_3", lost)], latest=("checkpoint_3", lost))

    resumed = _store(exp, trials)
    resumed.on_trial_start(0, [], TRIAL)
    history = pq.read_table(exp / "history.parquet").to_pylist()
    assert [(h["iteration"], h["step"], h["val_image_auroc"]) for h in history] == [(1, 10, 0.6), (2, 20, 0.7),
                                                                                     (3, 30, 0.8)]
    assert history[-1]["images_per_s"] == 50.0 and history[-1]["time_total_s"] is None  # Tune's clock: unknown
    assert history[-1]["timestamp"] == 1_700_000_000.5  # when it was evaluated, not when it was recovered
    row = pq.read_table(exp / "trials.parquet").to_pylist()[0]
    assert (row["iterations"], row["steps"], row["best_iteration"], row["best_value"]) == (3, 30, 3, 0.8)
    assert row["checkpoint_path"] == f"{run}/checkpoint_3"  # the checkpoint the best model is exported from
    assert row["duration_s"] == 10.0 and row["final_val_image_auroc"] == 0.8

    # a kept checkpoint older than what the store holds is not recorded again, nor does it move the row back
    _record_in_ray_trains_snapshot(run, kept=[("checkpoint_3", _report(3, 0.8))], latest=("checkpoint_4",
                                                                                           _report(4, 0.5)))
    again = _store(exp, trials)
    again.on_trial_start(0, [], TRIAL)
    history = pq.read_table(exp / "history.parquet").to_pylist()
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    row = pq.read_table(exp / "trials.parquet").to_pylist()[0]
    assert (row["iterations"], row["best_iteration"], row["final_val_image_auroc"]) == (4, 3, 0.5)


def test_a_damaged_record_or_storage_loses_only_the_recovery(tmp_path, caplog):
    exp, trials = tmp_path / "exp", tmp_path / "trials"
    exp.mkdir()
    run = trials / trial_run_name(TRIAL.trial_id)
    run.mkdir(parents=True)
    (run / SNAPSHOT).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="rayad.tune.store"):
        _store(exp, trials).on_trial_start(0, [], TRIAL)
        _store(exp, "nosuchscheme://bucket/trials").on_trial_start(0, [], TRIAL)  # pyarrow: ArrowInvalid
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all(m.startswith("trial a1: its lost evaluations cannot be recovered") for m in said)
    assert "unreadable" in said[0]
    assert pq.read_table(exp / "trials.parquet").to_pylist()[0]["status"] == "running"


def test_a_trial_that_asha_stops_keeps_the_checkpoint_ray_train_kept(tmp_path):
    """ASHA stopped the trial after its second evaluation, while the third, better one, waited for Tune: Ray Train
    recorded it and deleted the second's checkpoint, the best the store knew."""
    exp, trials = tmp_path / "exp", tmp_path / "trials"
    exp.mkdir()
    run = trials / trial_run_name(TRIAL.trial_id)
    store = _store(exp, trials)
    store.on_trial_start(0, [], TRIAL)
    for evaluation, auroc in [(1, 0.6), (2, 0.7)]:
        store.on_trial_result(0, [], TRIAL, {**_report(evaluation, auroc), "time_total_s": 1.0,
                                             "checkpoint_path": f"{run}/checkpoint_{evaluation}"})
    _record_in_ray_trains_snapshot(run, kept=[("checkpoint_3", _report(3, 0.8))], latest=("checkpoint_3",
                                                                                           _report(3, 0.8)))
    for folder in ("checkpoint_3", "checkpoint_4"):  # the fourth: written as Tune stopped it, never recorded
        (run / folder).mkdir()
        (run / folder / "model.safetensors").write_bytes(b"weights")
    store.on_trial_complete(0, [], TRIAL)
    row = pq.read_table(exp / "trials.parquet").to_pylist()[0]
    assert (row["status"], row["iterations"], row["best_value"]) == ("stopped_early", 3, 0.8)
    assert row["checkpoint_path"] == f"{run}/checkpoint_3"
    assert [h["iteration"] for h in pq.read_table(exp / "history.parquet").to_pylist()] == [1, 2, 3]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_3", SNAPSHOT]  # nothing reads the fourth


def test_the_best_checkpoint_is_named_so_that_any_process_opens_it_in_a_storage_uri(tmp_path):
    """Ray Train gives a checkpoint as a path in its storage's filesystem, without the scheme and the query: the best
    model's export opened it as a local path."""
    (tmp_path / "exp").mkdir()
    store = _store(tmp_path / "exp", "s3://bucket/runs/trials?endpoint_override=minio:9000&scheme=http")
    store.on_trial_result(0, [], TRIAL, {**_report(1, 0.6), "checkpoint_path": "bucket/runs/trials/trial_a1/ckpt_1"})
    assert store.trials["a1"]["checkpoint_path"] == ("s3://bucket/runs/trials/trial_a1/ckpt_1?endpoint_override="
                                                     "minio:9000&scheme=http")


def test_an_mlflow_that_fails_loses_its_entries_not_the_search(tmp_path, caplog):
    exp = tmp_path / "exp"
    exp.mkdir()
    (tmp_path / "file").write_text("")  # MLflow cannot make its database below a file
    store = ResultsStore(exp, "val_image_auroc", "max", 4, ["train.lr"], {"train.lr": 0.001}, str(tmp_path / "t"),
                         TrialRuns(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}", "exp"))
    store.setup()
    with caplog.at_level(logging.WARNING, logger="rayad.tune.store"):
        store.on_trial_start(0, [], TRIAL)
        store.on_trial_result(0, [], TRIAL, {**_report(1, 0.6), "time_total_s": 1.0, "checkpoint_path": "c"})
        store.on_trial_complete(0, [], TRIAL)
    said = [r.getMessage() for r in caplog.records]  # once: every call would wait out MLflow's retries
    assert len(said) == 1 and said[0].startswith("MLflow (--mlflow) failed (") and "goes on" in said[0], said
    assert [h["iteration"] for h in pq.read_table(exp / "history.parquet").to_pylist()] == [1]
    assert pq.read_table(exp / "trials.parquet").to_pylist()[0]["status"] == "stopped_early"


def test_trials_a_stopped_search_left_running_are_interrupted_until_it_resumes_them(tmp_path, caplog, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    store, other = _store(exp, tmp_path / "trials"), SimpleNamespace(**{**vars(TRIAL), "trial_id": "b2"})
    for trial in (TRIAL, other):
        store.on_trial_start(0, [], trial)
        store.on_trial_result(0, [], trial, {**_report(1, 0.6), "time_total_s": 1.0, "checkpoint_path": "c"})
    store.on_trial_complete(0, [], other)
    mark_interrupted(exp)
    statuses = {r["trial_id"]: r["status"] for r in pq.read_table(exp / "trials.parquet").to_pylist()}
    assert statuses == {"a1": "interrupted", "b2": "stopped_early"}
    resumed, new = _store(exp, tmp_path / "trials"), SimpleNamespace(**{**vars(TRIAL), "trial_id": "c3"})
    resumed.on_trial_start(0, [], new)
    resumed.on_trial_complete(0, [], new)
    assert "(2 trials done)" in capsys.readouterr().out.splitlines()[-1]  # b2 and c3: a1 is not done
    resumed.on_trial_start(0, [], TRIAL)
    assert resumed.trials["a1"]["status"] == "running"
    (exp / "trials.parquet").write_bytes(b"PAR1 not parquet")
    with caplog.at_level(logging.WARNING, logger="rayad.tune.store"):
        mark_interrupted(exp)  # the search stops with its own error
    assert "its trials stay marked running" in caplog.text


def test_a_stopped_search_ends_the_mlflow_runs_of_its_running_trials_even_when_ray_tune_ran_no_callback(tmp_path):
    """A second Ctrl-C stops Ray Tune before its callbacks run: the search's own stop ends the runs."""
    from mlflow import MlflowClient

    exp, uri = tmp_path / "exp", f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp.mkdir()
    store = ResultsStore(exp, "val_image_auroc", "max", 4, ["train.lr"], {"train.lr": 0.001}, str(tmp_path / "t"),
                         TrialRuns(uri, "exp"))
    store.setup()
    store.on_trial_start(0, [], TRIAL)
    mark_interrupted(exp, TrialRuns(uri, "exp"))  # a new process's connection, as the search's stop has
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert (run.info.status, run.data.tags["status"], run.data.params) == ("KILLED", "interrupted",
                                                                           {"train.lr": "0.001"})
    assert pq.read_table(exp / "trials.parquet").to_pylist()[0]["status"] == "interrupted"


def test_a_failed_trial_keeps_its_whole_error_not_the_last_line_of_it(tmp_path, capsys):
    """A rayad error's last line is what to do; alone ("(set data.on_bad_image=skip to skip them)") it said nothing."""
    error_file = tmp_path / "error.txt"
    error_file.write_text('Traceback (most recent call last):\n  File "search.py", line 1, in run_trial\n'
                          "    trainer.fit()\nrayad.errors.DataError: 1 bad image(s) in the train split:\n"
                          "  /data/brick/train/good/000.png: 128x128 pixels is over the limit of 100\n"
                          "(set data.on_bad_image=skip to skip them)\n")
    (tmp_path / "exp").mkdir()
    store = _store(tmp_path / "exp", tmp_path / "trials")
    store.on_trial_error(0, [], SimpleNamespace(**{**vars(TRIAL), "error_file": str(error_file)}))
    row = pq.read_table(tmp_path / "exp" / "trials.parquet").to_pylist()[0]
    assert row["status"] == "error" and row["error"] == (
        "DataError: 1 bad image(s) in the train split: /data/brick/train/good/000.png: 128x128 pixels is over the "
        "limit of 100 (set data.on_bad_image=skip to skip them)")
    assert row["error"] in capsys.readouterr().out
