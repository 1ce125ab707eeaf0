"""Experiment tracking in MLflow: `rayad tune --mlflow URI` and `rayad train --mlflow URI`.

URI is any MLflow tracking URI: a local `sqlite:///mlflow.db` store, or a tracking server. MLflow is the
optional extra `rayad[mlflow]`. A search logs one MLflow run per trial, through Ray Tune's own
`MLflowLoggerCallback` (the trial's parameters, and every evaluation's metrics at its step), then one
run `best` with the best model's parameters, test metrics and artifact. A training logs one run: the
config, the loss curve and the artifact. rayad's own results store stays the source of truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rayad.errors import RayadError
from rayad.layout import BEST, METADATA, TRAIN_LOG, WEIGHTS


def require_mlflow():
    """The mlflow module, or a one-line error naming the extra."""
    try:
        import mlflow
    except ImportError:
        raise RayadError("mlflow (--mlflow) needs MLflow: pip install 'rayad[mlflow]'") from None
    return mlflow


def check_tracking_uri(uri: str) -> None:
    """Fail before any training when MLflow cannot use `uri` (an unknown scheme, a folder it cannot create, a
    server that does not answer): it would only fail once the work is done."""
    mlflow = require_mlflow()
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own and its stores' errors
        raise RayadError(f"mlflow {uri!r} (--mlflow): MLflow cannot use it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def tune_callback(uri: str, experiment: str):
    """The Tune callback that logs each trial as an MLflow run in `experiment`."""
    require_mlflow()
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, tags={"rayad": "trial"})


def log_best(uri: str, experiment: str, exp_dir: Path, record: dict[str, Any]) -> str:
    """A run `best`: the best trial's parameters, its validation score, the test metrics and the artifact."""
    mlflow = _client_for(uri, experiment)
    best = record["best"]
    with mlflow.start_run(run_name=BEST, tags={"rayad": "best", "trial_id": best["trial_id"]}) as run:
        mlflow.log_params({k.removeprefix("config/"): v for k, v in best["params"].items()})
        mlflow.log_metrics({**best["validation"], **_numbers(best["test"], prefix="test_")})
        mlflow.log_artifacts(str(exp_dir / BEST), artifact_path="model")
    return run.info.run_id


def log_training(uri: str, experiment: str, run_dir: Path, config: dict[str, Any]) -> str:
    """One run for `rayad train`: the config, the loss at every logged step (RUN_DIR/train_log.jsonl), the
    artifact."""
    mlflow = _client_for(uri, experiment)
    with mlflow.start_run(run_name=run_dir.name, tags={"rayad": "train"}) as run:
        mlflow.log_params({f"{section}.{key}": value for section, values in config.items()
                           for key, value in values.items()})
        log_file = run_dir / TRAIN_LOG
        if log_file.is_file():
            for line in log_file.read_text().splitlines():
                entry = json.loads(line)
                mlflow.log_metrics(_numbers(entry, skip=("step",)), step=int(entry.get("step", 0)))
        metadata = json.loads((run_dir / METADATA).read_text())
        mlflow.log_metrics({k: metadata[k] for k in ("threshold", "pixel_threshold")})
        for name in (METADATA, WEIGHTS):
            mlflow.log_artifact(str(run_dir / name), artifact_path="model")
    return run.info.run_id


def _client_for(uri: str, experiment: str):
    mlflow = require_mlflow()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return mlflow


def _numbers(values: dict[str, Any], prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite numbers of `values` (MLflow metrics are numbers), keys prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip and math.isfinite(v)}
