"""Numeric precision of training and scoring: fp32, or bf16 / fp16 autocast; `auto` measures.

`auto` picks bf16 only where the device has bf16 units (a CPU with `avx512_bf16` or `amx_bf16`, a CUDA
device of the Ampere generation or newer) and a short probe of this very network shows bf16 faster than
fp32: on a GPU, a small network at a small batch is bound by kernel launches, and autocast's casts can
make bf16 slower. The probe's timings are cached per device model, torch version, network shape and
batch (not thread count, so that every process on a machine decides alike). A model artifact records
the scoring precision it was calibrated in, and every consumer of it scores in that precision wherever
the device runs it natively. See docs/design.md, "Precision".
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rayad.errors import ConfigError
from rayad.layout import write_json

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_BATCH = 2  # images a CPU probe times: a CPU's time per image hardly depends on the batch
PROBE_REPEATS = {"cpu": 2, "cuda": 5}  # timed passes after the warm-up; the fastest counts
PROBE_CACHE = "precision_probe.json"


@dataclass(frozen=True)
class Choice:
    """The precision a process runs in, and why (logged, and recorded in model.json)."""

    precision: str  # fp32 | bf16 | fp16
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"precision": self.precision, "reason": self.reason}


def autocast(precision: str, device: torch.device | str):
    """The autocast context of `precision` on `device` (a no-op for fp32)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", platform.machine()), frozenset(fields.get("flags", "").split())


def cpu_summary() -> str:
    """This CPU's model name and which bf16 flags it has, as benchmarks name the machine."""
    name, flags = cpu_info()
    return f"{name} ({', '.join(f for f in CPU_BF16_FLAGS if f in flags) or 'no bf16 flags'})"


def default_device() -> torch.device:
    """This process's device: in a Ray task or actor, cuda only when Ray reserved a GPU for it (an actor
    without one must not take memory on a GPU it was not given); elsewhere cuda when one is visible."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return torch.device("cuda")


def driver_device(use_gpu: bool) -> torch.device:
    """Where a Ray job's driver calibrates and evaluates the model that its workers trained: its own GPU when the
    job trains on GPUs and it sees one, else its CPU (a KubeRay head has no GPU)."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def checked_device(device: str | torch.device) -> torch.device:
    """A device named by the caller, which this process can use."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: this process sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r}: rayad runs on cpu or cuda")
    return device


def exact_cuda_math(deterministic: bool = False) -> None:
    """No TF32 in this process's CUDA convolutions and matmuls. cuDNN allows it by default, and it moved an
    H100's scores by up to 1.7e-3 against 6e-7 from the CPU's without it (docs/benchmarks.md, "GPU"). With
    `deterministic`, also only deterministic kernels, so that a CUDA run repeats bit for bit at some cost
    in speed."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def cuda_bf16_native(device: torch.device) -> bool:
    """bf16 convolutions and matmuls run natively from compute capability 8.0 (Ampere)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def check_precision(requested: str, device: torch.device | str) -> None:
    """Refuse a precision that is not one, or fp16 off CUDA."""
    if requested != "auto" and requested not in DTYPES:
        raise ConfigError(f"precision {requested!r}: use auto, {', '.join(DTYPES)}")
    if requested == "fp16" and torch.device(device).type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (this one is {torch.device(device).type}); use bf16 "
                          "or fp32")


def as_begun(requested: str, recorded: str | None, device: torch.device) -> Choice | None:
    """`auto`'s choice for a resumed run: the precision its checkpoint recorded, so that it goes on as it began
    (a probe now may decide otherwise: another cache, machine or torch); None to decide anew."""
    if requested != "auto" or recorded not in ("fp32", "bf16", "fp16") or recorded == "fp16" and device.type != "cuda":
        return None
    return Choice(recorded, "as the run began (auto chose it then)")


# bf16 is chosen only when it takes at most this share of fp32's time: where the two are near a tie, probes
# (a new cache, another node's) would pick either, and runs of the same seed would train in different precisions
BF16_MARGIN = 0.9


def resolve(requested: str, device: torch.device | str, probe: Callable[[], dict[str, float]],
            cpu_flags: frozenset[str] | None = None, cuda_native: bool | None = None) -> Choice:
    """The precision to run `requested` (auto | fp32 | bf16 | fp16) in on `device`. `probe` returns the
    seconds per step in fp32 and bf16; it is only called for `auto` on a device with bf16 units."""
    device = torch.device(device)
    check_precision(requested, device)
    if requested != "auto":
        return Choice(requested, "configured")
    if device.type == "cuda":
        if not (cuda_bf16_native(device) if cuda_native is None else cuda_native):
            return Choice("fp32", "CUDA device without native bf16 (before Ampere)")
    elif not native("bf16", device, cpu_flags):
        return Choice("fp32", f"CPU without bf16 units ({' / '.join(CPU_BF16_FLAGS)})")
    seconds = probe()
    faster = seconds["bf16"] <= BF16_MARGIN * seconds["fp32"]
    where = "GPU" if device.type == "cuda" else "CPU"
    timings = f"bf16 {seconds['bf16'] * 1e3:.1f} ms, fp32 {seconds['fp32'] * 1e3:.1f} ms a step"
    return Choice("bf16" if faster else "fp32", f"probe on this {where}: {timings}")


def native(precision: str, device: torch.device | str, cpu_flags: frozenset[str] | None = None) -> bool:
    """Whether `device` runs `precision` natively (fp32 always; bf16 with bf16 units; fp16 on CUDA)."""
    device = torch.device(device)
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or cuda_bf16_native(device)
    flags = cpu_info()[1] if cpu_flags is None else cpu_flags
    return precision == "bf16" and bool(flags & set(CPU_BF16_FLAGS))


def probe_network(network: nn.Module, image_size: int, training: bool, device: torch.device | str,
                  batch_size: int) -> Callable[[], dict[str, float]]:
    """A cached probe of `network`: seconds per forward (and backward, when `training`) pass in fp32 and
    in bf16, of `batch_size` images on a GPU, PROBE_BATCH on a CPU. Runs on a copy, so the network's state
    is untouched."""
    device = torch.device(device)
    batch = batch_size if device.type == "cuda" else PROBE_BATCH

    def measure() -> dict[str, float]:
        model = copy.deepcopy(network).train(training)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, image_size, image_size, generator=gen).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        return {p: _seconds_per_pass(model, x, p, training) for p in ("fp32", "bf16")}

    def cached() -> dict[str, float]:
        # No thread count in the key: every process on the machine, whatever its CPU share, decides alike.
        key = {"device": device_name(device), "torch": torch.__version__, "training": training,
               "size": image_size, "batch": batch, "network": _shape_signature(network),
               **({"tf32": torch.backends.cudnn.allow_tf32} if device.type == "cuda" else {})}  # fp32's speed
        return _cached(key, measure)

    return cached


def device_name(device: torch.device) -> str:
    """The model of the CPU or GPU behind `device`: what a probe's timings hold for."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()[0]


def _seconds_per_pass(model: nn.Module, x: torch.Tensor, precision: str, training: bool) -> float:
    def one_pass():
        with torch.set_grad_enabled(training), autocast(precision, x.device):
            out = model(x)
        if training:
            out.float().pow(2).mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    one_pass()  # warm-up: kernel selection, allocations
    best = float("inf")
    for _ in range(PROBE_REPEATS[x.device.type]):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return best


def _shape_signature(network: nn.Module) -> str:
    """Names, shapes and types of every parameter: the same for the same architecture."""
    shapes = [(name, tuple(p.shape), str(p.dtype)) for name, p in network.named_parameters()]
    return hashlib.sha1(repr(shapes).encode()).hexdigest()[:16]


def _cached(key: dict, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    from rayad.data.dataset import cache_dir  # the image cache's folder (RAYAD_CACHE_DIR)

    path, name = cache_dir() / PROBE_CACHE, json.dumps(key, sort_keys=True)
    entries = _read_json(path)
    if not _is_timing(entries.get(name)):  # missing, or an entry this rayad did not write
        entries = {**_read_json(path), name: measure()}  # re-read: another process may have written
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, entries)
        except OSError as e:
            log.warning("could not cache the precision probe in %s: %s", path, e)
    return entries[name]


def _is_timing(entry: object) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(p), int | float) for p in ("fp32", "bf16"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
