"""The settings of each kind of job, with their defaults: the one place every default is written.

The command line (`rayad.cli`) reads its defaults from here, so this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayad.config import MAX_SEED, coerce
from rayad.data.images import MAX_IMAGE_PIXELS, PILLOW_MAX_PIXELS
from rayad.errors import ConfigError, RayadError

LOCAL_HOST = "127.0.0.1"  # servers bind to loopback unless --host says otherwise
SERVE_PORT, DASHBOARD_PORT = 8000, 8501
PREDICT_BATCH = 32  # images per forward pass in offline scoring
DEMO_SPACE = "demo"  # tune_spaces/demo.yaml
DEMO_TRIALS = 4  # per category: the demo takes 12-20 minutes on 2 cores with bf16 (docs/benchmarks.md)


def check_can_listen(host: str, port: int) -> None:
    """A server here (the dashboard's Streamlit, a local Ray's Serve proxy) would start, then fail on a taken port
    or an unknown host: say it in one line first, blaming the flag at fault."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as those servers bind
        try:
            probe.bind((host, port))
        except socket.gaierror as e:
            raise RayadError(f"--host {host}: not a usable host name or address ({e.strerror})") from None
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise RayadError(f"--host {host}: not an address of this machine ({e.strerror})") from None
            raise RayadError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another "
                             "--port") from None


def coerce_fields(settings: Any, where: str) -> None:
    """Check a frozen settings dataclass's values against its fields' types (`rayad.config.coerce`), in place;
    errors name the field after `where`."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        object.__setattr__(settings, f.name, coerce(getattr(settings, f.name), hints[f.name], f"{where}{f.name}"))


def check_rules(settings: Any, kind: str, rules: list[tuple[str, bool, str]], flag: typing.Callable[[str], str]
                ) -> None:
    """Refuse the first of `rules` (name, holds, what it must be) that fails, in one line naming the setting and
    the flag that sets it (`flag(name)`, "" for none)."""
    for name, holds, need in rules:
        if not holds:
            given = f" ({flag(name)})" if flag(name) else ""
            raise ConfigError(f"{kind} setting {name} = {getattr(settings, name)!r}{given}: must be {need}")


def _cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask): its torch thread count, unless told otherwise."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(cpus: float) -> int:
    """The torch threads of a Ray worker, actor or replica that reserved `cpus`: its whole CPUs, at least 1."""
    return max(1, int(cpus))


def absolute_path(value: str | os.PathLike | None) -> str | None:
    """A local path made absolute; a URI (or None) as given."""
    return value if value is None or "://" in str(value) else str(Path(value).absolute())


RAY_DECIMALS = 4  # of a fractional resource request


@dataclass(frozen=True)
class Cluster:
    """How to run on Ray Train: worker count and resources, where Ray is, where checkpoints go."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: the smallest node's cores shared by the workers (with_worker_cpus)
    gpus_per_worker: float = 1.0  # used when use_gpu; fractions share a GPU between workers
    address: str | None = None
    storage: str | None = None  # local path or pyarrow URI (file://, s3://, gs://); default RUN_DIR/ray
    max_failures: int = 0
    placement: str = "PACK"  # or SPREAD: one worker per node where possible
    threads_per_worker: int | None = None

    def __post_init__(self) -> None:
        coerce_fields(self, "cluster setting ")
        object.__setattr__(self, "storage", absolute_path(self.storage))  # Ray reads a relative path as a URI
        cpus = self.cpus_per_worker
        check_rules(self, "cluster", [
            ("workers", self.workers >= 1, ">= 1"),
            ("cpus_per_worker", cpus is None or cpus > 0, "> 0"),
            ("gpus_per_worker", self.gpus_per_worker > 0 or not self.use_gpu, "> 0 where workers use GPUs"),
            ("max_failures", self.max_failures >= 0, ">= 0"),
            ("placement", self.placement in ("PACK", "SPREAD"), "PACK or SPREAD (--spread)"),
            ("threads_per_worker", self.threads_per_worker is None or self.threads_per_worker >= 1, ">= 1"),
            # else Ray's ControllerError, after the search began
            *((name, value is None or value == round(value, RAY_DECIMALS),
               f"a count to {RAY_DECIMALS} decimal places (Ray's)")
              for name, value in (("cpus_per_worker", cpus), ("gpus_per_worker", self.gpus_per_worker))),
        ], lambda name: "" if name in ("placement", "threads_per_worker") else _cli_flag(name))

    def describe(self) -> str:
        gpu = f" + {self.gpus_per_worker:g} GPU" if self.use_gpu else ""
        return f"{self.workers} worker(s) x {self.cpus_per_worker:g} CPU{gpu}"

    @property
    def worker_threads(self) -> int:
        """torch threads per worker: its CPU share (Ray sets OMP_NUM_THREADS, torch needs it explicitly)."""
        return self.threads_per_worker or threads_for(self.cpus_per_worker)


@dataclass(frozen=True)
class SearchSettings:
    """Everything that defines an experiment; saved in experiment.json and reused by --resume."""

    data_root: str
    category: str
    space: str
    trials: int = 8
    concurrent: int | None = None  # default: as many trials as the cluster's resources hold
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    metric: tuple[str, ...] = ()  # several = multi-objective (ASHA and the best model use the first)
    mode: tuple[str, ...] = ()
    scheduler: str = "asha"  # or "fifo": every trial runs to the end
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 3
    search_seed: int = 0  # Optuna's sampler (train.seed, set with --seed, seeds the trials' training)
    startup_trials: int | None = None  # random trials before TPE models the results; default: tpe_startup_trials
    val_root: str | None = None
    config_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None  # Tune and Train storage (a path or URI all nodes see); default EXP_DIR
    max_failures: int = 0  # Train worker failures each trial recovers from
    mlflow: str | None = None  # MLflow tracking URI: each trial and the best model are logged there too

    def __post_init__(self) -> None:
        """Values checked against the fields' types (one metric or mode may be a plain string), and local paths
        made absolute: a trial runs in its own working folder, a resume may start elsewhere, and Ray reads a
        relative storage path as a URI."""
        for name in ("metric", "mode"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        coerce_fields(self, "SearchSettings.")
        for name in ("data_root", "val_root", "config_file", "space", "storage"):
            object.__setattr__(self, name, absolute_path(getattr(self, name)))
        check_rules(self, "search", [
            ("trials", self.trials >= 1, ">= 1"),
            ("workers_per_trial", self.workers_per_trial >= 1, ">= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "> 0"),
            ("gpus_per_worker", self.gpus_per_worker >= 0, ">= 0"),
            ("startup_trials", self.startup_trials is None or self.startup_trials >= 1, ">= 1"),
            ("concurrent", self.concurrent is None or self.concurrent >= 1, ">= 1"),
            ("grace_period", self.grace_period >= 1, ">= 1"),
            ("reduction_factor", self.reduction_factor >= 2, ">= 2"),
            ("max_failures", self.max_failures >= 0, ">= 0"),
            ("search_seed", 0 <= self.search_seed <= MAX_SEED, f"from 0 to {MAX_SEED}"),  # Optuna's range
            ("scheduler", self.scheduler in ("asha", "fifo"), "asha or fifo"),
        ], lambda name: "" if name == "reduction_factor" else _cli_flag(name))  # no flag sets it

    @property
    def tpe_startup_trials(self) -> int:
        """Optuna's default of 10 random trials would leave a small search random: a third of the trials,
        1 to 10, unless --startup-trials says otherwise (the enqueued default point counts as one)."""
        return self.startup_trials if self.startup_trials is not None else min(10, max(1, self.trials // 3))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchSettings:
        raw = {("search_seed" if k == "seed" else k): v for k, v in raw.items()}  # "seed" before rayad 0.2
        return cls(**{**raw, "metric": tuple(raw["metric"]), "mode": tuple(raw["mode"])})


@dataclass(frozen=True)
class ServeSettings:
    """What `rayad serve` and the Serve config file set."""

    models: dict[str, str] = field(default_factory=dict)  # model name -> artifact folder
    max_batch_size: int = 16
    batch_wait_s: float = 0.005
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    max_queued_requests: int = 64  # per scorer replica; beyond it requests get 503 at once
    # CPUs per scorer replica (its torch threads: the whole CPUs, at least 1); None: the smallest node's cores
    # shared by max_replicas (rayad.serve.app.scorer_cpus)
    replica_cpus: float | None = None
    replica_gpus: float = 0.0  # GPUs each scorer replica reserves (fractions share one); cuda only then
    ingress_cpus: float = 0.0
    max_upload_mb: float = 20.0  # one image
    max_batch_mb: float = 64.0  # a whole /v1/predict/batch body (its files are held: this bounds the ingress)
    max_pixels: int = MAX_IMAGE_PIXELS
    max_batch_images: int = 64
    api_key: str | None = None  # when set, requests need it in the X-API-Key header (or a Bearer token)

    def __post_init__(self):
        """Checked here, so that `rayad serve` and a Serve config file fail alike, before Ray starts."""
        coerce_fields(self, "serve setting ")  # a direct ServeSettings(...) may give "16" for 16
        check_rules(self, "serve", [
            *((f.name, not isinstance(getattr(self, f.name), float) or math.isfinite(getattr(self, f.name)),
               "a finite number") for f in dataclasses.fields(self)),  # a Serve config's YAML reads .inf as a float
            ("max_batch_size", self.max_batch_size >= 1, ">= 1"),
            ("batch_wait_s", self.batch_wait_s >= 0, ">= 0"),
            ("min_replicas", self.min_replicas >= 1, ">= 1"),
            ("max_replicas", self.max_replicas >= self.min_replicas, f">= the minimum ({self.min_replicas})"),
            ("target_ongoing_requests", self.target_ongoing_requests > 0, "> 0"),
            ("max_queued_requests", self.max_queued_requests >= 1 or self.max_queued_requests == -1,
             ">= 1, or -1 for no limit"),
            ("replica_cpus", self.replica_cpus is None or self.replica_cpus >= 0, ">= 0"),
            ("replica_gpus", self.replica_gpus >= 0, ">= 0"),
            ("ingress_cpus", self.ingress_cpus >= 0, ">= 0"),
            ("max_upload_mb", self.max_upload_mb > 0, "> 0"),
            ("max_batch_mb", self.max_batch_mb > 0, "> 0"),
            ("max_pixels", 1 <= self.max_pixels <= PILLOW_MAX_PIXELS,
             f"from 1 to {PILLOW_MAX_PIXELS:,} (Pillow's limit)"),
            ("max_batch_images", self.max_batch_images >= 1, ">= 1"),
        ], lambda name: "rayad serve " + _cli_flag(SERVE_FLAGS.get(name, name)))
        key = self.api_key or ""
        if key != key.strip(" \t") or any(ord(c) < 32 or ord(c) == 127 for c in key):  # the key is not shown
            raise ConfigError("serve setting api_key (RAYAD_API_KEY): has whitespace at an end or a control "
                              "character (a key file's final newline?), which no HTTP header can carry")

    @property
    def batch_images_in_flight(self) -> int:
        """How many images of one /v1/predict/batch request go to the scorer at a time: a scorer batch's worth,
        and never more than its queue holds. Serve refuses a request when its caller's queue is full, and a
        batch sent at once would fill the queue by itself."""
        queue = self.max_queued_requests if self.max_queued_requests > 0 else self.max_batch_size
        return min(self.max_batch_size, queue)


# ServeSettings fields whose `rayad serve` flag has another name
SERVE_FLAGS = {"batch_wait_s": "batch_wait_ms", "max_queued_requests": "max_queued",
               "target_ongoing_requests": "target_ongoing"}
