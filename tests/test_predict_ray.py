"""`rayad predict --ray`: Ray Data streams the files through an actor pool; same rows as the plain path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from rayad.cli import main
from rayad.data.defects import DEFECTS
from rayad.data.demo import CATEGORIES
from rayad.predict import INCOMPLETE, predict_paths

pytestmark = pytest.mark.slow


def _scoring_actors() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(ScoringActor))")],
                                            limit=1000, raise_on_missing_output=False)}


def test_ray_data_scoring_matches_single_process(ray_cluster, trained_run, demo_root, tmp_path, capsys):
    before = _scoring_actors()
    images = tmp_path / "images"
    shutil.copytree(demo_root / "brick" / "test", images)
    (images / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    notes = tmp_path / "notes.txt"  # named explicitly: a row with an error, as in the single-process path
    notes.write_text("not an image")
    unreadable = tmp_path / "mem.png"  # reading it fails (EIO): Ray Data's own reader failed the whole run
    unreadable.symlink_to("/proc/self/mem")
    out = tmp_path / "scores"  # written by Ray Data's workers, as a URI (any pyarrow filesystem)
    args = ["predict", "--run", str(trained_run), "--ray", "--input", str(images), "--input", str(notes),
            "--input", str(unreadable), "--out", f"file://{out}", "--heatmaps", str(tmp_path / "heat"),
            "--batch-size", "4"]
    code = main(args)
    said = capsys.readouterr()
    assert code == 0 and "wrote" in said.out
    assert len(_scoring_actors() - before) == 2  # by default one actor per core (2 nodes of 1 CPU), not just one
    assert f"rayad predict: 3 of {4 + 2 * len(DEFECTS) + 3} files could not be scored" in said.err
    assert [p.name for p in out.iterdir() if p.suffix != ".parquet"] == []  # its unfinished folder is gone
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    plain = {r["path"]: r for r in predict_paths(trained_run, [images, notes, unreadable]).to_pylist()}
    n_images = 4 + 2 * len(DEFECTS)  # the demo_root fixture's brick test split
    assert rows.keys() == plain.keys() and len(rows) == n_images + 3
    assert rows[str(unreadable)]["error"] == plain[str(unreadable)]["error"] == f"{unreadable}: cannot read " \
        "(Input/output error)"
    for path, row in rows.items():
        if plain[path]["error"]:
            assert row["score"] is None and row["error"] == plain[path]["error"] and path in row["error"]
            continue
        assert row["score"] == pytest.approx(plain[path]["score"], abs=1e-6)
        assert row["label"] == plain[path]["label"] and row["heatmap"].endswith("_heatmap.png")
        assert Path(row["heatmap"]).is_file()
    assert len(list((tmp_path / "heat").glob("*.png"))) == n_images
    before = sorted(out.iterdir())  # a second run into the URI would add its rows to these (only a path was checked)
    assert main(args) == 2 and sorted(out.iterdir()) == before
    assert f"--out file://{out}: already holds files" in capsys.readouterr().err


def test_ctrl_c_keeps_no_rows_in_out(ray_cluster, trained_run, demo_root, tmp_path):
    """Stopped midway, Ray Data had written part of the rows into --out, which read as a complete result."""
    out = tmp_path / "scores"
    inputs = [str(demo_root / category / "test") for category in CATEGORIES] * 10  # rows each time
    with (tmp_path / "driver.err").open("w+") as err:
        driver = subprocess.Popen([sys.executable, "-m", "rayad.cli", "predict", "--run", str(trained_run), "--ray",
                                   *inputs, "--out", str(out), "--batch-size", "1"], stderr=err,
                                  env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
        deadline = time.monotonic() + 120
        while not list(out.glob(f"{INCOMPLETE}/*.parquet")):  # the first rows are written
            assert driver.poll() is None and time.monotonic() < deadline, "no rows written"
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) == 130
        err.seek(0)
        assert f"rayad predict: interrupted: no rows are kept in {out}" in err.read()
    assert not out.exists()  # a new folder: removed as it was left empty


def test_a_broken_run_fails_in_one_line_before_any_actor_starts(ray_cluster, demo_root, tmp_path, capsys):
    code = main(["predict", "--run", str(tmp_path), "--ray", "--input", str(demo_root / "brick" / "test"),
                 "--out", str(tmp_path / "scores")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a rayad model" in err, err


def test_an_actor_larger_than_any_node_fails_in_one_line(ray_cluster, trained_run, demo_root, tmp_path, capsys):
    """Each test node has 1 CPU: Ray Data would wait forever for a node of 1.5 ("The job may hang forever")."""
    args = ["predict", "--run", str(trained_run), "--ray", str(demo_root / "brick" / "test"), "--out",
            str(tmp_path / "out"), "--cpus-per-actor", "1.5"]
    assert main(args) == 2
    assert "a scoring actor (--cpus-per-actor, --gpus-per-actor) asks for 1.5 CPU and 0 GPU" in capsys.readouterr().err


def test_ray_predict_needs_out(trained_run, demo_root, capsys):
    assert main(["predict", "--run", str(trained_run), "--ray", str(demo_root / "brick" / "test")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_folder_uri_lists_its_images_below_it_and_leaves_hidden_ones_out(monkeypatch):
    """As a local folder does (`expand_paths`): an s3:// or gs:// folder through its pyarrow filesystem."""
    import pyarrow.fs as pafs

    from rayad.predict import list_inputs

    bucket = pafs.FileSystem.from_uri("mock:///")[0]  # an in-memory filesystem, standing in for a bucket's
    for key in ("imgs/a.png", "imgs/sub/b.PNG", "imgs/._a.png", "imgs/.cache/c.png", "imgs/notes.txt"):
        bucket.create_dir(key.rsplit("/", 1)[0])
        with bucket.open_output_stream(key) as f:
            f.write(b"x")
    opened = SimpleNamespace(from_uri=lambda uri: (bucket, uri.split("://", 1)[1]))
    monkeypatch.setattr("rayad.predict.pafs", SimpleNamespace(**{**vars(pafs), "FileSystem": opened}))
    rows, sources = list_inputs(["s3://imgs"])
    assert [r["path"] for r in rows] == ["s3://imgs/a.png", "s3://imgs/sub/b.PNG"] and sources[1] is bucket
