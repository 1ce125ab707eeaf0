"""The `rayad` command line. User mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from rayad.config import LAYOUTS
from rayad.data.images import IMAGE_SUFFIXES
from rayad.errors import DataError, RayadError, stop_on_sigterm
from rayad.layout import local_path, standard_stream, written_in_place
from rayad.settings import (
    DASHBOARD_PORT,
    DEMO_SPACE,
    DEMO_TRIALS,
    LOCAL_HOST,
    PREDICT_BATCH,
    SERVE_PORT,
    Cluster,
    SearchSettings,
    ServeSettings,
    check_can_listen,
)

log = logging.getLogger("rayad")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, instead of argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rayad", description="Visual anomaly detection with self-supervised autoencoders.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True,
                                                                        parser_class=_Parser)
    demo_data = data.add_parser("demo", help="write the demo dataset (MVTec layout, real texture photos)")
    demo_data.add_argument("--out", required=True, type=Path)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(func=cmd_data_demo)

    train = sub.add_parser("train", help="train a model and write its artifact to --out")
    _add_data_args(train)
    train.add_argument("--out", required=True, type=Path, help="run directory (gets the model artifact)")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--mlflow", metavar="URI", help="also log the run to this MLflow tracking URI "
                       "(sqlite:///mlflow.db or a server; needs rayad[mlflow])")
    dist = train.add_argument_group("distributed training on Ray Train (used when --workers is given)")
    dist.add_argument("--workers", type=int, help="number of DDP workers")
    dist.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    dist.add_argument("--cpus-per-worker", type=number, default=Cluster.cpus_per_worker,
                      help="CPUs each worker reserves; its torch threads are the whole CPUs, at least 1 (default: the "
                      "smallest node's cores shared by the workers, at least 1)")
    dist.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    dist.add_argument("--storage", help="checkpoint storage: a path or URI such as file:///shared or s3://b/p")
    dist.add_argument("--max-failures", type=int, default=Cluster.max_failures, help="worker failures to recover from")
    dist.add_argument("--spread", action="store_true", help="place workers on different nodes")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a trained model on the test split")
    evaluate.add_argument("--run", required=True, type=Path)
    _add_data_args(evaluate)
    evaluate.add_argument("--json", type=Path, help="also write the metrics as JSON")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="score images (files or folders)")
    predict.add_argument("--run", required=True, type=Path)
    predict.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (URIs with --ray)")
    predict.add_argument("--input", dest="inputs", action="append", default=[], metavar="DIR_OR_URI",
                         help="more inputs, e.g. s3://bucket/images/ (repeatable)")
    predict.add_argument("--out", help="write one row per image to this file: CSV if its name ends in .csv, else "
                         "Parquet (with --ray: a folder or URI that gets a Parquet dataset)")
    predict.add_argument("--heatmaps", help="write a heatmap PNG per image to this folder (or URI, with --ray)")
    predict.add_argument("--batch-size", type=int, default=PREDICT_BATCH,
                         help=f"images per forward pass (default {PREDICT_BATCH})")
    offline = predict.add_argument_group("offline batch scoring on Ray Data (--ray)")
    offline.add_argument("--ray", action="store_true", help="stream the images through a Ray Data actor pool")
    offline.add_argument("--actors", type=int, help="scoring actors (default: as many as the cluster's CPUs hold)")
    offline.add_argument("--cpus-per-actor", type=number,
                         help="CPUs each actor reserves; its torch threads are the whole CPUs in it, at least 1 "
                         "(default: one actor per core, with a quarter core per node for reading and writing: "
                         "0.875 on 2-core nodes)")
    offline.add_argument("--gpus-per-actor", type=number, default=0.0,
                         help="GPUs each actor reserves (fractions share one); the pool then holds as many actors "
                         "as the GPUs allow, and no more than the CPUs hold")
    offline.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    predict.set_defaults(func=cmd_predict)

    srv = sub.add_parser("serve", help="serve models over HTTP with Ray Serve (batched, multiplexed)")
    srv.add_argument("--run", required=True, type=Path,
                     help="a run, an experiment (serves best/), or a folder of them (e.g. rayad demo's output)")
    srv.add_argument("--host", type=host, default=LOCAL_HOST, help="bind address (default: loopback only)")
    srv.add_argument("--port", type=port, default=SERVE_PORT)
    srv.add_argument("--replicas", type=count, help="fixed number of scorer replicas (= --min/--max-replicas)")
    defaults = ServeSettings()
    srv.add_argument("--min-replicas", type=count, default=defaults.min_replicas)
    srv.add_argument("--max-replicas", type=count, default=defaults.max_replicas, help="autoscaling upper bound")
    srv.add_argument("--target-ongoing", type=number, default=defaults.target_ongoing_requests,
                     help="autoscaling target per replica")
    srv.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    srv.add_argument("--batch-wait-ms", type=milliseconds, default=defaults.batch_wait_s * 1000)
    srv.add_argument("--max-queued", type=int, default=defaults.max_queued_requests,
                     help="queued requests per replica before 503")
    srv.add_argument("--max-upload-mb", type=number, default=defaults.max_upload_mb, help="one image")
    srv.add_argument("--max-batch-mb", type=number, default=defaults.max_batch_mb,
                     help="a whole batch request (bounds the ingress's memory)")
    srv.add_argument("--max-batch-images", type=int, default=defaults.max_batch_images,
                     help="images in one batch request (more get 413)")
    srv.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                     help="larger images are refused with 413 before they are decoded")
    srv.add_argument("--replica-cpus", type=number, default=defaults.replica_cpus,
                     help="CPUs each scorer replica reserves; its torch threads are the whole CPUs, at least 1 "
                     "(default: the smallest node's cores shared by --max-replicas, at least 1)")
    srv.add_argument("--replica-gpus", type=number, default=defaults.replica_gpus,
                     help="GPUs each scorer replica reserves (0.5: two replicas per GPU); it scores on cuda then")
    srv.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    srv.add_argument("--ingress", choices=["python", "haproxy"], default="python",
                     help="HTTP path: Ray's Python proxy (default), or Ray 2.60's experimental HAProxy ingress "
                          "(1.26x the requests/s at 32 clients on 2 cores; see docs/benchmarks.md)")
    srv.set_defaults(func=cmd_serve)

    export = sub.add_parser("export", help="export a model to TorchScript or ONNX (threshold in the metadata)")
    export.add_argument("--run", required=True, type=Path)
    export.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    export.add_argument("--out", required=True, type=Path, help="folder for the model file and rayad_export.json")
    export.set_defaults(func=cmd_export)

    tune = sub.add_parser("tune", help="hyperparameter search (Ray Tune + Optuna + ASHA) into an experiment dir")
    tune.add_argument("--data", type=Path, help="dataset root")
    tune.add_argument("--category")
    tune.add_argument("--layout", choices=LAYOUTS,
                      help="dataset layout (default: detected)")
    tune.add_argument("--space", help="search space YAML, or the name of one in tune_spaces/ "
                                      "(demo, quick, quality, paper, ablation)")
    tune.add_argument("--out", required=True, type=Path, help="experiment directory (the results store)")
    tune.add_argument("--trials", type=int, default=SearchSettings.trials)
    tune.add_argument("--resume", action="store_true", help="continue the experiment in --out (settings from it)")
    _add_config_args(tune)
    search = tune.add_argument_group("search")
    search.add_argument("--metric", help="validation metric to optimise; comma-separated for multi-objective "
                                         "(default: the space's, else val_image_auroc)")
    search.add_argument("--mode", help="max or min (comma-separated like --metric; default: the space's for its "
                                       "own metric, else max)")
    search.add_argument("--scheduler", choices=["asha", "fifo"], default=SearchSettings.scheduler)
    search.add_argument("--grace-period", type=int, default=SearchSettings.grace_period,
                        help="evaluations before ASHA may stop a trial")
    search.add_argument("--search-seed", type=int, default=SearchSettings.search_seed,
                        help="seed of Optuna's sampler (--seed seeds the trials' training)")
    search.add_argument("--startup-trials", type=int, metavar="N",
                        help="random trials before TPE models the results (default: a third of --trials, 1-10)")
    search.add_argument("--val-data", type=Path, help="labelled validation dataset root (its test split is used); "
                                                      "default: held-out good images + synthesised defects")
    res = tune.add_argument_group("resources")
    res.add_argument("--concurrent", type=int, help="trials at a time (default: as many as the cluster holds)")
    res.add_argument("--workers-per-trial", type=int, default=SearchSettings.workers_per_trial,
                     help="Ray Train DDP workers per trial")
    res.add_argument("--cpus-per-worker", type=number, default=SearchSettings.cpus_per_worker)
    res.add_argument("--gpus-per-worker", type=number, default=SearchSettings.gpus_per_worker)
    res.add_argument("--max-failures", type=int, default=SearchSettings.max_failures,
                     help="worker failures each trial recovers from")
    res.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    res.add_argument("--storage", help="Tune/Train storage every node sees (path or URI; default: --out)")
    tune.add_argument("--mlflow", metavar="URI", help="also log every trial and the best model to this MLflow "
                      "tracking URI (sqlite:///mlflow.db or a server; needs rayad[mlflow])")
    tune.set_defaults(func=cmd_tune)

    demo = sub.add_parser("demo", help="the main job: demo data, then a search per demo category")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--trials", type=int, default=DEMO_TRIALS, help="trials per category")
    demo.add_argument("--space", default=DEMO_SPACE, help=f"search space (default: tune_spaces/{DEMO_SPACE}.yaml)")
    demo.add_argument("--categories", nargs="+", metavar="CATEGORY",
                      help="demo categories to search (default: all: brick grass gravel)")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    _add_config_args(demo)
    demo.set_defaults(func=cmd_demo)

    dash = sub.add_parser("dashboard", help="browse experiments, trials, metrics and heatmaps (Streamlit)")
    dash.add_argument("--runs", type=Path, default=Path("runs"), help="folder of experiments (default: runs)")
    dash.add_argument("--host", type=host, default=LOCAL_HOST,
                      help=f"address to bind (default: {LOCAL_HOST}, local only)")
    dash.add_argument("--port", type=port, default=DASHBOARD_PORT)
    dash.add_argument("--serve-url", help="score uploads on the Try-it page with this Serve endpoint, e.g. "
                      "http://127.0.0.1:8000 (default: a model loaded in the dashboard)")
    dash.set_defaults(func=cmd_dashboard)
    return parser


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="dataset root")
    p.add_argument("--category", required=True)
    p.add_argument("--layout", choices=LAYOUTS,
                   help="dataset layout (default: detected)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (sections data, corruption, model, train, scoring)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.skip=add (repeatable)")
    p.add_argument("--steps", type=int, help="= --set train.steps=N")
    p.add_argument("--image-size", type=int, help="= --set data.image_size=N")
    p.add_argument("--seed", type=int, help="= --set train.seed=N")


# The flags that are shorthands of one --set key each
SHORTCUTS = {"train.steps": "--steps", "data.image_size": "--image-size", "train.seed": "--seed",
             "data.layout": "--layout"}


def _config(args):
    """The config file with --set and the shortcut flags applied; a bad value names the flags given."""
    from rayad.config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    shortcuts = _shortcuts(args, overrides)
    flags = ["--set"] * bool(overrides) + [SHORTCUTS[key] for key in shortcuts]
    return load_config(args.config, overrides | shortcuts, source=f"overrides ({', '.join(flags)})")


def _overrides(args) -> dict:
    """--set values plus the shortcut flags, as dotted config keys."""
    from rayad.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    return overrides | _shortcuts(args, overrides)


def _shortcuts(args, overrides: dict) -> dict:
    """The shortcut flags given, as dotted config keys; refused beside a --set of the same key."""
    shortcuts = {key: value for key, flag in SHORTCUTS.items()
                 if (value := getattr(args, flag[2:].replace("-", "_"), None)) is not None}
    both = sorted(set(shortcuts) & set(overrides))
    if both:
        raise RayadError(f"{SHORTCUTS[both[0]]} and --set {both[0]}: give one of them")
    return shortcuts


def cmd_data_demo(args) -> None:
    from rayad.data.demo import make_demo_dataset

    root = make_demo_dataset(args.out, seed=args.seed)
    print(f"demo dataset written to {root}")


def cmd_train(args) -> None:
    cfg = _config(args)
    if args.mlflow:
        from rayad.tracking import check_tracking_uri, experiment_name

        check_tracking_uri(args.mlflow, experiment_name(args.out))
    if args.workers is None:
        import torch

        from rayad.train import fit

        if args.gpu and not torch.cuda.is_available():
            raise RayadError("--gpu: this process sees no CUDA GPU (without --workers it trains here)")
        _refuse_ignored((("--address", args.address), ("--storage", args.storage), ("--spread", args.spread),
                         ("--cpus-per-worker", args.cpus_per_worker != Cluster.cpus_per_worker),
                         ("--max-failures", args.max_failures != Cluster.max_failures)),
                        "training on Ray Train; add --workers N (without it the run trains in this process)")
        run = fit(cfg, args.data, args.category, args.out, resume=args.resume)
    else:
        from rayad.train.ray_train import fit_distributed

        cluster = Cluster(workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                          address=args.address, storage=args.storage, max_failures=args.max_failures,
                          placement="SPREAD" if args.spread else "PACK")
        run = fit_distributed(cfg, args.data, args.category, args.out, cluster, resume=args.resume)
    meta = json.loads((run / "model.json").read_text())
    print(f"model written to {run} (threshold {meta['threshold']:.6g})")
    if args.mlflow:
        from rayad.tracking import experiment_name, log_training

        run_id = log_training(args.mlflow, experiment_name(run), run)
        print(f"logged to MLflow at {args.mlflow} (run {run_id})")


def _torch_threads() -> None:
    """Scoring in this process: one torch thread per CPU it may run on, never more, and the heap kept for
    the next batch (rayad.cpu.use_cpus)."""
    from rayad.cpu import use_cpus
    from rayad.settings import cpu_count

    use_cpus(cpu_count())


def cmd_evaluate(args) -> None:
    from rayad.artifact import Predictor
    from rayad.evaluate import evaluate, format_table
    from rayad.layout import write_json

    _torch_threads()
    predictor = Predictor.load(args.run)
    data = predictor.config.data
    if args.layout:
        data = predictor.config.replace({"data.layout": args.layout}).data
    metrics = evaluate(predictor, args.data, args.category, data)
    print(format_table(metrics))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, metrics)


def cmd_predict(args) -> None:
    inputs = args.paths + args.inputs
    if not inputs:
        raise RayadError("give image files or folders to score")
    if args.batch_size < 1 or (args.actors is not None and args.actors < 1):
        raise RayadError("--batch-size and --actors must be >= 1")
    if args.ray:
        from rayad.predict import predict_with_ray

        if args.out is None:
            raise RayadError("--ray writes its rows to --out FOLDER_OR_URI (a Parquet dataset)")
        if args.out.lower().endswith(".csv"):  # it made a folder of that name, holding Parquet files
            raise RayadError(f"--out {args.out}: --ray writes a Parquet dataset, a folder; give a folder name, or "
                             "score without --ray for a CSV file")
        cpus = args.cpus_per_actor
        if (cpus is not None and cpus < 0) or args.gpus_per_actor < 0 or cpus == args.gpus_per_actor == 0:
            raise RayadError("--cpus-per-actor and --gpus-per-actor must be >= 0, and not both 0")
        errors = predict_with_ray(args.run, inputs, args.out, args.heatmaps, args.batch_size, args.actors,
                                  args.cpus_per_actor, args.gpus_per_actor, args.address)["error"]
        print(f"wrote {len(errors)} rows to {args.out}")
        _check_scored(errors.to_pylist())
        return
    from rayad.predict import predict_paths

    _refuse_ignored((("--actors", args.actors is not None), ("--cpus-per-actor", args.cpus_per_actor is not None),
                     ("--gpus-per-actor", args.gpus_per_actor != 0), ("--address", args.address)),
                    "scoring on Ray Data; add --ray (without it the files are scored in this process)")
    _torch_threads()
    remote = [o for o in (args.out, args.heatmaps, *inputs) if o and "://" in o]
    if remote:
        raise RayadError(f"{remote[0]}: URIs need --ray (the single-process path reads and writes local files)")
    table = predict_paths(args.run, [Path(p) for p in inputs], args.out and Path(args.out), args.heatmaps,
                          args.batch_size)
    for row in table.to_pylist():
        if row["error"]:  # the message names the file
            print(f"{'-':>12}  {'error':<10} {row['error']}")
        else:
            print(f"{row['score']:>12.6g}  {'anomalous' if row['label'] else 'good':<10} {row['path']}")
    if args.out:
        print(f"wrote {table.num_rows} rows to {args.out}")
    _check_scored(table["error"].to_pylist())


def _check_scored(errors: list[str | None]) -> None:
    """Fail when no image could be scored (the rows stay written); say how many could not be, when some."""
    failed = [e for e in errors if e]
    if failed and len(failed) == len(errors):
        raise DataError(f"none of the {len(errors)} files could be scored; the first: {failed[0]}")
    if failed:
        print(f"rayad predict: {len(failed)} of {len(errors)} files could not be scored (see their rows' error)",
              file=sys.stderr)


def _refuse_ignored(flags: tuple[tuple[str, object], ...], options_of: str) -> None:
    """Flags given (a true value) that only another mode of the command uses: refused, not ignored (a GPU asked
    for, and the job ran on the CPU)."""
    given = [flag for flag, value in flags if value]
    if given:
        raise RayadError(f"{', '.join(given)}: options of {options_of}")


def cmd_serve(args) -> None:
    from rayad.cluster import connect, starts_local_ray
    from rayad.serve import discover_models, serve_until_stopped, use_haproxy_ingress

    low, high = (args.min_replicas, args.max_replicas) if args.replicas is None else (args.replicas, args.replicas)
    settings = ServeSettings(models=discover_models(args.run), min_replicas=low, max_replicas=high,
                             target_ongoing_requests=args.target_ongoing, max_batch_size=args.max_batch_size,
                             batch_wait_s=args.batch_wait_ms / 1000, max_queued_requests=args.max_queued,
                             max_upload_mb=args.max_upload_mb, max_batch_mb=args.max_batch_mb,
                             max_pixels=args.max_pixels, max_batch_images=args.max_batch_images,
                             replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                             api_key=os.environ.get("RAYAD_API_KEY") or None)
    address = use_haproxy_ingress(args.address) if args.ingress == "haproxy" else args.address
    if starts_local_ray(address):  # its Serve listens here: it failed on a taken port after 45 s, with a traceback
        check_can_listen(args.host, args.port)
    joined = not connect(address)

    def announce(url: str) -> None:
        key = "; API key required" if settings.api_key else ""
        print(f"serving {sorted(settings.models)} at {url} (API docs: {url}/docs{key}). Ctrl-C or SIGTERM stops.",
              flush=True)

    stopped_by = serve_until_stopped(settings, args.host, args.port, announce)
    print(f"stopped by {stopped_by}" + (": the application is deleted from the cluster" if joined else ""), flush=True)


def cmd_export(args) -> None:
    from rayad.export import export_model

    meta = export_model(args.run, args.format, args.out)
    print(f"wrote {args.out / meta['file']} (threshold {meta['threshold']:.6g}; max difference to PyTorch "
          f"{meta['parity']['max_abs_difference']:.2g}, tolerance {meta['parity']['tolerance']:g})")
    if meta["model_precision"] != "fp32":
        print(f"rayad export: the model scores in {meta['model_precision']} (predict, evaluate, Serve) and this export "
              "in fp32: scores differ by that rounding, and an image near the threshold can get another label",
              file=sys.stderr)


def cmd_tune(args) -> None:
    from rayad.tune import format_experiment, load_settings, resolve_space, run_search

    if args.resume:
        given = _given_with_resume(args)
        if given:
            raise RayadError(f"{', '.join(given)} with --resume: a search resumes as it began (its settings are "
                             f"in {args.out}/experiment.json); drop them, or start a new --out")
        settings = load_settings(args.out)
    else:
        missing = [f"--{name}" for name in ("data", "category", "space") if getattr(args, name) is None]
        if missing:
            raise RayadError(f"{', '.join(missing)} required (or --resume an experiment)")
        settings = SearchSettings(
            data_root=str(args.data), category=args.category, space=str(resolve_space(args.space)),
            trials=args.trials, concurrent=args.concurrent, workers_per_trial=args.workers_per_trial,
            cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            metric=_split(args.metric), mode=_split(args.mode), scheduler=args.scheduler,
            grace_period=args.grace_period, search_seed=args.search_seed, startup_trials=args.startup_trials,
            val_root=str(args.val_data) if args.val_data else None,
            config_file=str(args.config) if args.config else None, overrides=_overrides(args),
            storage=args.storage, max_failures=args.max_failures, mlflow=args.mlflow)
    _torch_threads()  # the driver evaluates the best trial's model on the test split
    experiment = run_search(settings, args.out, args.address, resume=args.resume)

    print(format_experiment(experiment))


def _given_with_resume(args) -> list[str]:
    """The flags of `rayad tune` given besides --out, --resume, --address and -v (which a resume takes), even at
    their default values: the command line parsed again without defaults."""
    parser = build_parser()
    tune = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["tune"]
    for action in tune._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(args.argv))
    kept = {"out", "resume", "address", "verbose", "command", "func"}
    return [{"overrides": "--set"}.get(dest, "--" + dest.replace("_", "-")) for dest in given if dest not in kept]


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",")) if value is not None else ()  # "" is refused, not default


def cmd_demo(args) -> None:
    from rayad.data.demo import CATEGORIES
    from rayad.demo import run_demo

    unknown = sorted(set(args.categories or ()) - set(CATEGORIES))
    if unknown:
        raise RayadError(f"--categories: no demo category {', '.join(unknown)}; the demo has {' '.join(CATEGORIES)}")
    _torch_threads()  # the driver evaluates each category's best model and the baseline
    run_demo(args.out, args.space, args.trials, _overrides(args), args.address, args.config,
             tuple(args.categories or CATEGORIES))


def cmd_dashboard(args) -> None:
    from rayad.dashboard import run_dashboard

    run_dashboard(args.runs, args.host, args.port, args.serve_url)


# The paths each command writes: flag -> True for a folder, False for a file.
OUTPUTS = {"data": {"out": True}, "train": {"out": True, "storage": True}, "evaluate": {"json": False},
           "predict": {"out": False, "heatmaps": True}, "export": {"out": True}, "tune": {"out": True, "storage": True},
           "demo": {"out": True}}


def number(text: str) -> float:
    """argparse type of every fractional flag: a finite number (inf and nan passed, then overflowed later)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def count(text: str) -> int:
    """argparse type of a count (of images, trials, rounds): a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count (at least 1)")
    return value


def duration(text: str) -> float:
    """argparse type of a measuring time in seconds: a finite number above 0."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} s is no time to measure in (more than 0)")
    return value


def run_script(main: Callable[[], object]) -> None:
    """A benchmark script's entry point: rayad's own errors (a bad --data, --runs or category) and the system's (a
    missing folder) in one line with exit code 2, as `rayad` says them."""
    name = Path(sys.argv[0]).name
    try:
        main()
    except RayadError as e:
        print(f"{name}: error: {_one_line(str(e), verbose=False)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{name}: error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def milliseconds(text: str) -> float:
    """argparse type of a wait in milliseconds: a finite number, at least 0."""
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} ms is no wait (at least 0)")
    return value


def host(text: str) -> str:
    """argparse type of --host: an address to listen on; an empty one (an unset shell variable) would listen on
    every interface."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty host listens on every interface: give 0.0.0.0 for that")
    return text


def port(text: str) -> int:
    """argparse type of --port: a TCP port a server can listen on."""
    number = int(text)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port (1 to 65535)")
    return number


def output_paths(args) -> list[tuple[str, Path, bool]]:
    """The local paths the command writes: (flag, path, True for a folder or False for a file)."""
    outputs = OUTPUTS.get(args.command, {})
    if getattr(args, "ray", False) and args.out:
        outputs = {**outputs, "out": True}  # predict --ray writes a Parquet dataset: a folder
    given = {flag: getattr(args, flag, None) for flag in outputs}
    local = {flag: local_path(str(path)) for flag, path in given.items() if path}  # a file:// URI is local too
    return [(flag, Path(path), outputs[flag]) for flag, path in local.items() if "://" not in path]


def ray_job_copy() -> Path | None:
    """The current folder when this process is the driver of a Ray job submitted with a working directory
    (`ray job submit --working-dir`): Ray's temporary copy of that directory, which it deletes later."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray for a job's driver
    try:
        runtime_env = json.loads(config or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd() if isinstance(runtime_env, dict) and runtime_env.get("working_dir") else None


def check_outputs(args) -> None:
    """Fail before any work when an output path cannot be written: a file stands where a folder must be
    created, or a folder where the file goes, or it would land in a Ray job's temporary working directory."""
    job_copy = ray_job_copy()
    for flag, path, folder in output_paths(args):
        if job_copy is not None and path.resolve().is_relative_to(job_copy.resolve()):
            raise RayadError(f"--{flag} {path}: lies in this Ray job's working directory, a temporary copy that Ray "
                             f"deletes ({job_copy}); give an absolute path, on storage that outlives the job")
        dangling = next((part for part in [path, *path.parents] if part.is_symlink() and not part.exists()), None)
        if dangling is not None:
            raise RayadError(f"--{flag} {path}: {dangling} is a symbolic link to {os.readlink(dangling)}, which "
                             "does not exist")
        for part in ([path] if folder else []) + list(path.parents):
            if part.exists() and not part.is_dir():
                raise RayadError(f"--{flag} {path}: {part} is a file, not a folder")
        if not folder and path.is_dir():
            raise RayadError(f"--{flag} {path}: is a folder; give a file name")
        overwritten = None if folder else overwritten_input(args, path)
        if overwritten is not None:
            raise RayadError(f"--{flag} {path}: is {overwritten}, which the command reads; give another file name")
        existing = next(part for part in [path, *path.parents] if part.exists())
        if not writable(existing):
            raise RayadError(f"--{flag} {path}: {existing} is not writable")


def writable(existing: Path) -> bool:
    """Whether an output can be written at `existing`, the output path or its nearest existing folder. A file is
    written beside its final name, then renamed (`layout.atomic_write`), so its folder must take a new file:
    tried with a nameless temporary one, as permissions do not tell for root, nor on read-only mounts or
    /proc and /sys. /dev/stdout, and what `layout.written_in_place` names (a pipe), is written in place."""
    if standard_stream(existing) or written_in_place(existing):
        return os.access(existing, os.W_OK)
    existing = Path(os.path.realpath(existing))  # a link's target is what gets written, beside it
    try:
        with tempfile.TemporaryFile(dir=existing if existing.is_dir() else existing.parent):
            return True
    except OSError:
        return False


def overwritten_input(args, path: Path) -> str | None:
    """What an existing output file is among the command's inputs: a file of the model (--run), an image of
    the dataset (--data), or an image it scores (a PATH or --input given, or an image below a folder given);
    None when it is neither."""
    if not path.is_file():
        return None
    target, run, data = path.resolve(), getattr(args, "run", None), getattr(args, "data", None)
    if run is not None and target.is_relative_to(run.resolve()):
        return f"a file of the model --run {run}"
    if data is not None and target.is_relative_to(Path(data).resolve()) and target.suffix.lower() in IMAGE_SUFFIXES:
        return f"an image of the dataset --data {data}"
    for given in [*getattr(args, "paths", []), *getattr(args, "inputs", [])]:
        source = Path(given).resolve()
        if "://" not in given and (target == source or (source.is_dir() and target.is_relative_to(source)
                                                         and target.suffix.lower() in IMAGE_SUFFIXES)):
            return f"an image it scores ({given})"
    return None


def new_output_folders(args) -> list[Path]:
    """The output folders, and folders above output files, that do not exist yet: deepest first."""
    folders = {part for _, path, folder in output_paths(args)
               for part in ([path] if folder else []) + list(path.parents) if not part.exists()}
    return sorted(folders, key=lambda part: len(part.parts), reverse=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # what was given, not defaulted (`_given_with_resume`)
    # rayad's own messages from INFO; other libraries' (the ONNX exporter logs dozens of lines) from WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    new_folders = new_output_folders(args)
    stop_on_sigterm()
    ray_before = _ray_connected()  # a Ray that the caller connected (the Python API, tests) stays connected
    try:
        check_outputs(args)
        args.func(args)
    except RayadError as e:
        print(f"rayad {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder this user may not write: one line too; --verbose logs the trace
        log.debug("rayad %s failed", args.command, exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        print(f"rayad {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"rayad {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    finally:
        for folder in new_folders:  # a command that failed before writing leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        if _ray_connected() and not ray_before:
            from rayad.cluster import leave_ray

            leave_ray(process_ends=argv is None)  # the command line, where the process ends next
    return 0


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()  # without importing Ray


def _one_line(message: str, verbose: bool = True) -> str:
    """The first line with the first item listed below it (indented) and a count of the others, then any
    note after the list; the full message is logged, for -v where the command has it (`verbose`)."""
    lines = message.splitlines()
    if len(lines) == 1:
        return message
    log.log(logging.DEBUG if verbose else logging.ERROR, "%s", message)
    items = [line.strip() for line in lines[1:] if line[:1].isspace() and line.strip() != "..."]
    notes = [line.strip() for line in lines[1:] if not line[:1].isspace()]
    listed = "rayad -v lists them" if verbose else "listed above"
    more = f" (+{len(items) - 1} more: {listed})" if len(items) > 1 else ""
    return " ".join([f"{lines[0].rstrip(':')} — {items[0]}{more}" if items else lines[0], *notes])


if __name__ == "__main__":
    sys.exit(main())
