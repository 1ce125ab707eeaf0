"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, each trial a Ray Train `TorchTrainer`.

Trials are scored on the validation set of `rayad.validation` (never the test split); only the best
trial's model is evaluated on test, once, after the search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
import ray
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from rayad import __version__
from rayad.artifact import Predictor, build_anomaly_model, calibrate_and_save
from rayad.cluster import Cluster, autoscaled, check_resources, check_shared_paths, connect, fitting_groups
from rayad.config import Config, load_config
from rayad.data.manifest import build_manifest, load_manifest, same_images, save_manifest
from rayad.errors import ConfigError, Interrupted, RayadError, sigint_restored
from rayad.evaluate import evaluate, format_metric
from rayad.layout import (
    BEST,
    CHECKPOINTS,
    EVALUATION,
    EXPERIMENT,
    EXPORTED,
    MANIFEST,
    METADATA,
    METRIC_NAMES,
    PARAM_PREFIX,
    PIXEL_METRICS,
    STUDY,
    TEST_METRICS,
    TRIAL_ENDED,
    TRIAL_STATUSES,
    TRIALS,
    TRIALS_DIR,
    TUNE_DIR,
    VAL_METRICS,
    WORKERS_RUN,
    evaluations,
    ray_storage,
    refuse_other_kinds,
    storage_path,
    trial_params,
    write_json,
    writing,
)
from rayad.precision import driver_device
from rayad.settings import SearchSettings
from rayad.tracking import TrialRuns, check_tracking_uri, experiment_name, log_best
from rayad.train.checkpoint import load_checkpoint
from rayad.train.loop import LoopConfig, load_train_data
from rayad.train.ray_train import build_trainer, check_buildable_on, worker_error
from rayad.tune.space import SearchSpace, load_space
from rayad.tune.store import ResultsStore, mark_interrupted, read_rows, trial_run_name
from rayad.validation import load_validation

log = logging.getLogger(__name__)

DEFAULT_METRIC = "val_image_auroc"
REPORT_EVERY = "train.log_every"  # a search's trials report at every checkpoint, with the validation metrics
optuna.logging.set_verbosity(optuna.logging.WARNING)  # rayad prints one line per trial instead


@dataclass(frozen=True)
class Plan:
    """The resolved experiment: base config, space, objective and resources."""

    settings: SearchSettings
    base: Config
    space: SearchSpace
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    cluster: Cluster
    max_iterations: int


def plan_search(settings: SearchSettings, experiment: str | None = None) -> Plan:
    """Check the space, objective and settings (and the MLflow `experiment`); fails before any trial starts,
    naming what is wrong."""
    s = settings
    if s.mlflow:
        check_tracking_uri(s.mlflow, experiment)
    space = load_space(s.space, load_config(s.config_file))
    searched = sorted(set(s.overrides) & {p.key for p in space.searched})
    if searched:
        raise ConfigError(f"{searched}: searched by {s.space}; drop them from --set (or its shortcut flag) or from "
                          "the space")
    for named, where in ((set(s.overrides), "--set"), ({p.key for p in space.params}, s.space)):
        if REPORT_EVERY in named:
            raise ConfigError(f"{REPORT_EVERY} in {where}: a search reports at every checkpoint, so it follows "
                              "train.checkpoint_every; set that instead")
    # --config and --set win over the space's fixed values; every trial then sees the values they chose.
    base = load_config(s.config_file, s.overrides, defaults=space.fixed)
    space = space.fixed_from(base)
    space.check_on(base)
    if s.config_file:
        space.check_first_trial(base, load_config(None, s.overrides, defaults=space.fixed), s.config_file)
    base = base.replace({REPORT_EVERY: base.train.checkpoint_every})  # every report carries the metrics
    metrics = s.metric or (space.metric or DEFAULT_METRIC,)
    for m in metrics:
        if m not in VAL_METRICS:
            raise ConfigError(f"metric {m!r}: choose from {list(VAL_METRICS)} (validation metrics only)")
    own_mode = space.mode if metrics == (space.metric,) else None  # the space's direction is its metric's
    modes = s.mode or tuple(own_mode or "max" for _ in metrics)
    if len(modes) != len(metrics) or set(modes) - {"max", "min"}:
        raise ConfigError(f"mode {list(modes)}: give max or min for each of {list(metrics)}")
    cluster = Cluster(workers=s.workers_per_trial, use_gpu=s.gpus_per_worker > 0, cpus_per_worker=s.cpus_per_worker,
                      gpus_per_worker=s.gpus_per_worker or 1.0, max_failures=s.max_failures)
    max_iterations = evaluations(base.train.steps, base.train.checkpoint_every)
    return Plan(s, base, space, tuple(metrics), tuple(modes), cluster, max_iterations)


def run_search(settings: SearchSettings, exp_dir: str | Path, address: str | None = None, resume: bool = False,
               verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) an experiment, export the best model to EXP_DIR/best and evaluate it on test."""
    if not isinstance(settings, SearchSettings):
        raise TypeError(f"settings: a rayad.tune.SearchSettings, not a {type(settings).__name__}")
    exp_dir = Path(exp_dir).absolute()
    plan = plan_search(settings, experiment_name(exp_dir))
    # one search, or resume, at a time: a second would mix its trials into the store
    with private_writes(), writing(exp_dir):
        return _search(plan, exp_dir, address, resume, verbose)


_PRIVATE_WRITES = {"searches": 0, "umask": 0}  # searches running in this process, and the umask before the first
_PRIVATE_LOCK = threading.Lock()


@contextlib.contextmanager
def private_writes() -> Iterator[None]:
    """While a search runs, what this process and a local Ray it starts write is not writable by the group or
    others, as `check_trusted` requires of the state --resume reads (a umask of 002 made every search
    unresumable). The process's umask comes back when its last search ends; a local Ray keeps its own."""
    with _PRIVATE_LOCK:
        if _PRIVATE_WRITES["searches"] == 0:
            _PRIVATE_WRITES["umask"] = os.umask(0o022)
            os.umask(_PRIVATE_WRITES["umask"] | 0o022)
        _PRIVATE_WRITES["searches"] += 1
    try:
        yield
    finally:
        with _PRIVATE_LOCK:
            _PRIVATE_WRITES["searches"] -= 1
            if _PRIVATE_WRITES["searches"] == 0:
                os.umask(_PRIVATE_WRITES["umask"])


def _search(plan: Plan, exp_dir: Path, address: str | None, resume: bool, verbose: int) -> dict[str, Any]:
    s = plan.settings
    if resume:
        previous = read_experiment_file(exp_dir)
        _check_resumable(plan, exp_dir, previous)  # before anything is written
    elif (exp_dir / EXPERIMENT).exists():
        raise RayadError(f"{exp_dir}: already holds an experiment; resume it (--resume, or resume=True), or give "
                         "a new folder")
    else:
        refuse_other_kinds(exp_dir, (METADATA, CHECKPOINTS, WORKERS_RUN, EXPORTED), "give the search a new folder")
    check_buildable_on(plan.cluster, plan.base)
    for config, where in plan.space.choice_configs(plan.base):
        try:
            check_buildable_on(plan.cluster, config)
        except RayadError as e:
            raise ConfigError(f"{where}: {e}") from None
    _check_data(plan)
    manifest = build_manifest(s.data_root, s.category, plan.base.data)
    if resume and (exp_dir / MANIFEST).is_file() and not same_images(load_manifest(exp_dir / MANIFEST), manifest,
                                                                     s.data_root):
        raise RayadError(f"{exp_dir / MANIFEST}: the search began on other images than {s.data_root} holds now (its "
                         f"trials trained on those); put them back, or start a new --out")
    connect(address)
    check_resources(plan.cluster)
    check_shared_paths(s.storage or str(exp_dir), s.data_root, s.category)
    # written once every check passed: a search refused before it began leaves no folder behind
    save_manifest(manifest, exp_dir / MANIFEST)
    fits = fitting_groups(plan.cluster)
    concurrent = s.concurrent or fits
    if not s.concurrent and autoscaled():
        log.warning("%d trial(s) at a time, as many as the cluster's nodes hold now; its autoscaler may add nodes "
                    "for more: ask with --concurrent N", fits)
    if resume:
        experiment = previous | {"status": "running", "stopped_at": None, "error": None,
                                 "resumed_at": [*previous.get("resumed_at", []), time.time()]}
    else:
        experiment = experiment_record(plan, concurrent, exp_dir)
    resume_with = f"rayad tune --out {exp_dir} --resume"
    try:
        tuner = _tuner(plan, exp_dir, concurrent, resume, verbose)  # a new Tuner saves Ray Tune's state
        write_json(exp_dir / EXPERIMENT, experiment)  # only then: an experiment's record always has state to resume
        _print_start(plan, concurrent, fits)
        with sigint_restored():
            tuner.fit()  # Ray Tune returns normally from Ctrl-C, having saved its state
        rows = read_rows(exp_dir / TRIALS)
        ended = sum(r["status"] in TRIAL_ENDED for r in rows)
        if ended < s.trials:
            raise Interrupted(f"{ended} of {s.trials} trials ended", resume_with)
        return _finish(plan, exp_dir, experiment, rows)
    except BaseException as e:  # the record says the search no longer runs (the dashboard stops refreshing it)
        if not (exp_dir / EXPERIMENT).is_file():  # stopped before it began: nothing to resume
            raise
        stopped = isinstance(e, KeyboardInterrupt)  # Ctrl-C, and Interrupted
        if experiment["status"] == "running":  # not once finished (an MLflow upload after it may fail)
            write_json(exp_dir / EXPERIMENT, experiment | {"status": "interrupted" if stopped else "failed",
                                                           "stopped_at": time.time(), "error": None if stopped else
                                                           f"{type(e).__name__}: {e}"})
            mark_interrupted(exp_dir, TrialRuns(s.mlflow, experiment_name(exp_dir)) if s.mlflow else None)
        if stopped and not isinstance(e, Interrupted):  # a second Ctrl-C, or one while Ray Tune starts or exports
            raise Interrupted("stopped", resume_with) from None
        raise


def _print_start(plan: Plan, concurrent: int, fits: int) -> None:
    s = plan.settings
    at_once = f"{concurrent}" if concurrent <= fits else f"{fits} (--concurrent {concurrent}; the cluster holds {fits})"
    print(f"[rayad] search {s.category}: {s.trials} trials, {at_once} at a time, each {plan.cluster.describe()}; "
          f"objective {'/'.join(plan.metrics)} on the validation set; scheduler {s.scheduler}; "
          f"cluster {ray.cluster_resources().get('CPU', 0):g} CPU, {ray.cluster_resources().get('GPU', 0):g} GPU",
          flush=True)


def _check_data(plan: Plan) -> None:
    """Validate the data (and fill the image cache once) and check the objective can be computed."""
    s = plan.settings
    load_train_data(plan.base, s.data_root, s.category)
    vset = load_validation(plan.base, s.data_root, s.category, s.val_root)
    missing = [m for m in plan.metrics if m in PIXEL_METRICS and not vset.has_masks]
    if missing:
        raise ConfigError(f"metric {missing}: the validation set has no masks; use an image-level metric")


def _tuner(plan: Plan, exp_dir: Path, concurrent: int, resume: bool, verbose: int) -> tune.Tuner:
    s = plan.settings
    storage = _storage(plan, exp_dir)
    trials_storage = storage_path(storage, TRIALS_DIR)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, storage=trials_storage),
        # The trial's driver only waits for its TorchTrainer: it takes no CPU (a CPU each would deadlock a
        # small machine). Ray refuses an all-zero request, so it asks for one byte of memory.
        {"cpu": 0, "memory": 1},
    )
    if resume:
        log.info("resuming: Ray Tune unpickles its state from %s (only state this user wrote is accepted)",
                 _tune_path(plan, exp_dir))
        return tune.Tuner.restore(_tune_path(plan, exp_dir), trainable, resume_unfinished=True, resume_errored=False)
    default_point = plan.space.default_point(plan.base)
    searcher = HonestOptunaSearch(
        plan.max_iterations,
        space=plan.space.define_by_run,
        metric=list(plan.metrics) if len(plan.metrics) > 1 else plan.metrics[0],
        mode=list(plan.modes) if len(plan.modes) > 1 else plan.modes[0],
        points_to_evaluate=[default_point],
        storage=optuna.storages.RDBStorage(f"sqlite:///{exp_dir / STUDY}"),
        study_name=s.category,
        sampler=optuna.samplers.TPESampler(seed=s.search_seed, n_startup_trials=s.tpe_startup_trials),
    )
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr=EVALUATION, metric=plan.metrics[0], mode=plan.modes[0],
                                  max_t=plan.max_iterations, grace_period=min(s.grace_period, plan.max_iterations),
                                  reduction_factor=s.reduction_factor,
                                  stop_last_trials=False)  # trials at max_t end by themselves, cleanly
    else:
        scheduler = FIFOScheduler()
    store = ResultsStore(exp_dir, plan.metrics[0], plan.modes[0], plan.max_iterations,
                         [p.key for p in plan.space.searched], default_point, trials_storage,
                         TrialRuns(s.mlflow, experiment_name(exp_dir)) if s.mlflow else None)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.trials,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage, callbacks=[store], verbose=verbose),
    )


class HonestOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch tells Optuna that every trial that ended without an error is COMPLETE, with the
    value of its last evaluation, so trials that ASHA stopped at a low budget would rank beside finished
    ones. Here a trial is COMPLETE only when it reached `max_iterations`; one stopped earlier is PRUNED,
    keeping its intermediate values (single objective), as Optuna's own pruners record it."""

    def __init__(self, max_iterations: int, **kwargs):
        super().__init__(**kwargs)
        self.max_iterations = max_iterations

    def on_trial_result(self, trial_id: str, result: dict) -> None:  # Optuna's step: the evaluation, as ASHA's
        super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: result[EVALUATION]})

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = bool(result) and not error and result.get(EVALUATION, 0) < self.max_iterations
        if not stopped_early or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def _tune_path(plan: Plan, exp_dir: Path) -> str:
    return storage_path(_storage(plan, exp_dir), TUNE_DIR)


def _storage(plan: Plan, exp_dir: Path) -> str:
    """Where Tune keeps its state and the trials their checkpoints: EXP_DIR, or a folder of its own in a
    shared --storage."""
    return ray_storage(plan.settings.storage, exp_dir, str(exp_dir))


def check_as_begun(plan: Plan, exp_dir: Path, record: dict[str, Any]) -> None:
    """A search goes on only as it began: in its folder, with its space and base config."""
    began_in = record.get("folder")
    if began_in is not None and began_in != os.path.realpath(exp_dir):  # Ray Tune's pickled state names it
        raise RayadError(f"{exp_dir}: the search began in {began_in}, and a search cannot move (Ray Tune's state "
                         "names its folder): resume it there, or start a new --out")
    planned = json.loads(json.dumps(experiment_record(plan, 0, exp_dir)))  # as the record was written and read
    changed = [key for key in RESUMED_AS_BEGUN if key in record and record[key] != planned[key]]
    if changed:  # the space file or --config, read again: its trials would run another search
        s = plan.settings
        files = " or ".join(f for f in (s.space, s.config_file) if f)
        raise RayadError(f"{exp_dir}: its {', '.join(changed)} changed since the search began ({files} changed); "
                         f"put back what it began with, or start a new --out")


def _check_resumable(plan: Plan, exp_dir: Path, record: dict[str, Any]) -> None:
    check_as_begun(plan, exp_dir, record)
    versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
    now = {"rayad": __version__, "ray": ray.__version__, "optuna": optuna.__version__}
    started = {name: versions.get(name) for name in now}
    if started != now:  # Ray Tune unpickles objects of those versions (the searcher holds Optuna's)
        def listed(versions: dict[str, str | None]) -> str:
            return ", ".join(f"{name} {version}" for name, version in versions.items())
        raise RayadError(f"{exp_dir}: started with {listed(started)}, and only those versions can resume it (this "
                         f"is {listed(now)}); install them to resume it, or start a new --out")
    tune_path = _tune_path(plan, exp_dir)
    if not tune.Tuner.can_restore(tune_path):
        raise RayadError(f"{exp_dir}: no experiment to resume (no Tune state at {tune_path})")
    try:
        rows = read_rows(exp_dir / TRIALS)
    except (OSError, pa.ArrowException) as e:
        raise RayadError(f"{exp_dir / TRIALS}: unreadable ({e}); the search cannot be resumed") from None
    if "://" not in tune_path:
        check_trusted(Path(tune_path))
    # Ray Tune does not rerun the trials it finished, so their rows must be in the store already
    ended = {t.trial_id for t in tune.ExperimentAnalysis(tune_path).trials if t.status in ("TERMINATED", "ERROR")}
    lost = ended - {row["trial_id"] for row in rows}
    if lost:
        raise RayadError(f"{exp_dir / TRIALS}: lacks {len(lost)} of the {len(ended)} trials Ray Tune has finished "
                         "(deleted or replaced?), and a resumed search does not rerun them; put the file back, or "
                         "start a new --out")


def check_trusted(tune_dir: Path) -> None:
    """Ray Tune's restore unpickles the files under `tune_dir` (the tuner, the searcher, the trials), and
    unpickling runs code: refuse when any of them, or a folder holding them, is not owned by this user or
    is writable by others (docs/design.md, "The results store")."""
    paths = [tune_dir.parent, tune_dir, *tune_dir.rglob("*")]
    for path in paths[1:]:  # the experiment's folder may be a link (--out given as one): its target is checked
        if path.is_symlink():
            raise RayadError(f"{path}: a symbolic link in the Tune state; --resume unpickles that state, so "
                             "it only accepts plain files")
    foreign = [p for p in paths if p.stat().st_uid != os.getuid()]
    writable = [p for p in paths if p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    for found, what, fix in ((foreign, "not owned by you", "chown -R"), (writable, "writable by its group or others",
                                                                         "chmod -R go-w")):
        if found:
            more = f" (and {len(found) - 1} more there)" if len(found) > 1 else ""
            raise RayadError(f"{found[0]}{more}: {what}; --resume unpickles Ray Tune's state, which runs code, so it "
                             f"refuses state it cannot trust (check it, then {fix} {tune_dir.parent}, or start a new "
                             "experiment)")


def trial_config(plan: Plan, params: dict[str, Any]) -> Config:
    """A trial's config: the base (validating at every checkpoint) with the trial's parameters."""
    return plan.base.replace(plan.space.trial_overrides(params), "trial")


def run_trial(params: dict[str, Any], plan: Plan, storage: str) -> None:
    """One Tune trial: fit a TorchTrainer; its rank-0 reports reach Tune through TuneReportCallback."""
    s = plan.settings
    loop = LoopConfig(trial_config(plan, params), str(Path(s.data_root).absolute()), s.category,
                      threads=plan.cluster.worker_threads, validate=True, val_root=s.val_root)
    checkpoints = CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=plan.metrics[0],
                                   checkpoint_score_order=plan.modes[0])
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(loop, plan.cluster, trial_run_name(trial_id), storage, checkpoints, [TuneReportCallback()])
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as e:
        raise worker_error(e) from None  # a rayad error whole, not its end in Ray's cut-down worker traceback


def _finish(plan: Plan, exp_dir: Path, experiment: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Export the best trial's best checkpoint (of the results store's `rows`) to EXP_DIR/best and evaluate it
    once on the test split."""
    scored = [r for r in rows if r["best_value"] is not None and r["checkpoint_path"]]
    if not scored:
        raise RayadError(f"{exp_dir}: no trial produced a validation score (see {exp_dir / TRIALS})")
    sign = 1 if plan.modes[0] == "max" else -1
    best = max(scored, key=lambda r: sign * r["best_value"])
    test = export_best(plan, best, exp_dir / BEST)
    experiment.update(status="finished", finished_at=time.time(), trials=_count_statuses(rows), best={
        "trial_id": best["trial_id"], "validation": {plan.metrics[0]: best["best_value"]},
        "step": best["best_step"], "params": {k: v for k, v in best.items() if k.startswith(PARAM_PREFIX)},
        "test": {k: test[k] for k in METRIC_NAMES}})
    write_json(exp_dir / EXPERIMENT, experiment)
    if plan.settings.mlflow:
        log_best(plan.settings.mlflow, experiment_name(exp_dir), exp_dir, experiment)
    return experiment


def _count_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {status: sum(r["status"] == status for r in rows) for status in TRIAL_STATUSES}


def format_experiment(experiment: dict[str, Any]) -> str:
    """A short text summary: trial counts, the best trial's parameters and its test metrics."""
    counts, best = experiment["trials"], experiment["best"]
    metric, value = next(iter(best["validation"].items()))
    lines = [f"experiment {experiment['name']} ({experiment['category']}): "
             + ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items() if n),
             f"best trial {best['trial_id']}: {metric} {value:.4f} at step {best['step']}"]
    lines += [f"  {key} = {v}" for key, v in trial_params(best["params"]).items() if v is not None]
    lines.append("test split, once: " + "  ".join(f"{k} {format_metric(v)}" for k, v in best["test"].items()))
    return "\n".join(lines)



def export_best(plan: Plan, row: dict[str, Any], out: Path) -> dict[str, Any]:
    """Turn a trial checkpoint into a model artifact (calibrated on the good validation images) and write
    its test metrics beside it."""
    s = plan.settings
    with Checkpoint(row["checkpoint_path"]).as_directory() as directory:
        state = json.loads((Path(directory) / "state.json").read_text())
        cfg = Config.from_dict(state["config"], row["checkpoint_path"])
        network = build_anomaly_model(cfg).network
        load_checkpoint(directory, network)
    data = load_train_data(cfg, s.data_root, s.category)
    info = {"category": s.category, "steps": state["step"], "search_trial": row["trial_id"],
            "validation": {plan.metrics[0]: row["best_value"]}, "threads": plan.cluster.worker_threads,
            "precision": state.get("precision"), "precision_reason": "as the trial trained (its checkpoint)"}
    device = driver_device(plan.cluster.use_gpu)  # calibrated and evaluated on one device
    calibrate_and_save(network, cfg, data.val, out, device, info)
    metrics = evaluate(Predictor.load(out, device=str(device)), s.data_root, s.category)
    write_json(out / TEST_METRICS, metrics)
    return metrics


RESUMED_AS_BEGUN = ("space", "base_config", "max_iterations", "objective")  # in experiment.json


def experiment_record(plan: Plan, concurrent: int, exp_dir: Path) -> dict[str, Any]:
    s = plan.settings
    return {
        "name": exp_dir.name, "folder": os.path.realpath(exp_dir), "data_root": str(Path(s.data_root).absolute()),
        "category": s.category,
        "space": {"file": str(s.space), "params": {p.key: {"kind": p.kind, "args": list(p.args),
                                                             "when": {k: list(v) for k, v in p.when.items()}}
                                                    for p in plan.space.params}},
        "settings": dataclasses.asdict(s), "objective": {"metrics": list(plan.metrics), "modes": list(plan.modes),
                                                         "split": "validation"},
        "resources": {"concurrent_trials": concurrent, "per_trial": plan.cluster.describe()},
        "max_iterations": plan.max_iterations, "base_config": plan.base.to_dict(),
        "versions": {"rayad": __version__, "ray": ray.__version__, "torch": torch.__version__,
                     "optuna": optuna.__version__, "python": platform.python_version()},
        "command": sys.argv, "status": "running", "started_at": time.time(), "finished_at": None,
    }


def load_settings(exp_dir: str | Path) -> SearchSettings:
    """The settings of an existing experiment (for --resume)."""
    return settings_of(read_experiment_file(exp_dir), exp_dir)


def settings_of(record: dict[str, Any], exp_dir: str | Path) -> SearchSettings:
    """The settings in an experiment record (`read_experiment_file`)."""
    try:
        return SearchSettings.from_dict(record["settings"])
    except (TypeError, KeyError) as e:
        raise RayadError(f"{Path(exp_dir) / EXPERIMENT}: its settings are damaged ({type(e).__name__}: {e})"
                         ) from None


def read_experiment_file(exp_dir: str | Path) -> dict[str, Any]:
    """EXP_DIR/experiment.json as written by a search: a JSON object with its settings."""
    path = Path(exp_dir) / EXPERIMENT
    if not path.is_file():
        raise RayadError(f"{exp_dir}: not an experiment directory (no {EXPERIMENT})")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RayadError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise RayadError(f"{path}: not an experiment record (a JSON object with its settings)")
    return record
