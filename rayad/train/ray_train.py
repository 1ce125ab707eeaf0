"""Distributed training on Ray Train (V2): DDP over workers and nodes, checkpointed, fault tolerant.

Each worker runs `rayad.train.loop.train_loop` with a `RaySession`; `build_trainer` makes the
`TorchTrainer` for `rayad train --workers` and for every Tune trial. Numbered comments mark the Ray APIs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer, prepare_model

from rayad.artifact import build_anomaly_model, calibrate_and_save
from rayad.cluster import Cluster, check_resources, check_shared_paths, connect, with_worker_cpus
from rayad.config import Config
from rayad.data.manifest import check_category
from rayad.errors import RayadError, sigint_restored
from rayad.layout import RAY_STATE, TRAIN_LOG, ray_storage, storage_path, writing
from rayad.precision import driver_device
from rayad.train.checkpoint import (
    RECORDED_ONLY,
    RUN_NAME,
    delete_unrecorded,
    latest_recorded,
    load_checkpoint,
    recorded_reports,
    save_checkpoint,
)
from rayad.train.loop import (
    LoopConfig,
    begin_run_files,
    check_buildable,
    check_run_folder,
    keep_log_until,
    load_train_data,
    stopped,
    train_loop,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class RaySession:
    """The loop inside a Ray Train worker: rank, device and checkpoints from Ray; reports to Ray."""

    def __init__(self, cfg: Config):
        ctx = ray.train.get_context()  # (1) rank and world size
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # (2) this worker's device (a GPU when use_gpu)
        self.cfg = cfg

    def steps(self, start: int, total: int) -> Iterable[int]:
        return range(start, total)

    def restore(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()  # (3) set after a restart: resume from it
        if not checkpoint:
            return None
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory, network, optimizer, fix=RECORDED_ONLY)

    def broadcast(self, make: Callable[[], T]) -> T:
        """Rank 0's `make()`, on every rank (so that all ranks run in the precision rank 0 measured)."""
        if self.world_size == 1:
            return make()
        value = [make() if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(value, src=0)
        return value[0]

    def prepare(self, network: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(network)  # (4) DDP (gloo on CPU, NCCL on GPU)

    def count_nodes(self) -> int:
        """How many distinct Ray nodes the workers run on (gathered over the process group)."""
        node = ray.get_runtime_context().get_node_id()
        if self.world_size == 1:
            return 1
        nodes = [None] * self.world_size
        torch.distributed.all_gather_object(nodes, node)
        return len(set(nodes))

    def report(self, metrics: dict[str, Any], network: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, checkpoint: bool) -> None:
        """Every worker reports; rank 0 attaches the checkpoint (unwrapped weights, optimiser, fp16 loss scaler,
        step, config)."""
        if not (checkpoint and self.rank == 0):
            ray.train.report(metrics)  # (5)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "ckpt", network, optimizer, metrics["step"], self.cfg, scaler,
                            metrics.get("precision"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(Path(tmp) / "ckpt")))


def train_loop_per_worker(train_loop_config: dict[str, LoopConfig]) -> None:
    """Ray Train's per-worker function."""
    loop = train_loop_config["loop"]
    train_loop(loop, RaySession(loop.config))


class RunLogCallback(UserCallback):
    """On the Train controller, which Ray Train places on the driver's node: appends rank 0's reports to
    RUN_DIR/train_log.jsonl, as a single-process run does, and with `progress` prints step, loss, images/s and
    ETA (Ray forwards it to the driver)."""

    def __init__(self, total_steps: int, log_file: Path, progress: bool = True):
        self.total, self.log_file, self.progress = total_steps, log_file, progress
        self.first_step = self.last_step = None

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        if self.last_step is not None and m["step"] <= self.last_step:  # a failed worker group restarted from a
            keep_log_until(self.log_file, m["step"] - 1)  # checkpoint (max_failures): its steps are logged again
            self.first_step = None
        self.last_step = m["step"]
        with self.log_file.open("a") as history:
            history.write(json.dumps(m) + "\n")
        if not self.progress:
            return
        self.first_step = self.first_step if self.first_step is not None else (m["step"], time.time())
        done_since, since = m["step"] - self.first_step[0], time.time() - self.first_step[1]
        eta = f"{(self.total - m['step']) * since / done_since:.0f}s" if done_since else "-"  # after two reports
        print(f"[rayad] step {m['step']}/{self.total} loss {m['loss']:.5f} "
              f"{m['interval_images_per_s'] or 0:.1f} img/s ({m['world_size']} workers) ETA {eta}"
              + (" checkpoint" if checkpoint else ""), flush=True)


def worker_error(error: ray.train.WorkerGroupError) -> Exception:
    """The lowest rank's RayadError (a run whose loss turned NaN), which the CLI says in one line; else Ray
    Train's own error, with every worker's traceback."""
    return next((e for _, e in sorted(error.worker_failures.items()) if isinstance(e, RayadError)), error)


def build_trainer(loop: LoopConfig, cluster: Cluster, name: str, storage: str,
                  checkpoint_config: CheckpointConfig, callbacks: list | None = None) -> TorchTrainer:
    """The `TorchTrainer` of one training run: `cluster.workers` workers, each running the loop."""
    resources = {"CPU": cluster.cpus_per_worker} | ({"GPU": cluster.gpus_per_worker} if cluster.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=cluster.workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources, placement_strategy=cluster.placement),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=checkpoint_config,
                             failure_config=FailureConfig(max_failures=cluster.max_failures), callbacks=callbacks),
    )


def fit_distributed(cfg: Config, data_root: str | Path, category: str, out_dir: str | Path, cluster: Cluster,
                    progress: bool = True, resume: bool = False) -> Path:
    """Train with Ray Train, calibrate on the driver and write the artifact to `out_dir`. With `resume`, the run
    continues from the latest checkpoint Ray Train recorded in its storage, as it began (`check_run_folder`)."""
    check_category(category)  # before the output folder is made, as fit does
    started = time.time()
    out_dir = Path(out_dir).absolute()
    with writing(out_dir):  # the run's folder, its log and (by default) its storage: one command at a time
        return _fit_distributed(cfg, data_root, category, out_dir, cluster, progress, started, resume)


def check_buildable_on(cluster: Cluster, cfg: Config) -> None:
    """`check_buildable` for a Ray job: trained on its workers' device, calibrated on the driver's."""
    check_buildable(cfg, "cuda" if cluster.use_gpu else "cpu", driver_device(cluster.use_gpu))


def _fit_distributed(cfg: Config, data_root: str | Path, category: str, out_dir: Path, cluster: Cluster,
                     progress: bool, started: float, resume: bool) -> Path:
    root = cluster.storage or str(out_dir / RAY_STATE)  # checked on every node; the run keeps its own folder there
    storage = ray_storage(cluster.storage, out_dir, root)
    resumed = check_run_folder(cfg, data_root, category, out_dir, resume, latest_recorded(storage), distributed=True,
                               storage=cluster.storage)
    check_buildable_on(cluster, cfg)
    data = load_train_data(cfg, data_root, category)  # validates data and fills the cache once
    connect(cluster.address)
    cluster = with_worker_cpus(cluster)
    check_resources(cluster)
    check_shared_paths(root, str(data_root), category)
    begin_run_files(out_dir, resumed, data.manifest, cluster.storage, distributed=True)
    loop = LoopConfig(cfg, str(Path(data_root).absolute()), category, threads=cluster.worker_threads,
                      started=started)
    trainer = build_trainer(loop, cluster, RUN_NAME, storage,
                            CheckpointConfig(num_to_keep=2),
                            [RunLogCallback(cfg.train.steps, out_dir / TRAIN_LOG, progress)])
    try:
        with sigint_restored():
            result = trainer.fit()
    except SystemExit:  # how Ray Train's driver leaves a run its SIGINT handler aborted (Ctrl-C, or SIGTERM)
        latest = latest_recorded(storage)
        raise stopped(None if latest is None else latest[0], resume) from None
    except ray.train.WorkerGroupError as e:
        raise worker_error(e) from None
    if result.checkpoint is None:
        raise RayadError("training finished without a checkpoint")
    # what a stop wrote after Ray Train's last record: nothing resumes from it, and Ray Train's pruning skips it
    deleted = delete_unrecorded(storage, RUN_NAME, recorded_reports(storage, RUN_NAME))
    if deleted:
        log.info("deleted %d checkpoint(s) a stop left and Ray Train never recorded", len(deleted))
    network = build_anomaly_model(cfg).network
    with result.checkpoint.as_directory() as directory:
        meta = load_checkpoint(directory, network)
    # resumed at its last step (stopped before its model), the run trains no step: its metrics are the last report's
    started_at = resumed if resumed == meta["step"] else result.metrics.get("start_step")
    info = {"category": category, "steps": meta["step"], "workers": cluster.workers, "threads": cluster.worker_threads,
            "nodes": result.metrics.get("nodes"), "images_per_s": result.metrics.get("images_per_s"),
            "seconds_to_first_step": result.metrics.get("seconds_to_first_step"),
            "final_loss": result.metrics.get("loss"), "resumed_from_step": started_at,
            "precision": result.metrics.get("precision"), "precision_reason": result.metrics.get("precision_reason"),
            "checkpoint": storage_path(storage, RUN_NAME, Path(result.checkpoint.path).name)}  # with a URI's scheme
    return calibrate_and_save(network, cfg, data.val, out_dir, driver_device(cluster.use_gpu), info)
