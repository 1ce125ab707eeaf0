import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny import TINY, TINY_ARGS, sigterm_after_first_checkpoint

from rayad.cli import main
from rayad.errors import RayadError
from rayad.layout import writing


def test_train_evaluate_predict(tmp_path, demo_root, capsys, caplog):
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_root), "--category", "grass", "--out", str(run), *TINY_ARGS]) == 0
    out = tmp_path / "m.json"
    assert main(["evaluate", "--run", str(run), "--data", str(demo_root), "--category", "grass",
                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "n_images", "per_defect"} <= set(metrics)
    assert "image_auroc" in capsys.readouterr().out
    assert json.loads((run / "model.json").read_text())["train"]["category"] == "grass"
    with caplog.at_level(logging.WARNING, logger="rayad"):  # allowed, but said
        assert main(["evaluate", "--run", str(run), "--data", str(demo_root), "--category", "brick"]) == 0
    assert "the model was trained on grass and is evaluated on brick" in caplog.text
    table = tmp_path / "p.parquet"
    heatmaps = tmp_path / "heat"
    assert main(["predict", "--run", str(run), str(demo_root / "grass" / "test" / "crack"),
                 "--out", str(table), "--heatmaps", str(heatmaps)]) == 0
    rows = pq.read_table(table).to_pylist()
    assert len(rows) == 2 and all(r["error"] is None and r["score"] > 0 for r in rows)
    assert len(list(heatmaps.glob("*.png"))) == 2
    by_path = dict(zip(metrics["paths"], metrics["scores"], strict=True))
    for r in rows:
        assert r["score"] == pytest.approx(by_path[r["path"]], rel=1e-6)
    assert main(["predict", "--run", str(run), str(demo_root / "grass" / "test" / "crack"),
                 "--out", str(tmp_path / "p.CSV")]) == 0  # it wrote Parquet under that name
    assert pa_csv.read_csv(tmp_path / "p.CSV").to_pylist() == [{**r, "heatmap": None} for r in rows]


def test_predict_fails_when_no_file_could_be_scored_and_keeps_the_rows(trained_run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert main(["predict", "--run", str(trained_run), str(notes), "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"rayad predict: error: none of the 1 files could be scored; the first: {notes}: not a")
    assert pq.read_table(tmp_path / "p.parquet").to_pylist()[0]["error"].startswith(str(notes))


TRAIN = ["train", "--data", "{demo}", "--category", "brick", "--out", "{tmp}/o"]


@pytest.mark.parametrize("args, needle", [
    (["train", "--data", "/nonexistent", "--category", "x", "--out", "/tmp/x"], "/nonexistent"),
    (["train", "--data", "{demo}", "--category", "marble", "--out", "{tmp}/o"], "brick, grass, gravel"),
    (["train", "--data", "{demo}", "--category", "brick", "--out", "{tmp}/o", "--set", "model.skip=x"],
     "model.skip"),
    (["train", "--data", "{demo}", "--category", "brick", "--out", "{tmp}/o", "--config", "{tmp}/no.yaml"],
     "no.yaml"),
    (["train", "--data", "{demo}", "--category", "brick", "--out", "{tmp}/o", "--bogus"], "--bogus"),
    (["evaluate", "--run", "{tmp}", "--data", "{demo}", "--category", "brick"], "not a rayad model"),
    (["predict", "--run", "{tmp}", "{tmp}/missing.png"], "not a rayad model"),
    (TRAIN + ["--image-size", "100"], "data.image_size = 100 must be a multiple of 8"),
    (TRAIN + ["--set", "model.widths=[8,8,8,8,8,8,8,8,8]"], "multiple of 512"),
    (TRAIN + ["--set", "train.weight_decay=-1"], "train.weight_decay = -1.0 is out of range"),
    (TRAIN + ["--set", "train.num_threads=-2"], "train.num_threads = -2 is out of range"),
    (TRAIN + ["--config", "{tmp}/latin1.yaml"], "latin1.yaml: not a UTF-8 text file"),
    (["train", "--data", "{demo}", "--category", "brick", "--out", "{tmp}/file/run"], "{tmp}/file is a file"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "{tmp}/file/m.json"],
     "is a file, not a folder"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "{tmp}"], "is a folder"),
    (["predict", "--run", "{run}", "{demo}/brick/test/good", "--heatmaps", "{tmp}/file"], "is a file"),
    (["predict", "--run", "{run}", "{demo}/brick/test/good", "--out", "{tmp}/file/p.parquet"], "is a file"),
    (["predict", "--run", "{run}", "--ray", "{demo}/brick/test/good", "--out", "{tmp}"], "already holds files"),
    (["demo", "--out", "{tmp}/demo", "--categories", "brick", "marble"], "no demo category marble"),
    (["demo", "--out", "{tmp}/demo", "--trials", "0"], "trials = 0 (--trials): must be >= 1"),  # before data, Ray
    (TRAIN + ["--seed", "-1"], "train.seed = -1 is out of range"),
    (["data", "demo", "--out", "{tmp}/d", "--seed", "-1"], "demo seed -1: must be from 0 to 4294967295"),
    (TRAIN + ["--set", "corruption.fill_sources={{patch: .nan}}"], "weights must be 0 or from 1e-30 to 1e+30"),
    (TRAIN + ["--set", "model.in_chans=1"], "model.in_chans = 1: must be 3"),
    (TRAIN + ["--config", "{tmp}/int_keys.yaml"], "unknown section(s) ['1', 'foo']"),
    (["predict", "--run", "{run}", "{demo}/brick/test/good", "--batch-size", "0"], "--batch-size and --actors"),
    (["predict", "--run", "{run}", "{tmp}/empty"], "no images in {tmp}/empty (looked for .png"),
    (["predict", "--run", "{run}", "{demo}/brick/test/good", "{tmp}/empty"], "no images in {tmp}/empty"),  # a typo
    (["predict", "--run", "{run}", "--ray", "{tmp}/empty", "--out", "{tmp}/p"], "no images in {tmp}/empty"),
    (["export", "--run", "{run}", "--format", "torchscript", "--out", "{tmp}/exp"], "exp/model.pt is a folder"),
    # checked before Ray starts; Serve's own check of max_queued_requests ended in a traceback
    (["serve", "--run", "{run}", "--max-queued", "0"], "max_queued_requests = 0 (rayad serve --max-queued): "
                                                        "must be >= 1, or -1 for no limit"),
    (["serve", "--run", "{run}", "--max-batch-size", "0"], "--max-batch-size): must be >= 1"),
    (["predict", "--run", "{run}", "{demo}/brick/test/good", "--gpus-per-actor", "1", "--actors", "2"],  # on the CPU
     "--actors, --gpus-per-actor: options of scoring on Ray Data; add --ray (without it the files are scored in"),
    (["serve", "--run", "{run}", "--replicas", "0"], "argument --replicas: 0 is not a count (at least 1)"),
    (["serve", "--run", "{run}", "--batch-wait-ms", "-1"], "argument --batch-wait-ms: -1 ms is no wait (at least 0)"),
    # listened on every interface, printing http://:8000
    (["serve", "--run", "{run}", "--host", ""], "argument --host: an empty host listens on every interface"),
    (["dashboard", "--runs", "{tmp}", "--host", " "], "argument --host: an empty host listens on every interface"),
    (["serve", "--run", "{run}", "--max-upload-mb", "-1"], "must be > 0"),
    (["serve", "--run", "{run}", "--port", "70000"], "--port: 70000 is not a port (1 to 65535)"),
    # inf passed as a float and overflowed later (a 500 on every upload; a traceback from --replica-cpus inf)
    (["serve", "--run", "{run}", "--max-upload-mb", "inf"], "argument --max-upload-mb: 'inf' is not a finite number"),
    (["predict", "--run", "{run}", "--ray", "{tmp}", "--cpus-per-actor", "nan"], "'nan' is not a finite number"),
    (["predict", "--run", "{run}", "--ray", "{tmp}/empty", "--out", "{tmp}/rows.csv"],  # a Parquet folder of that name
     "--out {tmp}/rows.csv: --ray writes a Parquet dataset, a folder"),
    (TRAIN + ["--workers", "1", "--storage", "{tmp}/file/ckpt"], "--storage {tmp}/file/ckpt: {tmp}/file is a file"),
    (TRAIN + ["--mlflow", "ftp://x"], "mlflow 'ftp://x' (--mlflow): MLflow cannot use it"),  # before training
    (TRAIN + ["--mlflow", "http://127.0.0.1:1"],  # at once: MLflow retried for minutes
     "MLflow cannot use it (ConnectionError: nothing answers at 127.0.0.1:1: Connection refused)"),
    (TRAIN + ["--mlflow", "sqlite:///{tmp}/empty"],  # a folder: MLflow retried for 100 s
     "MLflow cannot use it (OperationalError: unable to open database file)"),
    (TRAIN + ["--gpu"], "--gpu: this process sees no CUDA GPU"),  # the suite hides GPUs
    # trained here without a word: the cluster, its storage and its settings were never used
    (TRAIN + ["--address", "10.255.255.1:6379", "--storage", "{tmp}/st", "--spread", "--max-failures", "3"],
     "--address, --storage, --spread, --max-failures: options of training on Ray Train; add --workers N"),
    (TRAIN + ["--workers", "1", "--storage", "foo://bar"], "not a path or storage URI that pyarrow opens"),  # traceback
    (TRAIN + ["--workers", "1", "--storage", "file:///proc/rayad"], "--storage /proc/rayad: /proc is not writable"),
    (TRAIN + ["--steps", "5", "--set", "train.steps=abc"], "--steps and --set train.steps: give one of them"),
    (TRAIN + ["--config", "{tmp}/zero_section.yaml"], "section 'train' must be a mapping, got 0"),  # read as {}
    (["train", "--data", "{tmp}/file", "--category", "brick", "--out", "{tmp}/o"],
     "{tmp}/file: data root is a file, not a folder"),
    (TRAIN + ["--steps", "-5"], "overrides (--steps): train.steps = -5 is out of range"),  # it said --set
    (TRAIN + ["--set", "model.widths=[8,16,32,64]", "--image-size", "40"],
     "overrides (--set, --image-size): data.image_size = 40 must be a multiple of 16"),
    (["train", "--data", "{demo}", "--category", "", "--out", "{tmp}/o"], "category '': must name a folder"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", ".."], "category '..': must name a folder"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "grass2"], "category 'grass2' not found"),
    (["tune", "--data", "{demo}", "--category", "brick", "--space", "quick", "--out", "{tmp}/t", "--metric", ""],
     "metric '': choose from"),  # it searched the default metric
    # refused before the search began: no folder is left, not even one holding the manifest
    (["tune", "--data", "{demo}", "--category", "brick", "--space", "quick", "--out", "{tmp}/t", "--val-data",
      "{tmp}/empty"], "category 'brick' not found in {tmp}/empty"),
    # checked when the model or the corruption is built: still before the run writes its manifest
    (TRAIN + ["--set", "corruption.shapes=[bogus]"], "corruption.shapes: unknown ['bogus']"),
    (TRAIN + ["--set", "model.act=bogus"], "model.act = 'bogus' is not an activation"),
    (TRAIN + ["--set", "train.precision=fp16"], "precision fp16 needs a CUDA device"),
    (TRAIN + ["--workers", "1", "--set", "model.name=bogus"], "model.name = 'bogus'; registered models"),
    (["predict", "--run", "{run}", "{tmp}/latin"], "latin/caf\\xe9.png: the file name is not valid UTF-8; rename it"),
    (["predict", "--run", "{run}", "{tmp}/pipe.png"], "pipe.png: not a regular file"),  # reading it would block
    (["train", "--data", "{demo}", "--category", "brick", "--out", "{tmp}/dangling"],
     "{tmp}/dangling is a symbolic link to {tmp}/nowhere, which does not exist"),
    (["predict", "--run", "{run}", "{demo}/brick/test/good", "--out", "{tmp}/dangling/p.parquet"], "nowhere, which"),
    (["data", "demo", "--out", "{tmp}/dangling"], "is a symbolic link"),
    # /proc and /sys take no new files, even from root: refused before the evaluation, not after it
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "/proc/rayad.json"],
     "--json /proc/rayad.json: /proc is not writable"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "/sys/rayad.json"],
     "--json /sys/rayad.json: /sys is not writable"),
    # a link is written through: its target's folder must take a file, not the link's
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "{tmp}/link.json"],
     "--json {tmp}/link.json: {tmp}/link.json is not writable"),
    # an OSError past the checks (here: a full disk) is one line too, naming the file asked for
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "/dev/full"],
     "rayad evaluate: error: /dev/full: No space left on device"),
])
def test_user_errors_exit_2_with_one_line(args, needle, tmp_path, demo_root, trained_run, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("results already written")
    (tmp_path / "latin1.yaml").write_bytes("train: {steps: 5}  # é\n".encode("latin-1"))
    (tmp_path / "int_keys.yaml").write_text("1: a\nfoo: b\n")
    (tmp_path / "zero_section.yaml").write_text("train: 0\n")
    (tmp_path / "link.json").symlink_to("/proc/version")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "latin").mkdir()
    Path(os.fsdecode(os.fsencode(tmp_path / "latin") + b"/caf\xe9.png")).write_bytes(b"")  # a Latin-1 name
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "exp" / "model.pt").mkdir(parents=True)
    args = [a.format(demo=demo_root, tmp=tmp_path, run=trained_run) for a in args]
    before = set(tmp_path.rglob("*"))
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle.format(tmp=tmp_path) in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "results already written"
    assert set(tmp_path.rglob("*")) == before  # not even an empty --out folder is left behind


@pytest.mark.parametrize("args, needle", [  # each wrote its table or metrics over the file, exit 0
    (["predict", "--run", "{run}", "{image}", "--out", "{image}"], "is an image it scores ({image})"),
    (["predict", "--run", "{run}", "{good}", "--out", "{image}"], "is an image it scores ({good})"),
    (["predict", "--run", "{run}", "{image}", "--out", "{run}/model.json"], "is a file of the model --run {run}"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "{run}/model.json"],
     "is a file of the model"),
    (["evaluate", "--run", "{run}", "--data", "{demo}", "--category", "brick", "--json", "{image}"],
     "is an image of the dataset --data {demo}"),
])
def test_an_output_file_never_overwrites_what_the_command_reads(args, needle, demo_root, trained_run, capsys):
    good = demo_root / "brick" / "test" / "good"
    names = {"demo": demo_root, "run": trained_run, "good": good, "image": good / "000.png"}
    files = [good / "000.png", trained_run / "model.json"]
    before = [f.read_bytes() for f in files]
    assert main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle.format(**names) in err and "which the command reads; give another file name" in err
    assert [f.read_bytes() for f in files] == before



def test_train_logs_to_mlflow(tmp_path, demo_root, capsys, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "tracked-run"
    assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", str(run), "--mlflow", uri,
                 *TINY_ARGS]) == 0
    assert "logged to MLflow" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("tracked-run").experiment_id])
    assert logged.data.params["train.steps"] == "6" and logged.data.params["data.image_size"] == "32"
    logged_steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    history = client.get_metric_history(logged.info.run_id, "loss")
    assert [m.value for m in history] == pytest.approx([s["loss"] for s in logged_steps])
    assert [m.timestamp for m in history] == [int(s["logged_at"] * 1000) for s in logged_steps]  # not the upload's
    assert "logged_at" not in logged.data.metrics
    assert logged.data.metrics["threshold"] == pytest.approx(json.loads((run / "model.json").read_text())["threshold"])


def test_evaluate_says_why_a_split_of_good_images_has_no_metrics(tmp_path, demo_root, trained_run, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "brick", data / "brick", ignore=shutil.ignore_patterns("ground_truth"))
    for folder in (data / "brick" / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    assert main(["evaluate", "--run", str(trained_run), "--data", str(data), "--category", "brick"]) == 0
    out = capsys.readouterr().out
    assert "image_auroc" in out and "the test split lacks one of the two" in out  # a table of '-' alone before


@pytest.mark.parametrize("masks", ["none", "empty"])
def test_evaluate_says_why_it_has_no_pixel_metrics(masks, tmp_path, demo_root, trained_run, capsys):
    """A '-' under pixel AUROC went unexplained: no masks, or masks that mark nothing (a 16-bit colour PNG)."""
    data = tmp_path / "data"
    shutil.copytree(demo_root / "brick", data / "brick")
    for mask in (data / "brick" / "ground_truth").rglob("*.png"):
        if masks == "none":
            mask.unlink()
        else:
            Image.new("L", Image.open(mask).size).save(mask)
    assert main(["evaluate", "--run", str(trained_run), "--data", str(data), "--category", "brick"]) == 0
    said = {"none": "no pixel metric where '-': its anomalous images have no ground-truth masks",
            "empty": "no pixel metric where '-': the masks of its anomalous images mark no pixel, or every pixel"}
    assert said[masks] in capsys.readouterr().out


def test_predict_of_a_folder_leaves_hidden_files_and_folders_out(trained_run, demo_root, tmp_path):
    """As datasets do: macOS's `._000.png` failed as a bad image, a notebook's checkpoint copy was scored."""
    folder = tmp_path / "images"
    shutil.copytree(demo_root / "brick" / "test" / "good", folder)
    (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    shutil.copytree(folder, folder / ".ipynb_checkpoints", ignore=shutil.ignore_patterns(".*"))
    out = tmp_path / "p.parquet"
    assert main(["predict", "--run", str(trained_run), str(folder), "--out", str(out)]) == 0
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.glob("[!.]*.png"))
    assert all(r["error"] is None for r in rows)


def test_train_into_out_dot_logs_to_the_experiment_named_after_the_folder(tmp_path, demo_root, monkeypatch):
    from mlflow import MlflowClient

    run = tmp_path / "dot-run"
    run.mkdir()
    monkeypatch.chdir(run)  # MLflow's experiment was '' (a traceback after training)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", ".", "--mlflow", uri,
                 *TINY_ARGS]) == 0
    client = MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("dot-run").experiment_id])
    assert logged.info.run_name == "dot-run"
    chosen = json.loads((run / "model.json").read_text())
    assert logged.data.params["scoring.tta"] == chosen["config"]["scoring"]["tta"] != "auto"  # as the model scores
    assert logged.data.params["precision.scoring"] == chosen["precision"]["scoring"]["precision"]


def test_a_deleted_mlflow_experiment_fails_before_training(tmp_path, demo_root, capsys, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("deleted-run"))
    capsys.readouterr()  # MLflow's own logs as it made the store
    assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", str(tmp_path / "deleted-run"),
                 "--mlflow", uri, *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "its experiment 'deleted-run' (named after --out) is deleted" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "deleted-run").exists()


def test_mlflow_failing_after_training_says_the_model_is_written(tmp_path, demo_root, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").write_text("")  # where a sqlite store puts a new experiment's artifacts
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", str(run), "--mlflow",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()  # the training's progress, then the error
    assert f"the model is written to {run}, but logging it to MLflow failed" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert (run / "model.json").is_file()


def test_a_read_only_mlflow_database_fails_before_training(tmp_path, demo_root, capsys):
    """It opened for reading, the training ran, and MLflow's 70-line traceback came before rayad's line."""
    import sqlite3

    database = tmp_path / "mlflow.db"
    sqlite3.connect(database).close()
    if subprocess.run(["chattr", "+i", str(database)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable files (chattr), which even root cannot write")
    try:
        assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", str(tmp_path / "r"),
                     "--mlflow", f"sqlite:///{database}", *TINY_ARGS]) == 2
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)
    err = capsys.readouterr().err.strip()
    assert err.endswith("MLflow cannot use it (OperationalError: attempt to write a readonly database)"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_an_mlflow_server_that_answers_an_error_fails_at_once(tmp_path, demo_root, capsys):
    """A proxy whose MLflow is down answers 503: MLflow retried for 4 minutes before the check failed."""
    from servers import free_port

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(503)

        def log_message(self, *args):
            pass
    with http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Unavailable) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started = time.monotonic()
        assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", str(tmp_path / "r"),
                     "--mlflow", f"http://127.0.0.1:{server.server_address[1]}", *TINY_ARGS]) == 2
        server.shutdown()
    assert time.monotonic() - started < 30 and "MLflow cannot use it" in capsys.readouterr().err


def test_mlflow_failing_after_a_search_says_the_best_model_is_written(tmp_path, monkeypatch):
    """An MLflow that failed at the search's `best` run gave a traceback and exit code 1 after the whole search."""
    from rayad import tracking

    def fails(uri, experiment):
        raise RuntimeError("Cannot set a deleted experiment 'exp' as the active experiment.\nmore")
    monkeypatch.setattr(tracking, "_client_for", fails)
    with pytest.raises(RayadError, match=rf"^mlflow 'sqlite:///x.db' \(--mlflow\): the search is finished and its "
                                         rf"best model is in {tmp_path}/best, but logging it to MLflow failed "
                                         r"\(RuntimeError: Cannot set a deleted experiment 'exp' as the active "
                                         r"experiment.\)$"):
        tracking.log_best("sqlite:///x.db", "exp", tmp_path, {"best": {}})


def test_mlflow_missing_is_one_line_naming_the_extra(tmp_path, demo_root, capsys, monkeypatch):

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as when rayad[mlflow] is not installed
    assert main(["train", "--data", str(demo_root), "--category", "brick", "--out", str(tmp_path / "r"),
                 "--mlflow", "sqlite:///x.db", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("mlflow (--mlflow) needs MLflow: pip install 'rayad[mlflow]'") and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # failed before any work


def test_a_listed_error_is_one_line_with_its_first_item_a_count_and_the_hint(tmp_path, demo_root, capsys, caplog):
    shutil.copytree(demo_root / "brick", tmp_path / "brick")
    bad = sorted((tmp_path / "brick" / "train" / "good").glob("*.png"))[:2]
    for path in bad:
        path.write_bytes(b"not an image")
    args = ["train", "--data", str(tmp_path), "--category", "brick", "--out", str(tmp_path / "run"), *TINY_ARGS]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"rayad train: error: 2 bad image(s) in the train split — {bad[0]}: not a readable image")
    assert err.endswith("(+1 more: rayad -v lists them) (set data.on_bad_image=skip to skip them)"), err
    with caplog.at_level("DEBUG", logger="rayad.cli"):
        assert main(["-v", *args]) == 2
    assert f"{bad[1]}: not a readable image" in caplog.text


def test_a_folder_that_a_running_command_writes_is_refused_to_a_second(demo_root, tiny_space, tmp_path, capsys):
    """Two `rayad train` into one folder both ran: the later resumed the other's checkpoint without --resume, and
    their logs and models mixed. Two searches into one folder mixed their trials."""
    run = tmp_path / "run"
    budget = [arg for key, value in {**TINY, "train.steps": 10**6, "train.checkpoint_every": 20}.items()
              for arg in ("--set", f"{key}={value}")]
    train = ["train", "--data", str(demo_root), "--category", "brick", "--out", str(run), *budget]
    first = subprocess.Popen([sys.executable, "-m", "rayad.cli", *train], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "train_log.jsonl").exists():  # training has begun
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        for again in (train, [*train, "--resume"]):
            assert main(again) == 2
            assert capsys.readouterr().err == (f"rayad train: error: {run}: another rayad command is writing there; "
                                               "wait for it to end, or give another folder\n")
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "another rayad command" not in err, err[-2000:]
    exp = tmp_path / "exp"
    search = ["tune", "--data", str(demo_root), "--category", "brick", "--space", str(tiny_space), "--trials", "1",
              "--out", str(exp)]
    with writing(exp):  # as a running search, or its --resume, does (taken before Ray starts)
        assert main(search) == 2
    assert capsys.readouterr().err == (f"rayad tune: error: {exp}: another rayad command is writing there; wait for "
                                       "it to end, or give another folder\n")


def test_sigterm_stops_training_as_ctrl_c_does_even_where_ctrl_c_is_ignored(demo_root, tmp_path):
    """A shell's background job (and nohup) ignores SIGINT; SIGTERM must still stop it, as Ctrl-C would."""
    code, err = sigterm_after_first_checkpoint(demo_root, tmp_path / "run", "checkpoints/step_*",
                                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    said = err.strip().splitlines()[-1]
    assert code == 130 and said.startswith(f"rayad train: interrupted: stopped; its last checkpoint is "
                                           f"{tmp_path / 'run' / 'checkpoints'}/step_000"), err[-2000:]
    assert said.endswith("; the state is saved: resume with the same command and --resume")
    assert "Traceback" not in err


def test_json_to_dev_stdout_follows_the_table_into_a_pipe_or_a_file(trained_run, demo_root, tmp_path):
    """Into a pipe it was refused as not writable (/dev/stdout resolved to /proc/PID/fd/pipe:[N]); into a file the
    shell had redirected, the file was replaced, and the metrics table printed before the JSON was lost."""
    command = [sys.executable, "-m", "rayad.cli", "evaluate", "--run", str(trained_run), "--data", str(demo_root),
               "--category", "brick", "--json", "/dev/stdout"]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    (tmp_path / "out.txt").write_text("earlier\n")
    with open(tmp_path / "out.txt", "a") as appended:  # >>
        assert subprocess.run(command, stdout=appended, timeout=120).returncode == 0
    in_file = (tmp_path / "out.txt").read_text()
    assert in_file.startswith("earlier\n") and in_file.removeprefix("earlier\n") == piped.stdout
    table, _, written = piped.stdout.partition("\n{")
    assert "image_auroc" in table and json.loads("{" + written)["image_auroc"] is not None


def test_a_benchmark_script_logs_the_whole_list_it_has_no_v_for(capsys, caplog, monkeypatch):
    from rayad.cli import run_script
    from rayad.errors import RayadError

    def fails():
        raise RayadError("2 bad image(s):\n  a.png: not an image\n  b.png: not an image")
    monkeypatch.setattr(sys, "argv", ["ablation.py"])
    with pytest.raises(SystemExit) as stop:
        run_script(fails)
    assert stop.value.code == 2 and "b.png: not an image" in caplog.text  # at ERROR: a script has no -v
    assert capsys.readouterr().err == ("ablation.py: error: 2 bad image(s) — a.png: not an image (+1 more: listed "
                                       "above)\n")


def test_the_command_line_starts_without_the_metrics_or_torch():
    """Every command imports rayad.cli first: scipy (through rayad.metrics) and torch took over half a second."""
    code = ("import sys, rayad.cli; heavy = [m for m in ('rayad.metrics', 'scipy', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
