"""Where everything lives on disk: the model artifact, the results store of an experiment, the metric names.

    RUN_DIR/model.safetensors, model.json     a model artifact (rayad.artifact)
    RUN_DIR/manifest.parquet                  the images a run was trained and calibrated on
    RUN_DIR/train_log.jsonl                   every logged training step's report (loss, lr, images/s)
    EXP_DIR/experiment.json                   data, space, settings, versions, status, best trial
    EXP_DIR/trials.parquet                    one row per trial (written by rayad.tune.store)
    EXP_DIR/history.parquet                   one row per trial and evaluation
    EXP_DIR/study.db                          the Optuna study (SQLite)
    EXP_DIR/best/                             the best trial's model artifact + test_metrics.json
    RUN_DIR/checkpoints/, RUN_DIR/ray/        a single-process run's checkpoints; a --workers run's Ray Train
                                              state and checkpoints (with a --storage, there: `ray_storage`)
    EXP_DIR/tune/, EXP_DIR/trials/            Ray Tune's state and the trials' Train checkpoints (with a
                                              --storage, there: `ray_storage`)

The writers (artifact, tune.store), the readers (results, the dashboard), Serve's model discovery, the demo
and the benchmarks all take names from here (docs/design.md, "The results store"); its writers write
through `atomic_write`. Only the standard library and rayad.errors are imported, so that light readers (and
every command's start) stay light.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from rayad.errors import RayadError

WEIGHTS, METADATA, MANIFEST = "model.safetensors", "model.json", "manifest.parquet"
TRAIN_LOG = "train_log.jsonl"  # in RUN_DIR, one JSON line per logged step
CHECKPOINTS, RAY_STATE = "checkpoints", "ray"  # in RUN_DIR: a single-process run's checkpoints, Ray Train's state
WORKERS_RUN = "workers_run.json"  # in RUN_DIR of a --workers run: its --storage, where Ray Train keeps its state
EXPERIMENT, TRIALS, HISTORY, STUDY, BEST = "experiment.json", "trials.parquet", "history.parquet", "study.db", "best"
TEST_METRICS = "test_metrics.json"  # in BEST, beside the model artifact
TUNE_DIR, TRIALS_DIR = "tune", "trials"  # Ray's state for --resume, and the trials' Train runs
SUMMARY = "summary.json"  # `rayad demo`'s table of the best model per category
EXPORTED = "rayad_export.json"  # in an export folder, beside model.pt or model.onnx
PARAM_PREFIX = "config/"  # trials.parquet names a parameter's column config/<key>
TRIAL_ENDED = ("completed", "stopped_early", "error")
# interrupted: a trial that a stopped search left running (until the search resumes it)
TRIAL_STATUSES = ("running", *TRIAL_ENDED, "interrupted")
# a trial report's evaluation count, from its step: Tune's training_iteration starts again at 1 in a resumed trial
EVALUATION = "evaluation"


def trial_params(row: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched parameters by config key: the PARAM_PREFIX columns of its row, without the prefix."""
    return {k.removeprefix(PARAM_PREFIX): v for k, v in row.items() if k.startswith(PARAM_PREFIX)}


def evaluations(steps: int, checkpoint_every: int) -> int:
    """How many evaluations a run has made after `steps` steps: one at each checkpoint, and one at its end."""
    return math.ceil(steps / checkpoint_every)


METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "f1_max")  # a test set's (rayad.metrics)
VAL_METRICS = tuple(f"val_{name}" for name in METRIC_NAMES)  # what trials report and searches optimise
PIXEL_METRICS = ("val_pixel_auroc", "val_aupro")  # need masks in the validation set

__all__ = ["BEST", "CHECKPOINTS", "EVALUATION", "EXPERIMENT", "EXPORTED", "HISTORY", "MANIFEST", "METADATA",
           "METRIC_NAMES", "PARAM_PREFIX", "PIXEL_METRICS", "RAY_STATE", "STUDY", "SUMMARY", "TEST_METRICS",
           "TRAIN_LOG", "TRIALS", "TRIALS_DIR", "TRIAL_ENDED", "TRIAL_STATUSES", "TUNE_DIR", "VAL_METRICS", "WEIGHTS",
           "WORKERS_RUN", "discover_models", "evaluations", "is_experiment", "is_model",
           "scan_experiments", "trial_params", "write_json"]

log = logging.getLogger(__name__)


def is_model(path: Path) -> bool:
    return (path / METADATA).is_file()


def is_experiment(path: Path) -> bool:
    return (path / EXPERIMENT).is_file() or (path / TRIALS).is_file()


def scan_experiments(runs_dir: str | Path) -> tuple[list[Path], dict[Path, str]]:
    """Experiment directories: `runs_dir` itself, or its children and grandchildren (e.g. `rayad demo`'s output,
    one experiment per category); and the folders it could not look into with why (another account's private
    folder): those are left out, and hide no other."""
    runs_dir = Path(runs_dir)
    unreadable: dict[Path, str] = {}

    def looked(path: Path, look: Callable, nothing):
        try:
            return look(path)
        except OSError as e:
            unreadable[path] = e.strerror or str(e)
            return nothing

    if looked(runs_dir, is_experiment, False):
        return [runs_dir], unreadable
    found = []
    for child in looked(runs_dir, _folders, []):
        if looked(child, is_experiment, False):
            found.append(child)
        else:
            found += [g for g in looked(child, _folders, []) if looked(g, is_experiment, False)]
    return found, unreadable


def _folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def discover_models(path: str | Path) -> dict[str, str]:
    """Model name -> artifact folder under `path`: a run (named after its folder), an experiment (its best/,
    named after its category), or a folder of those. Models that would share a name (two experiments of one
    category) are named after their folders instead. Empty when there is none."""
    path = Path(path)
    found = _model_at(path)
    if found:
        return {found[0]: found[1]}
    children = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    models = [(child.name, *model) for child in children if (model := _model_at(child))]
    names = [name for _, name, _ in models]
    return {(folder if names.count(name) > 1 else name): run for folder, name, run in models}


def _model_at(path: Path) -> tuple[str, str] | None:
    if is_model(path):
        return path.name, str(path.absolute())
    if is_model(path / BEST):
        return _category(path) or path.name, str((path / BEST).absolute())
    return None


def _category(exp_dir: Path) -> str | None:
    """The category an experiment.json names, or None when it names none (missing, damaged)."""
    try:
        category = json.loads((exp_dir / EXPERIMENT).read_text()).get("category")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return category if isinstance(category, str) and category else None


def _read_umask() -> int:
    """The process's umask, from /proc on Linux; elsewhere by setting it (to the strictest mask, so that a file
    another thread creates meanwhile is never more open than it would be) and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import


def follow_umask(path: Path) -> None:
    """Give a file the mode `open()` gives new files. safetensors creates its files readable by their owner
    alone (0600): a model trained by one account could not be served or scored by another."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON, through `atomic_write` (what JSON cannot hold, such as a Path, as its str)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through a temporary file renamed into place: a reader, or a stop midway, never finds half
    a file, and a file written before stays whole until the new one is complete. A symbolic link stays: its
    target is replaced; what `written_in_place` names is written in place, and /dev/stdout through sys.stdout."""
    stream = standard_stream(path)
    if stream is not None:
        _write_through(stream, write)
        return
    in_place = written_in_place(path)
    path = path if in_place else Path(os.path.realpath(path))
    tmp = path if in_place else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if not in_place:
            os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # the file asked for, not the temporary one
    finally:
        if not in_place:
            tmp.unlink(missing_ok=True)  # left only when the write failed


def written_in_place(path: Path) -> bool:
    """Whether an output is written where it is, not through a renamed temporary file: what is neither file nor
    folder (a pipe, a terminal). Decided on the path as given: /dev/stdout of a pipe resolves to
    /proc/PID/fd/pipe:[N], which names nothing."""
    return path.exists() and not path.is_file() and not path.is_dir()


STANDARD_STREAMS = {"/dev/stdout": "stdout", "/dev/fd/1": "stdout", "/proc/self/fd/1": "stdout",
                    "/dev/stderr": "stderr", "/dev/fd/2": "stderr", "/proc/self/fd/2": "stderr"}


def standard_stream(path: Path) -> TextIO | None:
    """sys.stdout or sys.stderr where `path` names it: written through it, after what the command printed there,
    whatever it is (`--json /dev/stdout > f` replaced f, losing the table printed before; opened anew, f would be
    cut to nothing and `>>` ignored)."""
    name = STANDARD_STREAMS.get(os.path.abspath(path))
    return getattr(sys, name) if name else None


def _write_through(stream: TextIO, write: Callable[[Path], object]) -> None:
    with tempfile.TemporaryDirectory(prefix="rayad-") as tmp:
        staged = Path(tmp) / "output"
        write(staged)
        stream.flush()
        with staged.open("rb") as written:
            shutil.copyfileobj(written, stream.buffer)
        stream.buffer.flush()


def make_folder(path: Path) -> Path:
    """Create an output folder (and its parents); a file in the way is the user's error, named."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(part for part in [path, *path.parents] if part.exists() and not part.is_dir())
        raise RayadError(f"{path}: {blocker} is a file, not a folder") from None
    return path


def ray_storage(storage: str | None, folder: Path, default: str) -> str:
    """Where the run or experiment writing `folder` keeps Ray's state and checkpoints: `default`, or in a
    `--storage` that others may share (one bucket for every run), a folder named after it and a hash of its
    real path, so that runs from two folders never share checkpoints (the second would resume the first's)
    and two searches never share Tune's state. The same path on two machines is one folder."""
    if not storage:
        return default
    folder = Path(folder).resolve()
    return storage_path(storage, f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}")


def local_path(value: str) -> str:
    """A file:// URI as its path; a path or another URI as given."""
    return urllib.parse.urlsplit(value).path if value.startswith("file://") else value


def same_storage(a: str | None, b: str | None) -> bool:
    """Whether two --storage values name one place: a file:// URI as its path, a path with or without its
    trailing slash."""
    def key(storage: str | None) -> str | None:
        storage = storage and local_path(storage)
        if storage is None or "://" in storage:
            return storage and storage.rstrip("/")
        return os.path.normpath(os.path.abspath(storage))
    return key(a) == key(b)


FOLDER_KINDS = {EXPERIMENT: "a search", TRIALS: "a search", EXPORTED: "an export", METADATA: "a model",
                CHECKPOINTS: "a run's checkpoints", WORKERS_RUN: "a --workers run"}  # what each record marks


def refuse_other_kinds(folder: Path, records: tuple[str, ...], instead: str) -> None:
    """Refuse `folder` when it holds one of `records`: another command's files, which this one's would mix with
    (a run's manifest replacing a search's, and `serve` finding the wrong model)."""
    for record in records:
        if (folder / record).exists():
            raise RayadError(f"{folder} holds {FOLDER_KINDS[record]} ({record}); {instead}")


def storage_path(storage: str, *names: str) -> str:
    """`names` inside `storage`, a path or a URI; a URI's query (s3://b/p?endpoint_override=...) stays last."""
    url = urllib.parse.urlsplit(storage)
    if len(url.scheme) <= 1:  # a path (a Windows drive letter parses as a scheme)
        return "/".join([storage.rstrip("/"), *names])
    return urllib.parse.urlunsplit(url._replace(path="/".join([url.path.rstrip("/"), *names])))


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[Path]:
    """Hold the output folder of a run, a search or an export (made if missing) while one command writes it: a
    second rayad command that would write there fails at once, instead of mixing its files with this one's. An
    advisory lock (flock) on the folder itself, so nothing is left behind, released when the command ends
    however it ends; skipped where the filesystem has no such locks. A folder made here is removed again when
    the command fails before writing anything into it."""
    made = not folder.exists()
    make_folder(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RayadError(f"{folder}: another rayad command is writing there; wait for it to end, or give "
                             "another folder") from None
        except OSError as e:  # e.g. a network filesystem without flock
            log.debug("%s: not locked (%s)", folder, e)
        yield folder
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        raise
    finally:
        os.close(fd)
