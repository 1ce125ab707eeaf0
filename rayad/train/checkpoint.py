"""Training checkpoints: weights and optimiser tensors in safetensors, the rest in JSON (no pickle); and the
latest checkpoint of a --workers run, as Ray Train recorded it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rayad.config import Config
from rayad.errors import ArtifactError, RayadError
from rayad.layout import follow_umask, storage_path

KEEP_LAST = 2
RESUME_EARLIER = "delete it to resume from the one before, or train into a new --out"  # a damaged checkpoint
RECORDED_ONLY = "Ray Train resumes only from the checkpoint it recorded: train into a new --out"  # of a --workers run
RUN_NAME = "train"  # Ray Train's run in its storage: STORAGE/train/checkpoint_*, and SNAPSHOT
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it restores from


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    config: Config, scaler: torch.amp.GradScaler | None = None, precision: str | None = None) -> Path:
    """Write `directory` atomically (a temp dir renamed into place); with fp16's loss `scaler`, its state too, and
    the `precision` the run trains in (a resumed run goes on in it)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    follow_umask(tmp / "model.safetensors")
    opt_state = optimizer.state_dict()
    tensors = {f"{index}/{name}": value.detach().cpu().contiguous()
               for index, state in opt_state["state"].items() for name, value in state.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    follow_umask(tmp / "optimizer.safetensors")
    meta = {"step": step, "config": config.to_dict(), "param_groups": opt_state["param_groups"],
            **({"grad_scaler": scaler.state_dict()} if scaler is not None else {}),
            **({"precision": precision} if precision else {})}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, fix: str = RESUME_EARLIER) -> dict[str, Any]:
    """Restore weights (and the optimiser's and fp16 loss scaler's state) in place; returns the JSON metadata
    (step, config). A scaler the checkpoint has no state for (it trained in another precision) starts afresh.
    `fix`: what to do when it is damaged."""
    directory = Path(directory)
    meta = read_state(directory, fix=fix)
    with damage_reported(directory, fix):
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
        if optimizer is not None:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in load_file(str(directory / "optimizer.safetensors")).items():
                index, name = key.split("/")
                state.setdefault(int(index), {})[name] = value
            _check_optimizer_shapes(optimizer, state)
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if scaler is not None and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
    return meta


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]]) -> None:
    """torch loads an optimiser's state without comparing shapes, and the first step would fail: a moment (such as
    Adam's exp_avg) must have its parameter's shape; only the step count is not one."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, tensors in state.items():
        if not 0 <= index < len(params):
            raise ValueError(f"optimizer.safetensors has state for parameter {index}; the model has {len(params)}")
        for name, value in tensors.items():
            if name != "step" and value.shape != params[index].shape:
                raise ValueError(f"optimizer.safetensors' {index}/{name} has shape {tuple(value.shape)}, "
                                 f"its parameter {tuple(params[index].shape)}")


def read_state(directory: str | Path, text: str | bytes | None = None, fix: str = RESUME_EARLIER) -> dict[str, Any]:
    """A checkpoint's JSON metadata: step, config and the optimiser's parameter groups (from `text`, where the
    caller read state.json itself, as from a storage URI). `fix`: what to do when it is damaged."""
    with damage_reported(directory, fix):
        meta = json.loads((Path(directory) / "state.json").read_text() if text is None else text)
        if not isinstance(meta, dict) or "config" not in meta:
            raise ValueError("state.json lacks the step or the config")
        step = meta.get("step")
        if type(step) is not int or step < 0:  # bool is an int to isinstance
            raise ValueError(f"state.json's step is {step!r}, not a step count")
    return meta


@contextmanager
def damage_reported(directory: str | Path, fix: str = RESUME_EARLIER) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"{directory}: damaged checkpoint ({type(e).__name__}: {e}); {fix}") from None


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step under `checkpoints_dir`, or None."""
    found = sorted(Path(checkpoints_dir).glob("step_*/state.json")) if Path(checkpoints_dir).is_dir() else []
    return found[-1].parent if found else None


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def prune_checkpoints(checkpoints_dir: str | Path, keep: int = KEEP_LAST) -> None:
    for old in sorted(Path(checkpoints_dir).glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_recorded(storage: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint a rerun of the run whose storage is `storage` (a path or a pyarrow URI) resumes from: the
    latest that Ray Train recorded in its snapshot (a checkpoint folder it had not recorded yet is not one), as
    where it is (a path, or a URI) and its state (step, config). None before the first."""
    fs, run = _run_folder(storage, RUN_NAME)
    latest = (read_snapshot(fs, run, "train into a new --out").get("latest_checkpoint_result") or {}
              ).get("checkpoint_dir_name")
    if not latest:
        return None
    where = storage_path(storage, RUN_NAME, latest)
    with damage_reported(where, RECORDED_ONLY), fs.open_input_stream(f"{run}/{latest}/state.json") as state:
        text = state.read()
    return where, read_state(where, text, RECORDED_ONLY)


def recorded_reports(storage: str, name: str) -> dict[str, dict[str, Any]]:
    """The reports with a checkpoint that Ray Train recorded for its run `name` in `storage` (the latest, and those
    it keeps): their metrics by the checkpoint's folder name."""
    fs, run = _run_folder(storage, name)
    snapshot = read_snapshot(fs, run, "the run cannot resume")
    results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result") or {},
               *snapshot.get("pending_training_results", [])]
    return {r["checkpoint_dir_name"]: r["metrics"] for r in results if r.get("checkpoint_dir_name")}


def delete_unrecorded(storage: str, name: str, recorded: Iterable[str]) -> list[str]:
    """Delete the checkpoint folders of the ended run `name` in `storage` but those in `recorded` (its
    `recorded_reports`): written as the run was stopped, nothing resumes from them, and Ray Train's pruning skips
    them. Returns their names."""
    fs, run = _run_folder(storage, name)
    keep = set(recorded)
    found = fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
    unrecorded = sorted(f.base_name for f in found if f.type == pyarrow.fs.FileType.Directory
                        and f.base_name.startswith("checkpoint_") and f.base_name not in keep)
    for folder in unrecorded:
        fs.delete_dir(f"{run}/{folder}")
    return unrecorded


def read_snapshot(fs: pyarrow.fs.FileSystem, run: str, fix: str) -> dict[str, Any]:
    """Ray Train's record of the run's checkpoints (a JSON object; empty before the first checkpoint)."""
    snapshot = f"{run}/{SNAPSHOT}"
    if fs.get_file_info(snapshot).type != pyarrow.fs.FileType.File:
        return {}
    try:
        with fs.open_input_stream(snapshot) as recorded:
            record = json.loads(recorded.read())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{snapshot}: Ray Train's record of the run's checkpoints is unreadable "
                            f"({type(e).__name__}: {e}); {fix}") from None
    return record


def _run_folder(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)  # an absolute path, or a URI
    except ValueError as e:  # pyarrow's ArrowInvalid: an unknown scheme, a query it does not take
        raise RayadError(f"{storage}: not a path or storage URI that pyarrow opens ({e}); check --storage") from None
    except OSError as e:  # an S3 bucket whose region cannot be resolved (no network, no such bucket)
        raise RayadError(f"{storage}: pyarrow cannot open it ({e}); check --storage") from None
    return fs, f"{root}/{name}"
