"""Distributed training on Ray Train (V2): DDP over workers and nodes, checkpointed, fault tolerant.

The per-worker loop reuses `train_step` of the single-process loop unchanged. Step k's global batch is
the single-process batch of `workers x batch_size` images; rank r trains on its r-th slice, so ranks see
disjoint data and one worker reproduces the single-process run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer, prepare_model

from rayad.artifact import build_anomaly_model
from rayad.config import Config
from rayad.corruption import Corruptor
from rayad.errors import RayadError
from rayad.train.checkpoint import load_checkpoint, save_checkpoint
from rayad.train.loop import (
    Throughput,
    batch_indices,
    finalize,
    load_train_data,
    make_optimizer,
    step_generator,
    to_device,
    train_step,
)
from rayad.validation import load_validation, validation_metrics

RANK_SEED_STRIDE = 7_919  # separates the corruption streams of different ranks


@dataclass(frozen=True)
class Cluster:
    """How to run: worker count and resources, where Ray is, where checkpoints go."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu; fractions share a GPU between workers
    address: str | None = None
    storage: str | None = None  # local path or pyarrow URI (file://, s3://, gs://); default RUN_DIR/ray
    max_failures: int = 0
    placement: str = "PACK"  # or SPREAD: one worker per node where possible
    threads_per_worker: int | None = None


def scaled_lr(lr: float, workers: int) -> float:
    """`train.lr` is tuned for one worker's batch; the global batch is `workers` times larger and the
    learning rate grows with its square root (the usual rule for Adam-type optimisers)."""
    return lr * math.sqrt(workers)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function. Numbered comments mark the Ray-specific lines."""
    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()  # (1) rank and world size
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    tc = dataclasses.replace(cfg.train, lr=scaled_lr(cfg.train.lr, world))
    data = load_train_data(cfg, loop_config["data_root"], loop_config["category"])
    device = ray.train.torch.get_device()  # (2) this worker's device (a GPU when use_gpu)

    torch.manual_seed(tc.seed)
    network = build_anomaly_model(cfg).network.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(network, tc)
    start = 0
    checkpoint = ray.train.get_checkpoint()  # (3) set after a restart: resume from it
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start = int(load_checkpoint(directory, network, optimizer)["step"])
    model = prepare_model(network)  # (4) DDP (gloo on CPU, NCCL on GPU)
    nodes = _count_nodes(world)
    validation = None
    if loop_config.get("validate") and rank == 0:
        validation = load_validation(cfg, loop_config["data_root"], loop_config["category"], loop_config["val_root"])
    corruptor = Corruptor(cfg.corruption)
    model.train()
    n, meter = len(data.train.images), Throughput(tc.batch_size * world, loop_config["started"])
    for step in range(start, tc.steps):
        global_batch = batch_indices(n, tc.batch_size * world, step, tc.seed)
        batch = global_batch[rank * tc.batch_size:(rank + 1) * tc.batch_size]
        clean = to_device(data.train.images[batch], device)
        gen = step_generator(tc.seed + rank * RANK_SEED_STRIDE, step, device)
        loss = train_step(model, optimizer, corruptor, clean, gen, tc, step)
        meter.step()
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == tc.steps or done % tc.log_every == 0:
            metrics = {"step": done, "loss": float(loss), "start_step": start, "world_size": world, "nodes": nodes,
                       "interval_images_per_s": meter.interval(), **meter.summary()}
            save = done % tc.checkpoint_every == 0 or done == tc.steps
            if save and validation is not None:  # model selection: scored at every checkpoint
                metrics |= validation_metrics(network, cfg, validation, device)
            _report(metrics, network, optimizer, done, cfg, rank == 0 and save)  # (5)


def _count_nodes(world: int) -> int:
    """How many distinct Ray nodes the workers run on (gathered over the process group)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))


def _report(metrics: dict, network, optimizer, step: int, cfg: Config, with_checkpoint: bool) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (unwrapped weights, optimiser, step, config)."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", network, optimizer, step, cfg)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(Path(tmp) / "ckpt")))


class ProgressCallback(UserCallback):
    """Prints step, loss, images/s and ETA on the Train controller (Ray forwards it to the driver)."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.first_step = None

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        self.first_step = self.first_step if self.first_step is not None else (m["step"], time.time())
        done_since, since = m["step"] - self.first_step[0], time.time() - self.first_step[1]
        eta = (self.total - m["step"]) * since / done_since if done_since else float("nan")
        print(f"[rayad] step {m['step']}/{self.total} loss {m['loss']:.5f} "
              f"{m['interval_images_per_s'] or 0:.1f} img/s ({m['world_size']} workers) ETA {eta:.0f}s"
              + (" checkpoint" if checkpoint else ""), flush=True)


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray sized to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        # A local start includes the dashboard: Train's placement-group cleanup uses its state API.
        ray.init(address=address, log_to_driver=log_to_driver)
    except ConnectionError as e:
        raise RayadError(f"cannot reach the Ray cluster at {address!r} ({e})") from None


def check_resources(cluster: Cluster) -> None:
    """Fail within seconds (Ray Train would wait forever) when the cluster cannot hold the workers."""
    total = ray.cluster_resources()
    need_cpu = cluster.workers * cluster.cpus_per_worker
    need_gpu = cluster.workers * cluster.gpus_per_worker if cluster.use_gpu else 0
    have_cpu, have_gpu = total.get("CPU", 0), total.get("GPU", 0)
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise RayadError(f"asked for {describe(cluster)} = {need_cpu:g} CPU, {need_gpu:g} GPU; "
                         f"the cluster has {have_cpu:g} CPU, {have_gpu:g} GPU")


def describe(cluster: Cluster) -> str:
    gpu = f" + {cluster.gpus_per_worker:g} GPU" if cluster.use_gpu else ""
    return f"{cluster.workers} worker(s) x {cluster.cpus_per_worker:g} CPU{gpu}"


def scaling_config(cluster: Cluster) -> ScalingConfig:
    resources = {"CPU": cluster.cpus_per_worker} | ({"GPU": cluster.gpus_per_worker} if cluster.use_gpu else {})
    return ScalingConfig(num_workers=cluster.workers, use_gpu=cluster.use_gpu, resources_per_worker=resources,
                         placement_strategy=cluster.placement)


def worker_threads(cluster: Cluster) -> int:
    """torch threads per worker: its CPU share (Ray sets OMP_NUM_THREADS, torch needs it explicitly)."""
    return cluster.threads_per_worker or max(1, int(cluster.cpus_per_worker))


def fit_distributed(cfg: Config, data_root: str | Path, category: str, out_dir: str | Path, cluster: Cluster,
                    progress: bool = True) -> Path:
    """Train with Ray Train, calibrate on the driver and write the artifact to `out_dir`.

    Re-running with the same `out_dir` resumes from the run's latest checkpoint in storage.
    """
    started = time.time()
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_train_data(cfg, data_root, category, out_dir)  # validates data and fills the cache once
    connect(cluster.address)
    check_resources(cluster)
    threads = worker_threads(cluster)
    storage = cluster.storage or str(out_dir / "ray")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data_root": str(Path(data_root).absolute()),
                           "category": category, "threads": threads, "started": started},
        scaling_config=scaling_config(cluster),
        run_config=RunConfig(name="train", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[ProgressCallback(cfg.train.steps)] if progress else None),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RayadError("training finished without a checkpoint")
    network = build_anomaly_model(cfg).network
    with result.checkpoint.as_directory() as directory:
        meta = load_checkpoint(directory, network)
    device = "cuda" if cluster.use_gpu and torch.cuda.is_available() else "cpu"
    info = {"steps": meta["step"], "workers": cluster.workers, "nodes": result.metrics.get("nodes"),
            "images_per_s": result.metrics.get("images_per_s"),
            "seconds_to_first_step": result.metrics.get("seconds_to_first_step"),
            "final_loss": result.metrics.get("loss"), "resumed_from_step": result.metrics.get("start_step"),
            "checkpoint": result.checkpoint.path}
    return finalize(network, cfg, data.val, out_dir, device, info)
