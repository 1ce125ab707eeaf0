"""Every dashboard page in Streamlit's AppTest on a real search experiment: what is shown matches the store,
broken store files give a message instead of a crash, and the store is never written."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from rayad.artifact import Predictor, model_version
from rayad.results import threshold_stats

pytestmark = pytest.mark.slow  # uses the session's real search experiment

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture
def runs(tiny_experiment, tmp_path):
    """A runs directory holding a copy of the search experiment."""
    exp, _ = tiny_experiment
    shutil.copytree(exp, tmp_path / exp.name)
    return tmp_path


def open_page(runs: Path, monkeypatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv("RAYAD_RUNS", str(runs))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def store(exp: Path) -> tuple[dict, list[dict], dict]:
    trials = pq.read_table(exp / "trials.parquet").to_pylist()
    return json.loads((exp / "experiment.json").read_text()), trials, json.loads(
        (exp / "best" / "test_metrics.json").read_text())


def test_experiments_page_lists_the_experiment_with_its_counts_and_metrics(runs, monkeypatch):
    at = open_page(runs, monkeypatch)
    experiment, trials, test = store(runs / "brick-tiny")
    table = at.dataframe[0].value
    assert table["experiment"].tolist() == ["brick-tiny"]
    row = table.iloc[0]
    done = sum(t["status"] == "completed" for t in trials)
    assert row["trials completed"] == done and row["trials stopped early"] == len(trials) - done
    assert row["best_validation"] == max(t["best_value"] for t in trials)
    assert row["test image_auroc"] == experiment["best"]["test"]["image_auroc"] == test["image_auroc"]
    assert at.sidebar.selectbox[0].value == "brick-tiny"


def test_search_page_shows_every_trial_and_the_best_params(runs, monkeypatch):
    at = open_page(runs, monkeypatch, "search")
    experiment, trials, _ = store(runs / "brick-tiny")
    assert at.title[0].value == "Search: brick-tiny"
    assert next(m for m in at.metric if m.label == "Trials").value == str(len(trials))
    shown = at.dataframe[0].value
    assert sorted(shown["trial_id"]) == sorted(t["trial_id"] for t in trials)
    best = shown.loc[shown["trial_id"] == experiment["best"]["trial_id"]].iloc[0]
    for key, value in experiment["best"]["params"].items():
        name = key.removeprefix("config/")
        assert (best[name] == value) or (value is None and best[name] != best[name]), name
    best_metric = next(m for m in at.metric if m.label.startswith("Best "))
    assert best_metric.value == f"{max(t['best_value'] for t in trials):.4f}"
    # history, parallel coordinates, importance (from trials that reached the full budget: study.db records
    # the ASHA-stopped ones as PRUNED) and learning curves
    finished = sum(t["status"] == "completed" for t in trials)
    assert len(at.get("vega_lite_chart")) == (4 if finished >= 2 else 3)
    captions = [c.value for c in at.caption]
    if finished < 2:
        assert "Needs at least two finished trials." in captions
    else:  # the tiny search's few trials: the chart says how little it rests on
        assert any(f"of the {finished} trials that ran their whole budget" in c and "a hint, not a ranking" in c
                   for c in captions), captions
    assert len(at.multiselect[0].value) == min(5, len(trials))


def test_model_page_metrics_and_live_threshold(runs, monkeypatch):
    at = open_page(runs, monkeypatch, "model")
    _, _, test = store(runs / "brick-tiny")
    shown = {m.label: m.value for m in at.metric}
    assert shown["image auroc"] == f"{test['image_auroc']:.4f}" and shown["aupro"] == f"{test['aupro']:.4f}"
    per_defect = at.dataframe[0].value.set_index("defect type")
    assert set(per_defect.index) == {"all", *test["per_defect"]}
    assert per_defect.loc["hole", "image_auroc"] == test["per_defect"]["hole"]["image_auroc"]
    low, high = test["image_auroc_ci"]  # beside its AUROC, as is the pixel AUROC's
    assert f"[{low:.3f}, {high:.3f}] 95% CI" in [c.value for c in at.caption]
    defective = sum(test["labels"])
    assert f"calling every image defective gives F1 {2 * defective / (defective + len(test['labels'])):.4f}" in \
        " ".join(c.value for c in at.caption)
    slider = at.select_slider[0]
    assert slider.value == test["threshold"]
    scores, labels = np.array(test["scores"]), np.array(test["labels"])
    assert slider.options == [f"{v:.6f}" for v in np.unique(np.r_[scores, test["threshold"]])]  # a stop per image
    chosen = float(np.sort(scores)[len(scores) // 2])
    slider.set_value(chosen).run()
    assert at.select_slider[0].value == chosen
    expected = threshold_stats(scores, labels, chosen)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Precision"] == f"{expected['precision']:.3f}" and shown["F1"] == f"{expected['f1']:.3f}"
    confusion = at.table[0].value
    assert confusion.loc["defective", "predicted defective"] == expected["tp"]
    assert confusion.loc["good", "predicted defective"] == expected["fp"]


def test_gallery_shows_the_worst_misses_first(runs, monkeypatch):
    at = open_page(runs, monkeypatch, "gallery")
    _, _, test = store(runs / "brick-tiny")
    scores, labels = np.array(test["scores"]), np.array(test["labels"])
    assert len(at.image) == 5 * min(12, len(scores))
    threshold = float(np.sort(scores)[len(scores) // 2])
    at.select_slider[0].set_value(threshold).run()
    misses = (scores >= threshold) != labels.astype(bool)
    at.segmented_control[0].set_value("Misses").run()
    assert not at.exception
    assert f"{misses.sum()} of {len(scores)} images" in at.caption[0].value
    captions = [c for image in at.image for c in image.captions if " · score " in c]
    shown_scores = [float(c.rsplit(" ", 1)[1]) for c in captions]
    # how far each miss lies on the wrong side: false negatives (defective) below, false positives above
    wrong_by = np.where(labels[misses] == 1, threshold - scores[misses], scores[misses] - threshold)
    expected = [f"{s:.6f}" for s in scores[misses][np.argsort(-wrong_by, kind="stable")]][:12]
    assert [f"{s:.6f}" for s in shown_scores] == expected  # false negatives came highest score first
    at.multiselect[0].set_value(["hole"]).run()
    hole = np.array(test["defect_types"]) == "hole"
    assert at.caption[0].value.startswith(f"{(misses & hole).sum()} of {hole.sum()} images · false negatives "
                                          f"{(misses & hole).sum()} · false positives 0 ")  # counts of all types before


def test_try_it_scores_an_upload_like_predict(runs, monkeypatch, demo_root):
    monkeypatch.delenv("RAYAD_SERVE_URL", raising=False)
    at = open_page(runs, monkeypatch, "try_it")
    assert "best model" in at.caption[0].value
    image = demo_root / "brick" / "test" / "crack" / "000.png"
    at.file_uploader[0].set_value(("crack.png", image.read_bytes(), "image/png")).run()
    assert not at.exception
    expected = Predictor.load(runs / "brick-tiny" / "best").predict_files([image])[0]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Score"] == f"{expected.scores[0]:.6f}"
    assert shown["Label"] == ("defective" if expected.labels[0] else "good")
    assert len(at.image[0].value) == 1 and len(at.image) == 3


def test_try_it_shows_a_16_bit_upload_as_the_model_sees_it(runs, monkeypatch, demo_root, tmp_path):
    # the upload was shown as it came, and Streamlit cannot re-encode 16-bit pixels for the browser
    monkeypatch.delenv("RAYAD_SERVE_URL", raising=False)
    gray = np.asarray(Image.open(demo_root / "brick" / "test" / "crack" / "000.png").convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    at = open_page(runs, monkeypatch, "try_it")
    at.file_uploader[0].set_value(("deep.png", (tmp_path / "deep.png").read_bytes(), "image/png")).run()
    assert not at.exception and len(at.image) == 3
    expected = Predictor.load(runs / "brick-tiny" / "best").predict_files([tmp_path / "deep.png"])[0]
    assert {m.label: m.value for m in at.metric}["Score"] == f"{expected.scores[0]:.6f}"


def test_try_it_reports_bad_uploads_and_an_unreachable_serve_endpoint(runs, monkeypatch):
    at = open_page(runs, monkeypatch, "try_it")
    at.file_uploader[0].set_value(("broken.png", b"not an image", "image/png")).run()
    assert not at.exception and at.error[0].value.startswith("Not a usable image: broken.png: not a readable")
    monkeypatch.setenv("RAYAD_SERVE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    at = open_page(runs, monkeypatch, "try_it")
    at.file_uploader[0].set_value(("a.png", b"bytes", "image/png")).run()
    assert not at.exception and "Cannot reach the Serve endpoint" in at.error[0].value


class ForeignServer(http.server.BaseHTTPRequestHandler):
    """Answers as `server.mode` says: an HTML page, nothing (the connection closed), or rayad's model list and a
    prediction without its images."""

    def do_GET(self):
        self.answer({"models": [{"name": "brick", "version": self.server.version}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.answer({"score": 0.5, "label": True, "threshold": 0.2})

    def answer(self, reply: dict) -> None:
        if self.server.mode == "close":
            self.close_connection = True
            return
        html = self.server.mode == "html"
        body = b"<html>\n<p>Welcome to nginx!</p>\n</html>" if html else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if html else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def foreign_server(mode: str, version: str) -> Iterator[str]:
    """A real HTTP server in a thread, answering as ForeignServer does in `mode`; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ForeignServer)
    server.mode, server.version = mode, version
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("mode", "what"), [("html", "not JSON: `<html> <p>Welcome to nginx!</p> </html>`"),
                                            ("close", "Remote end closed connection without response"),
                                            ("no-images", "answered no heatmap_png, mask_png")])
def test_try_it_says_in_one_line_when_the_serve_endpoint_is_not_rayads(runs, monkeypatch, mode, what):
    version = model_version(runs / "brick-tiny" / "best")
    with foreign_server(mode, version) as url:
        monkeypatch.setenv("RAYAD_SERVE_URL", url)
        at = open_page(runs, monkeypatch, "try_it")
        at.file_uploader[0].set_value(("a.png", b"bytes", "image/png")).run()
    error = at.error[0].value
    assert not at.exception and len(at.error) == 1 and "\n" not in error
    assert error.startswith(f"The Serve endpoint {url} answered something that is not rayad's API (") and what in error


def test_broken_files_give_a_message_not_a_crash(runs, monkeypatch, tiny_experiment):
    shutil.copytree(runs / "brick-tiny", runs / "broken")
    (runs / "broken" / "trials.parquet").write_bytes(b"PAR1 truncated")
    (runs / "broken" / "best" / "test_metrics.json").write_text("{")
    at = open_page(runs, monkeypatch)
    assert at.dataframe[0].value["experiment"].tolist() == ["brick-tiny"]
    assert "`broken`" in at.warning[0].value and "trials.parquet is unreadable" in at.warning[0].value
    at.sidebar.selectbox[0].set_value("broken").run()
    for page, message in [("search", "trials.parquet is unreadable"), ("model", "test_metrics.json is unreadable"),
                          ("gallery", "test_metrics.json is unreadable")]:
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception and message in at.error[0].value, page


def test_files_of_the_wrong_shape_give_a_message_not_a_crash(runs, monkeypatch):
    exp = runs / "brick-tiny"
    experiment, _, test = store(exp)
    damage = {  # experiment.json
        "no-modes": ({**experiment, "objective": {"metrics": ["val_image_auroc"]}}, "objective"),
        "bad-date": ({**experiment, "started_at": "yesterday"}, "started_at"),
        "no-params": ({**experiment, "space": {"file": "x"}}, "space.params"),
        "far-future": ({**experiment, "started_at": 1e20}, "started_at"),  # pandas' dates end in 2262
    }
    for name, (content, _) in damage.items():
        shutil.copytree(exp, runs / name)
        (runs / name / "experiment.json").write_text(json.dumps(content))
    shutil.copytree(exp, runs / "foreign-trials")
    trial_ids = pq.read_table(exp / "trials.parquet").select(["trial_id"])
    pq.write_table(trial_ids, runs / "foreign-trials" / "trials.parquet")
    shutil.copytree(exp, runs / "short-lists")
    short = {**test, "labels": test["labels"][1:]}
    (runs / "short-lists" / "best" / "test_metrics.json").write_text(json.dumps(short))
    shutil.copytree(exp, runs / "nan-score")
    nan = {**test, "scores": [float("nan"), *test["scores"][1:]]}
    (runs / "nan-score" / "best" / "test_metrics.json").write_text(json.dumps(nan))
    at = open_page(runs, monkeypatch)  # no exception, and the healthy experiments are still listed
    assert set(at.dataframe[0].value["experiment"]) == {"brick-tiny", "foreign-trials", "short-lists", "nan-score"}
    warnings = " ".join(w.value for w in at.warning)
    assert all(f"`{name}`" in warnings and message in warnings for name, (_, message) in damage.items())
    for name, page, message in [("foreign-trials", "search", "trials.parquet lacks the column(s) status, started_at"),
                                ("short-lists", "model", "per-image lists"),
                                ("short-lists", "gallery", "per-image lists"),
                                ("nan-score", "model", f"1 of {len(nan['scores'])} scores are NaN or infinite"),
                                ("nan-score", "gallery", "scores are NaN or infinite")]:
        at.sidebar.selectbox[0].set_value(name).run()
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception and message in at.error[0].value, (name, page)


def test_a_folder_whose_name_is_not_utf8_is_left_out_and_named(tmp_path, monkeypatch):
    """Streamlit cannot send such a name: every page failed. (A folder that cannot be read is left out the same
    way, `layout.scan_experiments`; tests/test_results.py reads it as another user.)"""
    experiment = {"category": "x", "objective": {"metrics": ["val_image_auroc"], "modes": ["max"]}, "settings": {},
                  "space": {"params": {}}}
    for name in (b"ok", b"bad\xffname"):  # os.fsdecode: Python's name for the last has a surrogate
        os.mkdir(os.path.join(bytes(tmp_path), name))
        (tmp_path / os.fsdecode(name) / "experiment.json").write_text(json.dumps(experiment))
    at = open_page(tmp_path, monkeypatch)
    assert at.sidebar.selectbox[0].options == ["ok"] and at.dataframe[0].value["experiment"].tolist() == ["ok"]
    assert [w.value for w in at.warning] == [
        "Folder `bad\\xffname` is left out: its name is not valid UTF-8, which the dashboard cannot show; rename it"]


def test_names_are_shown_as_they_are_not_as_markdown(runs, monkeypatch):
    name = "*sp* `x`"
    shutil.copytree(runs / "brick-tiny", runs / name)
    (runs / name / "best" / "test_metrics.json").write_text("{")
    at = open_page(runs, monkeypatch)
    at.sidebar.selectbox[0].set_value(name).run()
    at.switch_page("app_pages/model.py").run()
    assert at.title[0].value == r"Model: \*sp\* \`x\`"
    assert at.error[0].value.startswith(f"Experiment `` {runs / name} ``: ")  # a code span that holds backticks


def test_one_experiment_as_the_runs_directory_shows_on_every_page(runs, monkeypatch):
    for page in ("search", "model", "gallery"):  # `rayad dashboard --runs EXP` sets RAYAD_RUNS to it
        at = open_page(runs / "brick-tiny", monkeypatch, page)
        assert not at.error and at.sidebar.selectbox[0].value == "brick-tiny", page


def test_a_corrupt_study_db_gives_a_message_on_the_search_page(runs, monkeypatch):
    (runs / "brick-tiny" / "study.db").write_bytes(b"not a database\n" * 512)
    at = open_page(runs, monkeypatch, "search")  # no exception
    _, trials, _ = store(runs / "brick-tiny")
    assert len(at.error) == 1 and "study.db is unreadable (file is not a database)" in at.error[0].value
    assert len(at.dataframe[0].value) == len(trials)  # the rest of the page still shows
    assert len(at.get("vega_lite_chart")) == 3  # history, parallel coordinates, learning curves


def test_corrupt_weights_give_a_message_on_the_gallery_and_try_it(runs, monkeypatch, demo_root):
    weights = runs / "brick-tiny" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    at = open_page(runs, monkeypatch, "gallery")
    assert "best/model.safetensors is unreadable" in at.error[0].value and len(at.image) == 0
    at.switch_page("app_pages/model.py").run()  # pages that need no weights keep working
    assert not at.exception and not at.error and at.metric
    monkeypatch.delenv("RAYAD_SERVE_URL", raising=False)
    at = open_page(runs, monkeypatch, "try_it")
    image = demo_root / "brick" / "test" / "crack" / "000.png"
    at.file_uploader[0].set_value(("crack.png", image.read_bytes(), "image/png")).run()
    assert not at.exception and "best/model.safetensors is unreadable" in at.error[0].value


def test_a_moved_test_image_gives_a_message_and_the_others_still_show(runs, monkeypatch, tmp_path_factory):
    exp = runs / "brick-tiny"
    metrics = json.loads((exp / "best" / "test_metrics.json").read_text())
    images = tmp_path_factory.mktemp("test-images")  # a copy of the test images, one of which then moves away
    copies = [images / f"{i:03d}{Path(p).suffix}" for i, p in enumerate(metrics["paths"])]
    for source, copy in zip(metrics["paths"], copies, strict=True):
        shutil.copyfile(source, copy)
    (exp / "best" / "test_metrics.json").write_text(json.dumps({**metrics, "paths": [str(c) for c in copies]}))
    worst = copies[int(np.argmax(metrics["scores"]))]  # shown first on the first page
    worst.unlink()
    at = open_page(runs, monkeypatch, "gallery")  # no exception
    assert len(at.error) == 1 and f"{worst}: file not found" in at.error[0].value
    shown = min(12, len(copies))
    assert len(at.image) == 5 * (shown - 1)
    assert len([c for image in at.image for c in image.captions if " · score " in c]) == shown - 1


def test_an_empty_runs_directory_explains_what_to_do(tmp_path, monkeypatch):
    at = open_page(tmp_path, monkeypatch)
    assert "No experiments" in at.info[0].value


def test_the_dashboard_never_writes_to_the_store(runs, monkeypatch):
    def snapshot():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(runs.rglob("*")) if p.is_file()}

    before = snapshot()
    at = open_page(runs, monkeypatch)
    for page in ("search", "model", "gallery", "try_it"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception
    assert snapshot() == before


def test_a_running_search_is_shown_live(runs, monkeypatch):
    exp = runs / "brick-tiny"
    record = json.loads((exp / "experiment.json").read_text())
    (exp / "experiment.json").write_text(json.dumps({**record, "status": "running", "best": None}))
    at = open_page(runs, monkeypatch)
    assert at.dataframe[0].value.iloc[0]["status"] == "running"
    assert "refreshes every 5 s" in at.caption[0].value
    at.switch_page("app_pages/search.py").run()
    assert not at.exception and "status running" in at.caption[0].value
    shutil.rmtree(exp / "best")  # written when the search ends
    for page in ("model", "gallery", "try_it"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception and not at.error and not at.file_uploader, page
        assert [i.value for i in at.info] == ["No best model yet: the search is still running."], page


@pytest.mark.parametrize("status, said, no_best", [
    ("interrupted", "--resume` goes on with it", "No best model: the search was stopped before it chose one."),
    ("failed", "This search failed: RayadError: no trial scored", "No best model: the search failed before it chose "
                                                                    "one.")])
def test_a_stopped_search_says_so_and_is_not_refreshed(runs, monkeypatch, status, said, no_best):
    exp = runs / "brick-tiny"
    record = json.loads((exp / "experiment.json").read_text())
    (exp / "experiment.json").write_text(json.dumps({**record, "status": status, "best": None,
                                                     "error": "RayadError: no trial scored"}))
    at = open_page(runs, monkeypatch)
    assert at.dataframe[0].value.iloc[0]["status"] == status
    assert not any("refreshes every" in c.value for c in at.caption)
    at.switch_page("app_pages/search.py").run()
    shown = [m.value for m in (*at.info, *at.warning)]
    assert not at.exception and any(said in m for m in shown), shown
    shutil.rmtree(exp / "best")
    for page in ("model", "gallery", "try_it"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception and not at.error and [i.value for i in at.info] == [no_best], page
