"""Single-process training, short enough to read in one sitting. Ray Train reuses `train_step` unchanged.

Every random choice of step k (batch and corruption) is seeded from (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rayad.artifact import Predictor, build_anomaly_model, save_artifact
from rayad.config import Config, TrainConfig
from rayad.corruption import Corruptor
from rayad.data.dataset import ImageSet, load_split, to_tensor
from rayad.data.manifest import build_manifest, save_manifest
from rayad.errors import RayadError
from rayad.models.loss import reconstruction_loss
from rayad.scoring import f1_threshold
from rayad.train.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, corruptor: Corruptor,
               clean: torch.Tensor, gen: torch.Generator, cfg: TrainConfig, step: int) -> torch.Tensor:
    """One optimisation step on a batch of clean images in [0, 1]; returns the loss (not synchronised)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    corrupted = corruptor(clean, gen)
    use_amp = cfg.amp and clean.device.type == "cuda"
    with torch.autocast(device_type=clean.device.type, dtype=torch.bfloat16, enabled=use_amp):
        output = model(corrupted.inputs.contiguous(memory_format=torch.channels_last))
    loss = reconstruction_loss(output, corrupted.targets, corrupted.mask, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 batch -> float tensor on `device`; through pinned memory and a non-blocking copy on GPU."""
    batch = to_tensor(images)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def load_train_data(cfg: Config, data_root: str | Path, category: str, out_dir: Path | None = None) -> TrainData:
    """Build the manifest (saved to `out_dir` when given) and load the train and validation images."""
    manifest = build_manifest(data_root, category, cfg.data)
    if out_dir is not None:
        save_manifest(manifest, out_dir / "manifest.parquet")
    size, policy = cfg.data.image_size, cfg.data.on_bad_image
    data = TrainData(load_split(manifest, "train", size, policy), load_split(manifest, "val", size, policy))
    if len(data.train.images) == 0:
        raise RayadError(f"{data_root}/{category}: no usable training images")
    if len(data.val.images) == 0:
        raise RayadError(f"{data_root}/{category}: no validation images to calibrate the threshold on "
                         "(set data.val_fraction > 0)")
    return data


def fit(cfg: Config, data_root: str | Path, category: str, out_dir: str | Path, resume: bool = False,
        device: str | None = None, progress: bool = True) -> Path:
    """Train, calibrate on the validation split and write the model artifact to `out_dir`."""
    meter = Throughput(cfg.train.batch_size)
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None and not resume:
        raise RayadError(f"{out_dir} already holds checkpoints; pass --resume to continue, or pick a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = torch.device(device) if device else default_device()
    data = load_train_data(cfg, data_root, category, out_dir)

    torch.manual_seed(tc.seed)
    model = build_anomaly_model(cfg).network.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, tc)
    start = 0
    if resume and latest is not None:
        start = _resume(latest, model, optimizer, cfg)
    corruptor = Corruptor(cfg.corruption)
    model.train()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    loss = None
    with (out_dir / "train_log.jsonl").open("a") as history:
        for step in bar:
            idx = batch_indices(len(data.train.images), tc.batch_size, step, tc.seed)
            clean = to_device(data.train.images[idx], device)
            loss = train_step(model, optimizer, corruptor, clean, step_generator(tc.seed, step, device), tc, step)
            meter.step()
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                record = {"step": done, "loss": float(loss), "lr": lr_at(step, tc), "images_per_s": meter.interval()}
                history.write(json.dumps(record) + "\n")
                history.flush()
                bar.set_postfix(loss=f"{record['loss']:.5f}", img_s=f"{record['images_per_s'] or 0:.1f}")
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                save_checkpoint(checkpoints / checkpoint_name(done), model, optimizer, done, cfg)
                prune_checkpoints(checkpoints)
    info = {"steps": tc.steps, "final_loss": None if loss is None else float(loss), **meter.summary()}
    return finalize(model, cfg, data.val, out_dir, device, info)


def finalize(network: torch.nn.Module, cfg: Config, val: ImageSet, out_dir: Path, device, train_info: dict
             ) -> Path:
    """Calibrate on the validation split and save the artifact: the threshold is the configured quantile of
    good scores, or F1-optimal when the validation split holds labelled anomalies."""
    model = build_anomaly_model(cfg)
    model.network.load_state_dict(network.state_dict())
    scores = Predictor(model, cfg, {}, str(device)).raw_scores(val.images)
    labels = val.labels
    threshold = f1_threshold(scores, labels) if labels.any() else None
    model.calibrate(scores[labels == 0], threshold)
    method = "f1" if labels.any() else f"quantile {cfg.scoring.threshold_quantile}"
    log.info("threshold %.6g (%s) from %d validation images", float(model.threshold), method, len(scores))
    validation = {"n_images": len(scores), "n_anomalous": int(labels.sum()), "threshold_method": method}
    return save_artifact(model, cfg, out_dir, {"train": train_info, "validation": validation})


def _resume(checkpoint: Path, model, optimizer, cfg: Config) -> int:
    state_file = checkpoint / "state.json"
    saved = Config.from_dict(json.loads(state_file.read_text())["config"], str(state_file))
    if saved.replace({"train.steps": cfg.train.steps}) != cfg:
        raise RayadError(f"{checkpoint}: was trained with a different configuration; only train.steps may "
                         "change on --resume")
    step = int(load_checkpoint(checkpoint, model, optimizer)["step"])
    log.info("resuming from %s (step %d)", checkpoint, step)
    return step
