"""Read-only views of the results store (layout: rayad.layout; writer: rayad.tune.store), for the dashboard.

Every reader raises StoreError naming the file when it is missing or unreadable, so that a caller can show
the problem on that experiment and go on with the others. Nothing here writes.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow.parquet as pq
import sqlalchemy.exc

from rayad.errors import RayadError
from rayad.layout import (
    BEST,
    EXPERIMENT,
    METADATA,
    METRIC_NAMES,
    PARAM_PREFIX,
    STUDY,
    TEST_METRICS,
    TRIAL_STATUSES,
    TRIALS,
    WEIGHTS,
)
from rayad.metrics import precision_recall_curve, roc_curve


class StoreError(RayadError):
    """A file of an experiment is missing, partial or corrupt."""


def file_version(path: Path) -> float:
    """The modification time, or 0 for a missing file: the cache key that makes readers see new results."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path.name} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path.name} is not a JSON object")
    return data


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet file of the store as a DataFrame; missing means no rows yet (a search that just started)."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pq.read_table(path).to_pandas()
    except Exception as e:  # pyarrow raises several types for truncated or foreign files
        raise StoreError(f"{path.name} is unreadable ({e})") from None


def read_experiment(exp_dir: Path) -> dict[str, Any]:
    """experiment.json, with the parts the pages read checked for their shape."""
    experiment = read_json(exp_dir / EXPERIMENT)
    missing = [k for k in ("category", "objective", "settings", "space") if k not in experiment]
    if missing:
        raise StoreError(f"{EXPERIMENT} lacks {', '.join(missing)}")
    goal, space = experiment["objective"], experiment["space"]
    params = space.get("params") if isinstance(space, dict) else None
    checks = {
        "objective.metrics and objective.modes (lists of one name or more)":
            isinstance(goal, dict) and all(isinstance(goal.get(k), list) and goal[k] for k in ("metrics", "modes")),
        "space.params (a mapping of parameters with their kind)":
            isinstance(params, dict) and all(isinstance(p, dict) and "kind" in p for p in params.values()),
        "started_at (seconds since 1970, before 2100)": _is_time(experiment.get("started_at")),
        "settings (a mapping)": isinstance(experiment["settings"], dict),
        "best (null, or a mapping whose test is null or a mapping)": _is_best(experiment.get("best")),
        "status (text)": isinstance(experiment.get("status"), str | None),
        "category (text)": isinstance(experiment["category"], str),
        "objective's metric names (text) and modes (max or min)": isinstance(goal, dict) and all(
            isinstance(m, str) for m in goal.get("metrics") or []) and set(goal.get("modes") or []) <= {"max", "min"},
    }
    wrong = [what for what, ok in checks.items() if not ok]
    if wrong:
        raise StoreError(f"{EXPERIMENT}: unexpected {'; '.join(wrong)}")
    return experiment


def _is_best(best: Any) -> bool:
    return best is None or isinstance(best, dict) and isinstance(best.get("test"), dict | None)


YEAR_2100 = 4_102_444_800  # seconds since 1970: a later start time is a damaged file, not a date


def _is_time(value: Any) -> bool:
    """None (not recorded) or a plausible time in seconds since 1970 (NaN and infinity are not)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < YEAR_2100)


def objective(experiment: dict[str, Any]) -> tuple[str, str]:
    """(metric, mode) of the search's first objective."""
    return experiment["objective"]["metrics"][0], experiment["objective"]["modes"][0]


def overview(exp_dir: Path) -> dict[str, Any]:
    """One row of the experiments table. Never raises: a broken file shows up in the `problem` column."""
    row: dict[str, Any] = {"experiment": exp_dir.name, "path": str(exp_dir), "problem": None}
    try:
        experiment = read_experiment(exp_dir)
        trials = read_table(exp_dir / TRIALS)
    except StoreError as e:
        return {**row, "problem": str(e)}
    metric, mode = objective(experiment)
    counts = trials["status"].value_counts() if "status" in trials else pd.Series(dtype=int)
    best = experiment.get("best") or {}
    row.update(category=experiment["category"], dataset=experiment.get("data_root"), status=experiment.get("status"),
               started=pd.to_datetime(experiment.get("started_at"), unit="s"), objective=metric,
               **{f"trials {s.replace('_', ' ')}": int(counts.get(s, 0)) for s in TRIAL_STATUSES},
               best_validation=best_value(trials, mode),
               **{f"test {m}": (best.get("test") or {}).get(m) for m in METRIC_NAMES})
    return row


def best_value(trials: pd.DataFrame, mode: str) -> float | None:
    if "best_value" not in trials or trials["best_value"].isna().all():
        return None
    return float(trials["best_value"].max() if mode == "max" else trials["best_value"].min())


TRIAL_COLUMNS = ("trial_id", "status", "started_at", "best_value")  # what the pages read of every trial


def trial_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials as shown: in order of start, numbered, params without their prefix."""
    if trials.empty:
        return trials
    missing = [c for c in TRIAL_COLUMNS if c not in trials]
    if missing:
        raise StoreError(f"{TRIALS} lacks the column(s) {', '.join(missing)}: not a rayad results store")
    table = trials.sort_values("started_at").reset_index(drop=True)
    table.insert(0, "number", range(len(table)))
    return table.rename(columns=lambda c: c.removeprefix(PARAM_PREFIX))


def searched_params(experiment: dict[str, Any]) -> list[str]:
    """The parameters the search samples (the space's non-fixed entries), in the space's order."""
    return [key for key, spec in experiment["space"]["params"].items() if spec["kind"] != "fixed"]


def optimisation_history(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Per trial in start order: its best validation value and the best so far."""
    values = table[["number", "trial_id", "status", "best_value"]].dropna(subset=["best_value"])
    running = values["best_value"].cummax() if mode == "max" else values["best_value"].cummin()
    return values.assign(best_so_far=running)


def param_importances(exp_dir: Path, study_name: str) -> dict[str, float]:
    """Optuna's default evaluator (PED-ANOVA) on the stored study, for the first objective. The SQLite file
    is opened read-only."""
    path = exp_dir / STUDY
    if not path.is_file():
        raise StoreError(f"{STUDY} is missing")
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///file:{path.absolute()}?mode=ro&uri=true",
                                             skip_compatibility_check=True, skip_table_creation=True)
    except _DATABASE_ERRORS as e:  # not SQLite, truncated, or no Optuna tables
        raise StoreError(f"{STUDY} is unreadable ({_root_cause(e)})") from None
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(done) < 2:
            return {}
        with warnings.catch_warnings():  # Optuna warns that a target means "lower is better": that is meant here
            warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low")
            return optuna.importance.get_param_importances(study, target=_first_objective_lower_is_better(study))
    except _DATABASE_ERRORS as e:
        raise StoreError(f"{STUDY} is unreadable ({_root_cause(e)})") from None
    except (KeyError, ValueError, RuntimeError) as e:
        raise StoreError(f"{STUDY}: {e}") from None
    finally:
        storage.remove_session()
        storage.engine.dispose()


# Optuna wraps SQLAlchemy's errors (StorageInternalError); SQLAlchemy wraps sqlite3's.
_DATABASE_ERRORS = (optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: sqlite3's "file is not a database", not Optuna's wrapper."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _first_objective_lower_is_better(study: optuna.Study):
    """PED-ANOVA ranks params by how they reach *low* target values; with several objectives, a target is
    needed and must be negated when the first is maximised (one objective: None, the study's direction)."""
    if len(study.directions) == 1:
        return None
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return lambda trial: sign * trial.values[0]


@dataclass
class TestResults:
    """The best model's scores on the test split, per image, as written beside it by the search."""

    metrics: dict[str, Any]
    images: pd.DataFrame  # path, label, defect_type, mask_path, score
    threshold: float  # on image scores
    pixel_threshold: float  # on the anomaly map (heatmaps' midpoint, masks)


def load_model(exp_dir: Path, device: str = "cpu"):
    """The experiment's best model as a `rayad.artifact.Predictor`; StoreError naming the file when it is
    missing, corrupt or does not match its metadata."""
    from rayad.artifact import Predictor  # torch: only for the pages that score

    run = exp_dir / BEST
    for file in (WEIGHTS, METADATA):
        if not (run / file).is_file():
            raise StoreError(f"{BEST}/{file} is missing")
    try:
        return Predictor.load(run, device=device)
    except RayadError as e:  # the loader names the file and what is wrong with it
        raise StoreError(str(e).replace(f"{run}{os.sep}", f"{BEST}/")) from None


def read_test_results(exp_dir: Path) -> TestResults:
    metrics = read_json(exp_dir / BEST / TEST_METRICS)
    required = ("scores", "labels", "paths", "threshold")
    if any(k not in metrics for k in required):
        raise StoreError(f"{BEST}/{TEST_METRICS} lacks per-image scores (needs {', '.join(required)})")
    n = len(metrics["scores"]) if isinstance(metrics["scores"], list) else 0
    per_image = [metrics.get(k) for k in ("paths", "labels", "defect_types", "mask_paths")]
    if n == 0 or not all(v is None or (isinstance(v, list) and len(v) == n) for v in [metrics["scores"], *per_image]):
        raise StoreError(f"{BEST}/{TEST_METRICS}: the per-image lists (scores, labels, paths, ...) are empty or "
                         "of different lengths")
    try:
        scores, labels = np.asarray(metrics["scores"], float), np.asarray(metrics["labels"], int)
        # Results written before the pixel threshold existed came from max-score models: the two were one.
        thresholds = float(metrics["threshold"]), float(metrics.get("pixel_threshold", metrics["threshold"]))
    except (TypeError, ValueError):
        raise StoreError(f"{BEST}/{TEST_METRICS}: scores, labels and thresholds must be numbers") from None
    if not np.isfinite(scores).all():
        raise StoreError(f"{BEST}/{TEST_METRICS}: {(~np.isfinite(scores)).sum()} of {n} scores are NaN or infinite")
    if not np.isfinite(thresholds).all():
        raise StoreError(f"{BEST}/{TEST_METRICS}: a threshold is NaN or infinite")
    wrong = [what for what, ok in _summary_checks(metrics).items() if not ok]
    if wrong:
        raise StoreError(f"{BEST}/{TEST_METRICS}: unexpected {'; '.join(wrong)}")
    images = pd.DataFrame({
        "path": metrics["paths"], "label": labels,
        "defect_type": metrics.get("defect_types") or ["good" if y == 0 else "defect" for y in labels],
        "mask_path": metrics.get("mask_paths") or [None] * n, "score": scores})
    return TestResults(metrics, images, *thresholds)


def _summary_checks(metrics: dict[str, Any]) -> dict[str, bool]:
    """The shape of what the Model page shows of test_metrics.json besides the per-image lists."""
    def number(value: Any) -> bool:
        return value is None or isinstance(value, int | float) and not isinstance(value, bool)

    per_defect, curves = metrics.get("per_defect", {}), metrics.get("pixel_curves")
    return {
        f"{', '.join(METRIC_NAMES)} (numbers or null)": all(number(metrics.get(m)) for m in METRIC_NAMES),
        "per_defect (a mapping of each defect type's metrics)": isinstance(per_defect, dict) and all(
            isinstance(m, dict) and all(number(m.get(k)) for k in METRIC_NAMES) for m in per_defect.values()),
        "pixel_curves (null, or roc and pr as mappings of lists)": curves is None or isinstance(curves, dict) and all(
            isinstance(curves.get(k), dict) and all(isinstance(v, list) for v in curves[k].values())
            for k in ("roc", "pr")),
    }


def interval(value: Any) -> tuple[float, float] | None:
    """A stored confidence interval as (low, high); None when missing (n_boot 0) or not two finite numbers."""
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)):
        return None
    low, high = map(float, value)
    return (low, high) if np.isfinite([low, high]).all() else None


def threshold_stats(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Confusion counts, precision, recall and F1 when images scoring >= threshold are called defective."""
    predicted, actual = np.asarray(scores) >= threshold, np.asarray(labels).astype(bool)
    tp, fp = int(np.sum(predicted & actual)), int(np.sum(predicted & ~actual))
    fn, tn = int(np.sum(~predicted & actual)), int(np.sum(~predicted & ~actual))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1}


def image_curves(images: pd.DataFrame) -> dict[str, pd.DataFrame] | None:
    """Image-level ROC and PR curves, or None unless the test split has good and defective images."""
    labels = images["label"].to_numpy()
    if not 0 < labels.sum() < len(labels):
        return None
    fpr, tpr, _ = roc_curve(images["score"].to_numpy(), labels)
    precision, recall, _ = precision_recall_curve(images["score"].to_numpy(), labels)
    return {"roc": pd.DataFrame({"fpr": fpr, "tpr": tpr}),
            "pr": pd.DataFrame({"recall": recall, "precision": precision})}


def outcome(images: pd.DataFrame, threshold: float) -> pd.Series:
    """Per image: 'true positive', 'false positive', 'false negative' or 'true negative'."""
    predicted, actual = images["score"] >= threshold, images["label"] == 1
    names = np.select([predicted & actual, predicted & ~actual, ~predicted & actual],
                      ["true positive", "false positive", "false negative"], "true negative")
    return pd.Series(names, index=images.index)
