"""Experiment tracking in MLflow: `rayad tune --mlflow URI` and `rayad train --mlflow URI`.

URI is any MLflow tracking URI: a local `sqlite:///mlflow.db` store, or a tracking server. MLflow is the
optional extra `rayad[mlflow]`. A search logs one MLflow run per trial, as its results store records it
(`TrialRuns`: the trial's parameters, every evaluation's metrics at its number, its end), then one run `best`
with the best model's parameters, test metrics and artifact. A training logs one run: the config, the loss curve
and the artifact. rayad's own results store stays the source of truth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sqlite3
import unittest.mock
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayad.errors import RayadError
from rayad.layout import BEST, METADATA, TRAIN_LOG, WEIGHTS, trial_params


def require_mlflow():
    """The mlflow module, or a one-line error naming the extra. MLflow's own log (its stores' tracebacks, which
    rayad's one-line errors say) is shown only with -v."""
    try:
        import mlflow
    except ImportError:
        raise RayadError("mlflow (--mlflow) needs MLflow: pip install 'rayad[mlflow]'") from None
    if not logging.getLogger("rayad").isEnabledFor(logging.DEBUG):
        logging.getLogger("mlflow").setLevel(logging.CRITICAL)
    return mlflow


def experiment_name(folder: str | Path) -> str:
    """The MLflow experiment that a run or search logs to: the name of its folder (`--out .` included)."""
    return Path(folder).resolve().name


def check_tracking_uri(uri: str, experiment: str | None = None) -> None:
    """Fail before any training when MLflow cannot use `uri` (an unknown scheme, a database or folder it cannot
    open, a server that does not answer) or `experiment` is deleted there: it would only fail once the work
    is done."""
    mlflow = require_mlflow()
    try:
        _check_server_answers(uri)  # MLflow retries a server that is down for minutes
        _check_sqlite_opens(uri)  # and a database it cannot open for 100 s
        # MLflow reads its HTTP settings at each request: without retries a server answering 503 fails in 2 s, not 4 min
        no_retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        with unittest.mock.patch.dict(os.environ, no_retries):
            found = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment or "Default")
    except Exception as e:  # noqa: BLE001 - MLflow raises its own and its stores' errors
        raise RayadError(f"mlflow {uri!r} (--mlflow): MLflow cannot use it ({_problem(e)})") from None
    if experiment and found is not None and found.lifecycle_stage == "deleted":
        raise RayadError(f"mlflow {uri!r} (--mlflow): its experiment {experiment!r} (named after --out) is deleted; "
                         "restore it (mlflow experiments restore) or give --out another name")


def _problem(e: Exception) -> str:
    """An MLflow error in one line: its type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _check_sqlite_opens(uri: str) -> None:
    """A sqlite store's database must open (or be created) and be one."""
    scheme, _, rest = uri.partition("://")
    path = rest.split("?")[0].removeprefix("/")  # sqlite:///relative.db, sqlite:////absolute.db
    if scheme.split("+")[0] != "sqlite" or path in ("", ":memory:"):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA schema_version")
        db.execute("BEGIN IMMEDIATE")  # and be writable: a read-only one failed once the work was done
        db.execute("CREATE TABLE _rayad_probe (x)")
        db.execute("ROLLBACK")


def _check_server_answers(uri: str) -> None:
    """An http(s) tracking URI's host must accept a connection within seconds."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=10).close()
        except OSError as e:
            raise ConnectionError(f"nothing answers at {parts.hostname}:{port}: {e.strerror or e}") from None


class TrialRuns:
    """The MLflow runs of a search's trials, one each, told by the results store what it records. A resumed trial
    goes on in its run (found by its `trial_id` tag); a trial that a stopped search left running is KILLED until
    it resumes. Ray Tune keeps the store, and so this, in its state: only the URI and the name are pickled."""

    END_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "error": "FAILED", "interrupted": "KILLED"}

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self._client, self._experiment_id, self._runs = None, None, {}

    def __getstate__(self) -> dict[str, str]:
        return {"uri": self.uri, "experiment": self.experiment}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(**state)

    def started(self, trial_id: str, params: dict[str, Any]) -> None:
        run_id = self._run(trial_id, params)
        if self._client.get_run(run_id).info.status != "RUNNING":  # resumed: its run was KILLED
            self._client.update_run(run_id, status="RUNNING")

    def evaluated(self, trial_id: str, record: dict[str, Any]) -> None:
        """One row of history.parquet: its metrics at the evaluation's number."""
        from mlflow.entities import Metric

        at = int(record["timestamp"] * 1000)
        self._client.log_batch(self._run(trial_id, {}), metrics=[
            Metric(key, value, at, record["iteration"])
            for key, value in _numbers(record, skip=("iteration", "timestamp")).items()])

    def ended(self, trial_id: str, status: str, params: dict[str, Any]) -> None:
        """`status`: the trial's in the store (`interrupted` for a trial whose search stopped)."""
        run_id = self._run(trial_id, params)  # made here for a trial that failed before it started
        self._client.set_tag(run_id, "status", status)
        self._client.set_terminated(run_id, self.END_STATUS[status])

    def _run(self, trial_id: str, params: dict[str, Any]) -> str:
        """The trial's run: the one it had before (a resumed trial), or a new one with its parameters."""
        if trial_id not in self._runs:
            from mlflow.entities import Param

            client = self._connect()
            found = client.search_runs([self._experiment_id], f"tags.rayad = 'trial' and tags.trial_id = "
                                                              f"'{trial_id}'", max_results=1)
            if found:
                self._runs[trial_id] = found[0].info.run_id
            else:
                run_id = client.create_run(self._experiment_id, run_name=f"trial_{trial_id}",
                                           tags={"rayad": "trial", "trial_id": trial_id}).info.run_id
                client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
                self._runs[trial_id] = run_id
        return self._runs[trial_id]

    def _connect(self):
        if self._client is None:
            _check_server_answers(self.uri)  # a server that went down since the search began: not minutes of retries
            client = require_mlflow().MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            self._client = client
        return self._client


def log_best(uri: str, experiment: str, exp_dir: Path, record: dict[str, Any]) -> str:
    """A run `best`: the best trial's parameters, its validation score, the test metrics and the artifact. A
    failure here, after the search, is one RayadError that says the search is finished."""
    return _after_the_work(uri, f"the search is finished and its best model is in {exp_dir / BEST}",
                           lambda: _log_best(uri, experiment, exp_dir, record))


def _log_best(uri: str, experiment: str, exp_dir: Path, record: dict[str, Any]) -> str:
    mlflow = _client_for(uri, experiment)
    best = record["best"]
    with mlflow.start_run(run_name=BEST, tags={"rayad": "best", "trial_id": best["trial_id"]}) as run:
        mlflow.log_params(trial_params(best["params"]))
        mlflow.log_metrics({**best["validation"], **_numbers(best["test"], prefix="test_")})
        mlflow.log_artifacts(str(exp_dir / BEST), artifact_path="model")
    return run.info.run_id


def log_training(uri: str, experiment: str, run_dir: Path) -> str:
    """One run for `rayad train`: the config as model.json holds it (scoring.tta's `auto` settled), the precisions
    chosen, the loss at every logged step (RUN_DIR/train_log.jsonl), the artifact. A failure here, after the
    training, is one RayadError that says the model is written."""
    metadata = json.loads((run_dir / METADATA).read_text())
    return _after_the_work(uri, f"the model is written to {run_dir}",
                           lambda: _log_training(uri, experiment, run_dir, metadata))


def _after_the_work(uri: str, done: str, log: Callable[[], str]) -> str:
    """`log()`'s run id; its failure, once the work is `done`, in one RayadError that says so."""
    try:
        return log()
    except Exception as e:  # noqa: BLE001 - MLflow raises its own, its stores' and the file system's errors
        raise RayadError(f"mlflow {uri!r} (--mlflow): {done}, but logging it to MLflow failed ({_problem(e)})"
                         ) from None


def _log_training(uri: str, experiment: str, run_dir: Path, metadata: dict[str, Any]) -> str:
    mlflow = _client_for(uri, experiment)
    with mlflow.start_run(run_name=experiment_name(run_dir), tags={"rayad": "train"}) as run:
        mlflow.log_params({f"{section}.{key}": value for section, values in metadata["config"].items()
                           for key, value in values.items()})
        mlflow.log_params({f"precision.{use}": choice["precision"]
                           for use, choice in (metadata.get("precision") or {}).items()})
        log_file = run_dir / TRAIN_LOG
        if log_file.is_file():
            for line in log_file.read_text().splitlines():
                entry = json.loads(line)
                logged_at = entry.get("logged_at")  # in logs from before rayad recorded it: the upload's time
                mlflow.log_metrics(_numbers(entry, skip=("step", "logged_at")), step=int(entry.get("step", 0)),
                                   timestamp=int(logged_at * 1000) if logged_at else None)
        mlflow.log_metrics({k: metadata[k] for k in ("threshold", "pixel_threshold")})
        for name in (METADATA, WEIGHTS):
            mlflow.log_artifact(str(run_dir / name), artifact_path="model")
    return run.info.run_id


def _client_for(uri: str, experiment: str):
    _check_server_answers(uri)  # one that went down since the start: not minutes of retries
    mlflow = require_mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return mlflow


def _numbers(values: dict[str, Any], prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite numbers of `values` (MLflow metrics are numbers), keys prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip and math.isfinite(v)}
