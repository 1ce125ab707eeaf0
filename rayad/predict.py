"""`rayad predict`: score files and folders, write a Parquet table and optional heatmaps.

In one process (one Parquet file), or (`--ray`) streamed through Ray Data: the driver lists the files, Ray
Data's tasks read them as bytes (a file that cannot be read gets an error in its row), an actor pool holding
the `Predictor` scores them in batches, and Ray Data's workers write the rows as a Parquet dataset (a folder or
URI), first into a hidden folder inside it, moved into place once every row is written. Both paths score
through `Predictor.predict_files`, so they give the same rows.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayad.artifact import Predictor, load_model
from rayad.cpu import use_cpus
from rayad.data.images import IMAGE_SUFFIXES, file_or_broken_link, image_size, utf8_path
from rayad.errors import DataError
from rayad.layout import atomic_write
from rayad.settings import PREDICT_BATCH, threads_for
from rayad.visualize import heatmap_image

READ_CPUS = 0.25  # reading and writing files is I/O: those tasks take a small CPU share
READ_BATCH = 16  # files a read task reads into one block
INCOMPLETE = "_rayad_incomplete"  # in --out while the rows are written: Parquet readers skip a folder named _*
SCHEMA = pa.schema([("path", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
                    ("label", pa.bool_()), ("heatmap", pa.string()), ("error", pa.string())])


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to the images below them (recursively, sorted; a link to nothing too, for
    its row to name), hidden files and folders left out, as in datasets (macOS's `._000.png`,
    `.ipynb_checkpoints/`). A folder without any image is an error: among several inputs it would otherwise pass
    unnoticed (a mistyped path)."""
    out = []
    for p in paths:
        if p.is_dir():
            images = sorted(utf8_path(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                            and file_or_broken_link(f) and not _hidden(f.relative_to(p)))
            if not images:
                raise DataError(f"no images in {p} (looked for {', '.join(IMAGE_SUFFIXES)})")
            out += images
        elif p.is_file():
            out.append(utf8_path(p))
        elif p.exists():  # a pipe or a device would block the read
            raise DataError(f"{p}: not a regular file")
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def _hidden(relative: Path) -> bool:
    """Whether a path below a folder given to score is hidden, or lies in a hidden folder."""
    return any(part.startswith(".") for part in relative.parts)


def predict_paths(run: str | Path, paths: list[Path], out: Path | None = None, heatmaps: str | None = None,
                  batch_size: int = PREDICT_BATCH) -> pa.Table:
    """One row per image (path, score, normalized_score, label, heatmap, error); bad files get an error. `out`:
    CSV where its name ends in .csv, else Parquet."""
    predictor = Predictor.load(run)
    files = expand_paths(paths)
    if not files:
        raise DataError("give image files or folders to score")
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        rows += score_rows(predictor, [str(f) for f in chunk], [_read(f) for f in chunk], heatmaps)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write = pa_csv.write_csv if out.suffix.lower() == ".csv" else pq.write_table
        atomic_write(out, lambda tmp: write(table, tmp))
    return table


def _read(path: Path) -> bytes | DataError:
    try:
        return path.read_bytes()
    except OSError as e:
        return DataError(f"{path}: cannot read ({e.strerror})")


def list_inputs(inputs: list[str]) -> tuple[list[dict[str, object]], list[pafs.FileSystem | None]]:
    """The files to score, as rows (`path`: the name their row gets, `source`: the index of their filesystem in
    the list returned with them, whose first entry, None, stands for local files; `key`: the path in it).
    Local files and folders are listed by `expand_paths` (made absolute, as every node must read them), file://
    URIs likewise; other URIs (s3://, gs://) through their pyarrow filesystem: a file as given, a folder as the
    images below it (sorted)."""
    local, rows, sources = [], [], [None]
    for given in inputs:
        filesystem, path = pafs.FileSystem.from_uri(given) if "://" in given else (None, given)
        if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
            local.append(Path(path))
            continue
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            keys = sorted(f.path for f in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                          if f.type == pafs.FileType.File and Path(f.path).suffix.lower() in IMAGE_SUFFIXES
                          and not _hidden(Path(f.path).relative_to(Path(path))))
            if not keys:
                raise DataError(f"no images in {given} (looked for {', '.join(IMAGE_SUFFIXES)})")
        elif info.type == pafs.FileType.File:
            keys = [path]
        else:
            raise DataError(f"{given}: no such file or folder")
        scheme = given.split("://", 1)[0]
        rows += [{"path": f"{scheme}://{key}", "source": len(sources), "key": key} for key in keys]
        sources.append(filesystem)
    files = [{"path": str(p.absolute()), "source": 0, "key": str(p.absolute())} for p in expand_paths(local)]
    return files + rows, sources


def _read_batch(batch: dict[str, np.ndarray], sources: list[pafs.FileSystem | None]) -> dict[str, list]:
    """A Ray Data task: the files of a batch of `list_inputs` rows as bytes, and the error of each that cannot be
    read (as the single-process path gives it)."""
    contents = [_read(Path(key)) if sources[source] is None else _read_remote(sources[source], key, name)
                for name, source, key in zip(batch["path"], batch["source"], batch["key"], strict=True)]
    return {"path": list(batch["path"]),
            "bytes": [b"" if isinstance(c, DataError) else c for c in contents],
            "error": [str(c) if isinstance(c, DataError) else "" for c in contents]}  # not None: NaN in numpy


def _read_remote(filesystem: pafs.FileSystem, key: str, name: str) -> bytes | DataError:
    try:
        with filesystem.open_input_file(key) as stream:
            return stream.read()
    except OSError as e:
        return DataError(f"{name}: cannot read ({str(e).splitlines()[0]})")


def score_rows(predictor: Predictor, names: list[str], contents: list[bytes | DataError], heatmaps: str | None
               ) -> list[dict]:
    """Rows for a batch of encoded images (a DataError in `contents` was met while reading the file)."""
    readable = [i for i, c in enumerate(contents) if not isinstance(c, DataError)]
    preds, errors = predictor.predict_files([contents[i] for i in readable], [names[i] for i in readable])
    row_errors: list[str | None] = [str(c) if isinstance(c, DataError) else None for c in contents]
    for i, error in zip(readable, errors, strict=True):
        row_errors[i] = error
    rows, k = [], 0
    for name, content, error in zip(names, contents, row_errors, strict=True):
        if error is not None:
            rows.append({"path": name, "score": None, "normalized_score": None, "label": None, "heatmap": None,
                         "error": error})
            continue
        heatmap = (_write_heatmap(heatmaps, name, content, preds.maps[k], predictor.pixel_threshold)
                   if heatmaps else None)
        rows.append({"path": name, "score": float(preds.scores[k]), "normalized_score": float(preds.normalized[k]),
                     "label": bool(preds.labels[k]), "heatmap": heatmap, "error": None})
        k += 1
    return rows


def _write_heatmap(folder: str | Path, name: str, content: bytes, anomaly_map: np.ndarray, threshold: float
                   ) -> str:
    """A heatmap PNG at the image's own size in `folder` (a path, or a pyarrow filesystem URI such as
    s3://bucket/heatmaps), named after the image and a hash of its full path (so that images with the same
    name in different folders, or scored by different workers, never collide); returns where it went."""
    location = _absolute(folder)
    filesystem, base = pafs.FileSystem.from_uri(location)
    filesystem.create_dir(base, recursive=True)
    name_part = f"{Path(name).stem}_{hashlib.sha1(name.encode()).hexdigest()[:8]}_heatmap.png"
    buffer = io.BytesIO()
    heatmap_image(anomaly_map, threshold, image_size(content)).save(buffer, format="PNG")
    target = f"{base.rstrip('/')}/{name_part}"
    if isinstance(filesystem, pafs.LocalFileSystem):  # a stop midway leaves no half PNG
        atomic_write(Path(target), lambda tmp: tmp.write_bytes(buffer.getvalue()))
    else:  # an object store shows an object once its upload is complete
        with filesystem.open_output_stream(target) as stream:
            stream.write(buffer.getvalue())
    return f"{location.rstrip('/')}/{name_part}"


def _absolute(location: str | Path) -> str:
    """A URI as given; a local path made absolute (pyarrow's filesystems want absolute paths)."""
    return str(location) if "://" in str(location) else str(Path(location).absolute())


class ScoringActor:
    """A Ray Data actor: loads the Predictor once, scores batches of encoded images into rows."""

    def __init__(self, run_dir: str, heatmaps: str | None, threads: int):
        use_cpus(threads)
        self.predictor = Predictor.load(run_dir)  # on cuda only when Ray reserved a GPU for this actor
        self.heatmaps = heatmaps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        contents = [DataError(error) if error else content
                    for content, error in zip(batch["bytes"], batch["error"], strict=True)]
        rows = score_rows(self.predictor, [str(p) for p in batch["path"]], contents, self.heatmaps)
        return {name: [row[name] for row in rows] for name in SCHEMA.names}


def predict_with_ray(run: str | Path, inputs: list[str], out: str, heatmaps: str | None = None,
                     batch_size: int = PREDICT_BATCH, actors: int | None = None,
                     cpus_per_actor: float | None = None, gpus_per_actor: float = 0.0,
                     address: str | None = None) -> pa.Table:
    """Stream `inputs` (local files and folders, or URIs such as s3://bucket/images/) through an actor pool;
    Ray Data's workers write the rows as Parquet files into `out` (a new or empty folder, or a pyarrow
    filesystem URI), never through the driver, which reads back only their `error` column and returns it (null
    where the image was scored). The rows are in no set order. Stopped or failed, it leaves no rows in `out`.
    Every node must reach the inputs, the run and `out`. `cpus_per_actor` defaults to `default_actor_cpus()`.
    Joins the cluster at `address` (see `rayad.cluster.connect`) once the run, the inputs and `out` are checked."""
    import ray

    from rayad.cluster import check_fits, connect

    load_model(run)  # a broken run fails here, in one line, not in every actor
    files, sources = list_inputs(inputs)
    if not files:
        raise DataError("give image files, folders or URIs to score")
    filesystem, folder = pafs.FileSystem.from_uri(_absolute(out))
    folder = folder.rstrip("/")
    _check_new_folder(out, filesystem, folder)
    connect(address)
    if cpus_per_actor is None:
        cpus_per_actor = default_actor_cpus()
    check_fits("a scoring actor (--cpus-per-actor, --gpus-per-actor)", cpus_per_actor, gpus_per_actor)
    pool = actors or pool_size(cpus_per_actor, gpus_per_actor)
    # Two read tasks a scoring actor, each reading its list of files a batch (a block) at a time: more, smaller
    # read tasks made scoring slower, as they queue with the writes for the CPU the actors leave (docs/benchmarks.md)
    read = ray.data.from_items(files, override_num_blocks=min(len(files), 2 * pool)).map_batches(
        _read_batch, batch_size=READ_BATCH, batch_format="numpy", num_cpus=READ_CPUS, fn_kwargs={"sources": sources})
    scored = read.map_batches(
        ScoringActor, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        # a fixed pool: one that autoscales from 1 actor stayed at 1 on a 2-CPU node (docs/benchmarks.md)
        compute=ray.data.ActorPoolStrategy(size=pool),
        fn_constructor_kwargs={"run_dir": str(Path(run).absolute()),
                               "heatmaps": _absolute(heatmaps) if heatmaps else None,
                               "threads": threads_for(cpus_per_actor)})
    incomplete = f"{folder}/{INCOMPLETE}"
    try:
        # writing takes a small CPU share, as reading does: with a whole CPU it waited for the actors to finish
        scored.map_batches(_to_schema, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS
                           ).write_parquet(incomplete, filesystem=filesystem, ray_remote_args={"num_cpus": READ_CPUS})
        for written in filesystem.get_file_info(pafs.FileSelector(incomplete)):
            filesystem.move(written.path, f"{folder}/{written.base_name}")
    except KeyboardInterrupt:
        _wait_for_writes(filesystem, incomplete)
        raise KeyboardInterrupt(f"no rows are kept in {out}") from None
    finally:
        with suppress(OSError):
            filesystem.delete_dir(incomplete)
    return pq.read_table(folder, columns=["error"], filesystem=filesystem)


def _wait_for_writes(filesystem: pafs.FileSystem, folder: str, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
    """Wait until nothing is written into `folder` for `quiet_s` (at most `limit_s`): write tasks that ran when
    Ctrl-C stopped Ray Data finish their files, which would appear after the folder was deleted."""
    def listing() -> list[tuple[str, int | None]] | None:
        with suppress(OSError):
            return sorted((f.path, f.size) for f in filesystem.get_file_info(pafs.FileSelector(folder)))
        return None

    deadline, seen, quiet_since = time.monotonic() + limit_s, listing(), time.monotonic()
    while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        now = listing()
        if now != seen:
            seen, quiet_since = now, time.monotonic()


def _check_new_folder(out: str, filesystem: pafs.FileSystem, folder: str) -> None:
    """`out` must be a new or empty folder: read back as one dataset, it would mix earlier rows with these."""
    info = filesystem.get_file_info(folder)
    if info.type == pafs.FileType.File:
        raise DataError(f"--out {out}: is a file; give a new or empty folder (the rows are a Parquet dataset)")
    if info.type == pafs.FileType.Directory and filesystem.get_file_info(pafs.FileSelector(folder)):
        raise DataError(f"--out {out}: already holds files, and Ray Data adds its Parquet files to them; give a new "
                        "or empty folder")


def default_actor_cpus() -> float:
    """One scoring actor per core, each node keeping a quarter of a core beside them for one read or write task
    at a time: 0.875 CPU on 2-core nodes. A whole CPU each left room for one actor on 2 cores, and a larger
    remainder let I/O tasks crowd the actors (docs/benchmarks.md). Rounded down to Ray's precision, 1e-4 CPU."""
    from rayad.cluster import smallest_node_cpus

    return math.floor((1 - READ_CPUS / smallest_node_cpus()) * 1e4) / 1e4


def pool_size(cpus_per_actor: float, gpus_per_actor: float = 0.0) -> int:
    """How many scoring actors the cluster holds: by its GPUs when the actors ask for GPUs, and by its CPUs
    (leaving room for the read tasks, or they starve), never with more torch threads than cores."""
    import ray

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 1)
    fits = [int(cpus // threads_for(cpus_per_actor))]
    if cpus_per_actor:
        fits.append(int((cpus - READ_CPUS) / cpus_per_actor + 1e-9))  # a float quotient may fall just short
    if gpus_per_actor:
        fits.append(int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, min(fits))


def _to_schema(batch: pa.Table) -> pa.Table:
    return batch.select(SCHEMA.names).cast(SCHEMA)
