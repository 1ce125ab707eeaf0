"""The writer of an experiment's results store (layout: rayad.layout), a Tune callback run as trials go.

trials.parquet has one row per trial (params, final and best validation metrics, status, times, best
checkpoint); history.parquet one row per trial and evaluation. Every file is replaced atomically, so
readers never see half a file. A report that Ctrl-C kept from Tune after Ray Train recorded it is recovered from
Ray Train's record when the trial resumes.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

from rayad.errors import ArtifactError
from rayad.layout import (
    EVALUATION,
    HISTORY,
    PARAM_PREFIX,
    TRIAL_ENDED,
    TRIALS,
    VAL_METRICS,
    atomic_write,
    storage_path,
    trial_params,
)
from rayad.tracking import TrialRuns
from rayad.train.checkpoint import delete_unrecorded, recorded_reports

log = logging.getLogger(__name__)


class ResultsStore(Callback):
    """Keeps trials.parquet and history.parquet up to date; reloads them when an experiment resumes."""

    def __init__(self, exp_dir: str | Path, metric: str, mode: str, max_iterations: int, param_keys: list[str],
                 default_point: dict[str, Any], trials_storage: str, tracker: TrialRuns | None = None):
        self.exp_dir, self.trials_storage, self.tracker = Path(exp_dir), trials_storage, tracker
        self.metric, self.mode, self.max_iterations = metric, mode, max_iterations
        self.param_keys, self.default_point = param_keys, default_point
        self.trials: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []

    def setup(self, **info) -> None:
        self.trials = {row["trial_id"]: row for row in read_rows(self.exp_dir / TRIALS)}
        self.history = read_rows(self.exp_dir / HISTORY)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        row = self.trials.get(trial.trial_id) or self._new_row(trial)
        row["status"] = "running"
        self.trials[trial.trial_id] = row
        self._track("started", trial.trial_id, trial_params(row))
        self._recover(trial)
        self._write_trials()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._record(trial, result)
        write_rows(self.history, self.exp_dir / HISTORY)
        self._write_trials()  # a resumed trial goes on from its row: the best so far is the checkpoint Ray Train kept

    def _recover(self, trial) -> dict[str, dict[str, Any]] | None:
        """The trial's evaluations that Ray Train recorded with their checkpoints but Tune never delivered. When a
        trial resumes: Ctrl-C came between the two, and the trial goes on after that checkpoint. When it ends: ASHA
        stopped it while its next report waited, and a better one there replaced the kept checkpoint. (ASHA and
        Optuna did not see them.) Returns what Ray Train recorded, None where its record cannot be read."""
        try:
            reports = recorded_reports(self.trials_storage, trial_run_name(trial.trial_id))
        except (ArtifactError, OSError, ValueError, AttributeError, KeyError, TypeError) as e:  # storage or record
            log.warning("trial %s: its lost evaluations cannot be recovered: %s", trial.trial_id, e)
            return None
        seen = max((h["iteration"] for h in self.history if h["trial_id"] == trial.trial_id), default=0)
        lost = sorted((m[EVALUATION], name, m) for name, m in reports.items() if m.get(EVALUATION, 0) > seen)
        for _, name, metrics in lost:
            self._record(trial, {**metrics, "checkpoint_path": name})
        if lost:
            write_rows(self.history, self.exp_dir / HISTORY)  # the caller writes the trials
        return reports

    def _ended(self, trial) -> None:
        """An ended trial: its lost evaluations recovered, and the checkpoints that Ray Train wrote as Tune stopped
        it but never recorded deleted (no one reads them; each holds the network and its optimiser state)."""
        recorded = self._recover(trial)
        if recorded is None:
            return
        try:
            deleted = delete_unrecorded(self.trials_storage, trial_run_name(trial.trial_id), recorded)
        except OSError as e:
            log.warning("trial %s: its unrecorded checkpoints stay: %s", trial.trial_id, e)
            return
        if deleted:
            log.info("trial %s: deleted %d checkpoint(s) Ray Train never recorded", trial.trial_id, len(deleted))

    def _record(self, trial, result: dict[str, Any]) -> None:
        record = {"trial_id": trial.trial_id, "iteration": result[EVALUATION], "step": result.get("step"),
                  "loss": result.get("loss"), **{m: result.get(m) for m in VAL_METRICS},
                  "images_per_s": result.get("interval_images_per_s"), "time_total_s": result.get("time_total_s"),
                  "timestamp": result.get("logged_at", time.time())}
        self.history = [h for h in self.history
                        if (h["trial_id"], h["iteration"]) != (record["trial_id"], record["iteration"])]
        self.history.append(record)
        self._track("evaluated", trial.trial_id, record)
        row = self.trials.setdefault(trial.trial_id, self._new_row(trial))
        row.update({f"final_{m}": result.get(m) for m in VAL_METRICS})
        row.update(iterations=result[EVALUATION], steps=result.get("step"),
                   duration_s=result.get("time_total_s", row["duration_s"]))  # a recovered report has no time
        value = result.get(self.metric)
        if value is not None and (row["best_value"] is None or self._better(value, row["best_value"])):
            row.update(best_value=value, best_iteration=result[EVALUATION], best_step=result.get("step"),
                       checkpoint_path=self._checkpoint_uri(trial.trial_id, result.get("checkpoint_path")))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, error=_error_message(trial))

    def _end(self, trial, error: str | None = None) -> None:
        """Record a trial's end in its row (status, error), the files, its MLflow run and the progress line; a
        trial ended without an error completed, or ASHA stopped it early, by the evaluations it made."""
        row = self.trials.setdefault(trial.trial_id, self._new_row(trial))
        self._ended(trial)  # recovers lost evaluations first
        if error is not None:
            row.update(status="error", error=error)
        else:
            row["status"] = "completed" if (row["iterations"] or 0) >= self.max_iterations else "stopped_early"
        row["ended_at"] = time.time()
        self._write_trials()
        self._track("ended", trial.trial_id, row["status"], trial_params(row))
        self._print_progress(row)

    def _track(self, event: str, *args) -> None:
        """Tell the MLflow runs (--mlflow). An MLflow that fails is told nothing more in this search, which goes
        on: each call would wait out MLflow's retries (4 minutes by default)."""
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, event)(*args)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own and its stores' errors
            log.warning("MLflow (--mlflow) failed (%s: %s); it records no more of this search, which goes on, and "
                        "the results store keeps every trial", type(e).__name__, e)
            self.tracker = None

    def _checkpoint_uri(self, trial_id: str, reported: str | None) -> str | None:
        """Where a reported checkpoint is, as a path or a URI that opens it from any process. Ray Train gives it
        as a path in its storage's filesystem, without a URI's scheme (s3://) and query."""
        if not reported:
            return None
        return storage_path(self.trials_storage, trial_run_name(trial_id), PurePosixPath(reported).name)

    def _new_row(self, trial) -> dict[str, Any]:
        params = {key: trial.config.get(key) for key in self.param_keys}
        return {"trial_id": trial.trial_id, "status": "running", "is_default": params == {
                    k: self.default_point.get(k) for k in self.param_keys},
                **{PARAM_PREFIX + k: v for k, v in params.items()},
                **{f"final_{m}": None for m in VAL_METRICS}, "metric": self.metric, "best_value": None,
                "best_iteration": None, "best_step": None, "iterations": 0, "steps": 0, "started_at": time.time(),
                "ended_at": None, "duration_s": None, "checkpoint_path": None, "error": None}

    def _print_progress(self, row: dict[str, Any]) -> None:
        done = sum(r["status"] in TRIAL_ENDED for r in self.trials.values())
        best = max((r["best_value"] for r in self.trials.values() if r["best_value"] is not None),
                   key=lambda v: v if self.mode == "max" else -v, default=None)
        value = "-" if row["best_value"] is None else f"{row['best_value']:.4f}"
        print(f"[rayad] trial {row['trial_id']} {row['status']} after {row['iterations']}/{self.max_iterations} "
              f"evaluations ({row['duration_s'] or 0:.0f}s): {self.metric} {value}; best so far "
              f"{'-' if best is None else f'{best:.4f}'} ({done} trials done)" + (f"; {row['error']}" if row["error"]
                                                                                  else ""), flush=True)

    def _better(self, a: float, b: float) -> bool:
        """On ties the later evaluation wins, as in Ray Train's checkpoint retention (num_to_keep=1)."""
        return a >= b if self.mode == "max" else a <= b

    def _write_trials(self) -> None:
        write_rows(list(self.trials.values()), self.exp_dir / TRIALS)


def mark_interrupted(exp_dir: Path, tracker: TrialRuns | None = None) -> None:
    """Mark the trials that a stopped search left running `interrupted` in trials.parquet and end their MLflow runs
    as KILLED; a resumed search sets them running again as Ray Tune restarts them. The search calls this, not a
    Ray Tune callback: a second Ctrl-C stops Ray Tune before its callbacks run."""
    try:
        rows = read_rows(exp_dir / TRIALS)
        left = [row for row in rows if row["status"] == "running"]
        for row in left:
            row["status"] = "interrupted"
        if left:
            write_rows(rows, exp_dir / TRIALS)
    except (OSError, pa.ArrowException) as e:  # the search stops with its own error, not this one
        log.warning("%s: its trials stay marked running: %s", exp_dir / TRIALS, e)
        return
    if tracker is None:
        return
    try:
        for row in left:
            tracker.ended(row["trial_id"], "interrupted", trial_params(row))
    except Exception as e:  # noqa: BLE001 - MLflow raises its own and its stores' errors
        log.warning("MLflow (--mlflow) failed (%s: %s); the runs of the stopped trials stay RUNNING there",
                    type(e).__name__, e)


def trial_run_name(trial_id: str) -> str:
    """The name of a trial's Ray Train run in the trials' storage: deterministic, so that a resumed experiment
    resumes it."""
    return f"trial_{trial_id}"


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*): ")  # "rayad.errors.DataError: ..."
ERROR_CHARS = 500  # of a trial's error in its row (Tune's error file keeps the whole traceback)


def _error_message(trial) -> str:
    """The exception that ended the trial, from the last one in its traceback on, in one line: its class and
    every line of its message (a rayad error names the file and what to do on its last line)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    if not lines:
        return "the trial failed (see the Tune log)"
    message = lines[starts[-1]:] if starts else lines[-1:]
    text = " ".join(line.strip() for line in message)
    text = EXCEPTION_LINE.sub(r"\1: ", text, count=1)  # the class without its module
    return text if len(text) <= ERROR_CHARS else f"{text[:ERROR_CHARS - 1]}…"


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if path.is_file() else []


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
