"""The training loop: one function, `train_loop`, for every way rayad trains (docs/design.md, "Training").

`rayad train` runs it in this process as a world of one (`LocalSession`); `rayad train --workers N` and
every Tune trial run it in each Ray Train worker (`rayad.train.ray_train.RaySession`). A session supplies
what differs: rank and world size, the device, where checkpoints come from and where reports go.

Every random choice of step k (batch and corruption) is seeded from (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have. Step k's global batch is the batch of
`world_size x batch_size` images; rank r trains on its r-th slice, so ranks see disjoint data and one
worker reproduces the single-process run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from rayad.artifact import build_anomaly_model, calibrate_and_save, require_cpp_compiler
from rayad.config import Config, TrainConfig
from rayad.corruption import Corruptor
from rayad.cpu import use_cpus
from rayad.data.dataset import ImageSet, load_split, to_tensor
from rayad.data.manifest import (
    MIN_VAL_IMAGES,
    build_manifest,
    check_category,
    load_manifest,
    same_images,
    save_manifest,
    split_rows,
)
from rayad.errors import ConfigError, Interrupted, RayadError
from rayad.layout import (
    CHECKPOINTS,
    EVALUATION,
    EXPERIMENT,
    EXPORTED,
    MANIFEST,
    METADATA,
    RAY_STATE,
    TRAIN_LOG,
    TRIALS,
    WORKERS_RUN,
    atomic_write,
    evaluations,
    ray_storage,
    refuse_other_kinds,
    same_storage,
    write_json,
    writing,
)
from rayad.models.loss import reconstruction_loss
from rayad.precision import (
    as_begun,
    autocast,
    check_precision,
    checked_device,
    default_device,
    exact_cuda_math,
    probe_network,
    resolve,
)
from rayad.settings import cpu_count
from rayad.train.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    latest_recorded,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from rayad.validation import ValidationSet, load_validation, validation_metrics

log = logging.getLogger(__name__)
RANK_SEED_STRIDE = 7_919  # separates the corruption streams of different ranks
AUGMENT_SEED_OFFSET = 104_729  # separates the augmentation stream from the corruption stream
T = TypeVar("T")


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs besides the model config; Ray Train passes it to every worker as it is."""

    config: Config
    data_root: str
    category: str
    threads: int | None = None  # torch intra-op threads of the process; None keeps torch's default
    started: float = field(default_factory=time.time)  # when the command began (for time to first step)
    validate: bool = False  # score the validation set at every checkpoint (model selection in a search)
    val_root: str | None = None  # a labelled validation dataset instead of the synthesised one


class Session(Protocol):
    """What differs between running the loop in this process and in a Ray Train worker."""

    rank: int
    world_size: int
    device: torch.device

    def steps(self, start: int, total: int) -> Iterable[int]: ...

    def restore(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None: ...

    def broadcast(self, make: Callable[[], T]) -> T: ...

    def prepare(self, network: torch.nn.Module) -> torch.nn.Module: ...

    def count_nodes(self) -> int: ...

    def report(self, metrics: dict[str, Any], network: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, checkpoint: bool) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def scaled_lr(lr: float, workers: int) -> float:
    """`train.lr` is tuned for one worker's batch; the global batch is `workers` times larger and the
    learning rate grows with its square root (the usual rule for Adam-type optimisers)."""
    return lr * math.sqrt(workers)


def step_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step)
    return gen


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of step `step`'s batch: consecutive slices of a fresh seeded permutation per epoch."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out)


def augment(images: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random flips ("flip") or any of the 8 flips and quarter turns ("dihedral") per image, for materials
    that look alike in every orientation; "none" returns the batch as it is. Square images only."""
    if mode == "none":
        return images
    draws = torch.randint(0, 8 if mode == "dihedral" else 4, (len(images),), generator=gen).tolist()
    out = []
    for image, k in zip(images, draws, strict=True):
        image = image.flip(-1) if k & 1 else image
        image = image.flip(-2) if k & 2 else image
        out.append(image.transpose(-1, -2) if k & 4 else image)
    return torch.stack(out)


def is_due(done: int, every: int, total: int) -> bool:
    """Whether step `done` (1-based) ends an interval of `every` steps, or the run."""
    return done % every == 0 or done == total


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, corruptor: Corruptor,
               clean: torch.Tensor, gen: torch.Generator, cfg: TrainConfig, step: int, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimisation step on a batch of clean images in [0, 1]; returns the loss (not synchronised). The
    network runs in `precision` (autocast), the loss in fp32; fp16 needs the loss `scaler`."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    corrupted = corruptor(clean, gen)
    with autocast(precision, clean.device):
        output = model(corrupted.inputs.contiguous(memory_format=torch.channels_last))
    loss = reconstruction_loss(output, corrupted.targets, corrupted.mask, cfg)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 batch -> float tensor on `device`; through pinned memory and a non-blocking copy on GPU."""
    batch = to_tensor(images)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class Throughput:
    """Images/s since the last `interval()` and since the first step (which includes warm-up), plus the
    wall time from `started` (when the command began) to the end of the first step."""

    def __init__(self, images_per_step: int, started: float | None = None):
        self.images_per_step = images_per_step
        self.started = started if started is not None else time.time()
        self.steps, self.first_done, self.tick, self.tick_steps = 0, None, None, 0

    def step(self) -> None:
        self.steps += 1
        if self.first_done is None:
            self.first_done = self.tick = time.time()
            self.tick_steps = 1

    def interval(self) -> float | None:
        now, steps = time.time(), self.steps - self.tick_steps
        rate = steps * self.images_per_step / (now - self.tick) if steps and now > self.tick else None
        self.tick, self.tick_steps = now, self.steps
        return rate

    def summary(self) -> dict[str, float | None]:
        steps = self.steps - 1
        elapsed = time.time() - self.first_done if self.first_done else 0.0
        return {"seconds_to_first_step": (self.first_done or time.time()) - self.started,
                "images_per_s": steps * self.images_per_step / elapsed if steps and elapsed else None}


@dataclass
class TrainData:
    train: ImageSet
    val: ImageSet
    manifest: pa.Table  # what the run saves as RUN_DIR/manifest.parquet


def load_train_data(cfg: Config, data_root: str | Path, category: str) -> TrainData:
    """Build the manifest and load the train and validation images."""
    manifest = build_manifest(data_root, category, cfg.data)
    d = cfg.data
    data = TrainData(*(load_split(manifest, split, d.image_size, d.on_bad_image, d.max_pixels)
                       for split in ("train", "val")), manifest)
    if len(data.train.images) == 0:
        raise RayadError(f"{data_root}/{category}: no usable training images")
    if len(data.val.images) < MIN_VAL_IMAGES:
        raise RayadError(f"{data_root}/{category}: {len(data.val.images) or 'no'} validation image(s) to calibrate "
                         f"the threshold on, where it needs {MIN_VAL_IMAGES} "
                         f"({_validation_advice(cfg, manifest, len(data.val.images))})")
    return data


def _validation_advice(cfg: Config, manifest: pa.Table, readable: int) -> str:
    """How to get the validation images calibration needs, for the reason there are too few."""
    listed = len(split_rows(manifest, "val"))
    if listed >= MIN_VAL_IMAGES:
        return f"{listed - readable} of the {listed} listed could not be read and were skipped (data.on_bad_image=skip)"
    if listed:  # carving gives none or MIN_VAL_IMAGES: these are the dataset's own held-out good images
        return f"the dataset's validation folder holds {listed}; add images to it"
    if cfg.data.val_fraction == 0:
        return "set data.val_fraction > 0"
    carve = f"carving them from the training images needs at least {MIN_VAL_IMAGES + 1}"
    if cfg.data.layout == "folder":
        lower = f" or lower data.test_fraction ({cfg.data.test_fraction})" if cfg.data.test_fraction else ""
        return f"{carve}; add images to {cfg.data.normal_dir}/{lower}"
    if cfg.data.layout == "visa":
        return f"{carve}; add normal images to split train"
    return f"{carve}; add images or a validation/good folder with {MIN_VAL_IMAGES} or more"


def train_loop(loop: LoopConfig, session: Session) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `loop.config` on this session's share of every batch; returns the (unwrapped) network and
    the last report's metrics."""
    cfg, rank, world = loop.config, session.rank, session.world_size
    use_cpus(loop.threads)
    if cfg.scoring.compile:  # calibration compiles: know before training that it can
        require_cpp_compiler(session.device)
    tc = dataclasses.replace(cfg.train, lr=scaled_lr(cfg.train.lr, world))
    data = load_train_data(cfg, loop.data_root, loop.category)
    validation = load_validation(cfg, loop.data_root, loop.category, loop.val_root) \
        if loop.validate and rank == 0 else None

    torch.manual_seed(tc.seed)
    if session.device.type == "cuda":  # from the start: validation's scoring turns TF32 off on rank 0 mid-run
        exact_cuda_math(deterministic=tc.deterministic)
    network = build_anomaly_model(cfg).network.to(session.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(network, tc)
    resumed = session.restore(network, optimizer)  # the checkpoint's state, None for a new run
    start = resumed["step"] if resumed else 0
    precision = as_begun(tc.precision, (resumed or {}).get("precision"), session.device) or session.broadcast(
        lambda: resolve(tc.precision, session.device, probe_network(
            network, cfg.data.image_size, training=True, device=session.device, batch_size=tc.batch_size)))
    if rank == 0:
        log.info("training in %s (%s)", precision.precision, precision.reason)
    scaler = torch.amp.GradScaler(session.device.type) if precision.precision == "fp16" else None
    if scaler is not None and (resumed or {}).get("grad_scaler"):  # a resumed fp16 run keeps its loss scale
        scaler.load_state_dict(resumed["grad_scaler"])
    model = session.prepare(network)
    nodes = session.count_nodes()
    corruptor = Corruptor(cfg.corruption)
    model.train()
    n, meter = len(data.train.images), Throughput(tc.batch_size * world, loop.started)
    metrics: dict[str, Any] = {"step": start, "loss": None, "start_step": start, "precision": precision.precision,
                               "precision_reason": precision.reason}
    for step in session.steps(start, tc.steps):
        global_batch = batch_indices(n, tc.batch_size * world, step, tc.seed)
        batch = global_batch[rank * tc.batch_size:(rank + 1) * tc.batch_size]
        clean = to_device(data.train.images[batch], session.device)
        clean = augment(clean, cfg.data.augment, step_generator(tc.seed + AUGMENT_SEED_OFFSET + rank, step, "cpu"))
        gen = step_generator(tc.seed + rank * RANK_SEED_STRIDE, step, session.device)
        loss = train_step(model, optimizer, corruptor, clean, gen, tc, step, precision.precision, scaler)
        meter.step()
        done = step + 1
        save = is_due(done, tc.checkpoint_every, tc.steps)
        if save or is_due(done, tc.log_every, tc.steps):
            metrics = {"step": done, "loss": float(loss), "lr": lr_at(step, tc), "start_step": start,
                       "world_size": world, "nodes": nodes, "interval_images_per_s": meter.interval(),
                       **meter.summary(), "precision": precision.precision, "precision_reason": precision.reason,
                       "logged_at": time.time()}  # a search recovers lost evaluations with their own time
            check_converging(metrics["loss"], done, tc, scaler)
            if save and validation is not None:  # model selection: scored at every checkpoint
                metrics |= validation_metrics(network, cfg, validation, session.device)
                metrics[EVALUATION] = evaluations(done, tc.checkpoint_every)
            session.report(metrics, network, optimizer, scaler, save)
    if loop.validate and start >= tc.steps:
        metrics = report_again(loop, session, network, optimizer, scaler, validation, metrics | {"nodes": nodes})
    return network, metrics


def report_again(loop: LoopConfig, session: Session, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, validation: ValidationSet | None, metrics: dict[str, Any]
                 ) -> dict[str, Any]:
    """A search's trial resumed at its last checkpoint (stopped after it, before the trial ended) trains no step,
    yet Tune's scheduler needs a score from every attempt, and the results store the checkpoint of its best: report
    that evaluation again, with its checkpoint (the store replaces the evaluation's row; Ray Train keeps the
    later of two equal checkpoints)."""
    cfg = loop.config
    metrics |= {"world_size": session.world_size, "logged_at": time.time(),
                EVALUATION: evaluations(metrics["step"], cfg.train.checkpoint_every)}
    if validation is not None:  # rank 0
        metrics |= validation_metrics(network, cfg, validation, session.device)
    session.report(metrics, network, optimizer, scaler, True)
    return metrics


def check_converging(loss: float, step: int, cfg: TrainConfig, scaler: torch.amp.GradScaler | None) -> None:
    """Stop a run whose loss is NaN or infinite: its weights are lost, and every score after would be too. In
    fp16 the loss scaler skips such steps itself."""
    if scaler is None and not math.isfinite(loss):
        raise RayadError(f"training diverged: the loss is {loss} at step {step}; lower train.lr (now {cfg.lr:g}) "
                         "or train.grad_clip")


class LocalSession:
    """The loop in this process: checkpoints in RUN_DIR/checkpoints, reports in RUN_DIR/train_log.jsonl."""

    rank, world_size = 0, 1

    def __init__(self, cfg: Config, out_dir: Path, device: torch.device, progress: bool):
        self.cfg, self.device, self.progress = cfg, device, progress
        self.checkpoints, self.log_file = out_dir / CHECKPOINTS, out_dir / TRAIN_LOG
        self.bar: tqdm | None = None

    def steps(self, start: int, total: int) -> Iterable[int]:
        self.bar = tqdm(range(start, total), initial=start, total=total, desc="train", unit="step",
                        disable=not self.progress, dynamic_ncols=True)
        return self.bar

    def restore(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Continue from the latest checkpoint, if any (`check_resumable` has checked it): its state.json."""
        latest = latest_checkpoint(self.checkpoints)
        if latest is None:
            return None
        state = load_checkpoint(latest, network, optimizer)
        log.info("resuming from %s (step %d)", latest, state["step"])
        return state

    def broadcast(self, make: Callable[[], T]) -> T:
        return make()

    def prepare(self, network: torch.nn.Module) -> torch.nn.Module:
        return network

    def count_nodes(self) -> int:
        return 1

    def report(self, metrics: dict[str, Any], network: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, checkpoint: bool) -> None:
        with self.log_file.open("a") as history:
            history.write(json.dumps(metrics) + "\n")
        if self.bar is not None and metrics.get("loss") is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.5f}", img_s=f"{metrics['interval_images_per_s'] or 0:.1f}")
        if checkpoint:
            save_checkpoint(self.checkpoints / checkpoint_name(metrics["step"]), network, optimizer,
                            metrics["step"], self.cfg, scaler, metrics.get("precision"))
            prune_checkpoints(self.checkpoints)


def check_resumable(checkpoint: str, state: dict[str, Any], cfg: Config, data_root: str | Path, manifest: pa.Table,
                    saved_manifest: Path, model_steps: int | None) -> int:
    """A run continues only as it began: the same configuration but for train.steps, which must be beyond the
    checkpoint's step (or at it, when the folder holds no model of that step), and the same images. Returns
    the checkpoint's step."""
    saved = Config.from_dict(state["config"], f"{checkpoint}/state.json").replace({"train.steps": cfg.train.steps})
    if saved != cfg:
        then, now = saved.to_dict(), cfg.to_dict()
        changed = [f"{section}.{key}: {then[section][key]!r} then, {value!r} now" for section in now
                   for key, value in now[section].items() if then[section][key] != value]
        raise RayadError(f"{checkpoint}: was trained with a different configuration ({'; '.join(changed)}); only "
                         "train.steps may change on --resume")
    if saved_manifest.is_file() and not same_images(saved_images := load_manifest(saved_manifest), manifest, data_root):
        validation = [len(split_rows(m, "val")) for m in (saved_images, manifest)]
        if validation == [1, MIN_VAL_IMAGES] and saved_images.num_rows == manifest.num_rows:
            raise RayadError(f"{saved_manifest}: the run calibrates on 1 validation image, carved by an earlier rayad; "
                             f"rayad now carves at least {MIN_VAL_IMAGES} (one gives no standard deviation): train it "
                             "again in a new --out")
        raise RayadError(f"{saved_manifest}: the run was trained on other images; resume with the --data, "
                         "--category and data.* settings it began with")
    if state["step"] > cfg.train.steps or (state["step"] == cfg.train.steps == model_steps):
        raise RayadError(f"{checkpoint}: the run already reached step {state['step']}, and train.steps is "
                         f"{cfg.train.steps}; raise --steps to train it further")
    return state["step"]


def check_buildable(cfg: Config, device: torch.device | str, scoring_device: torch.device | str | None = None) -> None:
    """What only building the run checks (the model's and the corruption's names, a pretrained file, fp16 off
    CUDA, a C++ compiler for scoring.compile), checked before the run writes its first file. The model trains on
    `device` and is calibrated on `scoring_device` (default: the same)."""
    scoring_device = scoring_device or device
    if cfg.model.pretrained_file and cfg.model.encoder == "sdc":
        raise ConfigError("model.pretrained_file: only a timm model.encoder reads one; the sdc encoder trains from "
                          "scratch")
    network = build_anomaly_model(cfg).network
    if cfg.model.encoder != "sdc":
        check_runs_at_size(network, cfg)
    Corruptor(cfg.corruption)
    check_precision(cfg.train.precision, device)
    check_precision(cfg.scoring.precision, scoring_device)
    if cfg.scoring.compile:
        require_cpp_compiler(scoring_device)


def check_runs_at_size(network: torch.nn.Module, cfg: Config) -> None:
    """A timm encoder may take only the input size it was made for (vision transformers): one image at
    data.image_size through the network tells."""
    size = cfg.data.image_size
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, cfg.model.in_chans, size, size))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - what timm's models raise for a size they do not take varies
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.encoder = {cfg.model.encoder!r} does not run at data.image_size = {size} "
                          f"({reason}); pick another encoder or size") from None


def fit(cfg: Config, data_root: str | Path, category: str, out_dir: str | Path, resume: bool = False,
        device: str | None = None, progress: bool = True) -> Path:
    """Train in this process, calibrate on the validation split and write the model artifact to `out_dir`."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg: a rayad.config.Config (load_config builds one), not a {type(cfg).__name__}")
    check_category(category)
    started = time.time()
    out_dir = Path(out_dir)
    device = checked_device(device) if device else default_device()
    with writing(out_dir):
        latest = latest_checkpoint(out_dir / CHECKPOINTS)
        resumed = check_run_folder(cfg, data_root, category, out_dir, resume,
                                   None if latest is None else (str(latest), read_state(latest)))
        check_buildable(cfg, device)
        data = load_train_data(cfg, data_root, category)  # validates the data, fills the cache once
        logged = begin_run_files(out_dir, resumed, data.manifest)
        session = LocalSession(cfg, out_dir, device, progress)
        loop = LoopConfig(cfg, str(data_root), category, threads=cfg.train.num_threads or cpu_count(), started=started)
        try:
            network, metrics = train_loop(loop, session)
            # a run stopped between its last checkpoint and its model resumes without a step: its loss is the log's
            final_loss = metrics["loss"] if metrics["loss"] is not None else (logged or {}).get("loss")
            info = {"category": category, "steps": cfg.train.steps, "final_loss": final_loss, "threads": loop.threads,
                    **{k: metrics.get(k) for k in ("seconds_to_first_step", "images_per_s", "precision",
                                                   "precision_reason")}}
            return calibrate_and_save(network, cfg, data.val, out_dir, session.device, info)
        except KeyboardInterrupt:
            latest = latest_checkpoint(out_dir / CHECKPOINTS)
            raise stopped(None if latest is None else str(latest), resume) from None


def stopped(checkpoint: str | None, resume: bool) -> KeyboardInterrupt:
    """What a run stopped by Ctrl-C or SIGTERM raises: `Interrupted`, naming its last checkpoint and the
    command that resumes it, or a plain KeyboardInterrupt before its first checkpoint."""
    if checkpoint is None:
        return KeyboardInterrupt()
    return Interrupted(f"stopped; its last checkpoint is {checkpoint}",
                       "the same command" + ("" if resume else " and --resume"))


def check_run_folder(cfg: Config, data_root: str | Path, category: str, out_dir: Path, resume: bool,
                     latest: tuple[str, dict[str, Any]] | None, distributed: bool = False,
                     storage: str | None = None) -> int | None:
    """What a training run may do in `out_dir`, given its latest checkpoint (where, and its state): start in a
    new folder, or resume the run it holds as it began (a --workers run, in the `storage` it began with). Returns
    the step it resumes from (None for a new run)."""
    began = workers_run(out_dir)  # a --workers run, whose checkpoints are in its --storage
    if began is not None and not (distributed and same_storage(began["storage"], storage)) and latest_recorded(
            ray_storage(began["storage"], out_dir, str((out_dir / RAY_STATE).absolute()))) is not None:
        where = f" and --storage {began['storage']}" if began["storage"] else " (and no --storage)"
        raise RayadError(f"{out_dir} holds a --workers run ({WORKERS_RUN}); resume it with --workers{where}, or "
                         "train into a new folder")
    refuse_other_kinds(out_dir, (EXPERIMENT, TRIALS, EXPORTED), "train into a new folder")
    other = out_dir / (CHECKPOINTS if distributed else RAY_STATE)  # the other kind of run's checkpoints
    if (latest_checkpoint(other) if distributed else latest_recorded(str(other.absolute()))) is not None:
        raise RayadError(f"{out_dir} holds a {'single-process' if distributed else '--workers'} run ({other}); "
                         f"resume it {'without' if distributed else 'with'} --workers, or train into a new folder")
    if latest is not None and not resume:
        raise RayadError(f"{out_dir}: its run has checkpoints ({latest[0]}); resume them (--resume, or "
                         "resume=True), or train into a new folder")
    if latest is None and (out_dir / METADATA).exists():
        raise RayadError(f"{out_dir} already holds a model{' and no checkpoint to resume' if resume else ''}; train "
                         "into a new folder")
    if latest is None and resume:  # a mistyped --out would otherwise start a new run
        raise RayadError(f"{out_dir}: no checkpoint to resume; train without --resume to start a run there")
    if latest is None:
        return None
    return check_resumable(*latest, cfg, data_root, build_manifest(data_root, category, cfg.data),
                           out_dir / MANIFEST, model_steps=trained_steps(out_dir))


def trained_steps(out_dir: Path) -> int | None:
    """The steps of the model written in `out_dir` (its model.json's train.steps); None without a readable one. A
    run given more steps on --resume and stopped after its last checkpoint still holds the model of fewer."""
    try:
        steps = json.loads((out_dir / METADATA).read_text())["train"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def workers_run(out_dir: Path) -> dict[str, Any] | None:
    """The record of the --workers run in `out_dir` ({"storage": its --storage or None}); None where there is none.
    A damaged one is named."""
    try:
        record = json.loads((out_dir / WORKERS_RUN).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RayadError(f"{out_dir / WORKERS_RUN}: unreadable ({e}); it says where the run keeps its checkpoints"
                         ) from None
    if not isinstance(record, dict) or not isinstance(record.get("storage"), str | None):
        raise RayadError(f"{out_dir / WORKERS_RUN}: not a record of a --workers run")
    return record


def begin_run_files(out_dir: Path, resumed: int | None, manifest: pa.Table, storage: str | None = None,
                    distributed: bool = False) -> dict[str, Any] | None:
    """The run's first writes, once every check has passed (a run refused leaves its folder as it was): its
    manifest, for a --workers run where its checkpoints are (its `storage`), and its log as it goes on: a new run
    (or one stopped before its first checkpoint) starts train_log.jsonl again, a resumed one keeps what it logged
    up to its checkpoint. Returns the last report kept."""
    save_manifest(manifest, out_dir / MANIFEST)
    if distributed:
        write_json(out_dir / WORKERS_RUN, {"storage": storage})
    else:  # of a --workers run stopped before its first checkpoint
        (out_dir / WORKERS_RUN).unlink(missing_ok=True)
    if resumed is None:
        (out_dir / TRAIN_LOG).unlink(missing_ok=True)
        return None
    return keep_log_until(out_dir / TRAIN_LOG, resumed)


def keep_log_until(log_file: Path, step: int) -> dict[str, Any] | None:
    """Drop the reports a stopped run logged past `step`, which it logs again when resumed from there, and a
    line a kill cut short; returns the last report kept."""
    if not log_file.is_file():
        return None
    lines = log_file.read_text().splitlines()
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    if len(kept) < len(lines):
        atomic_write(log_file, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
    return json.loads(kept[-1]) if kept else None
