"""The read-only results store views behind the dashboard, checked against sklearn and broken files."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
from accounts import open_folder, private, unprivileged
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_curve

from rayad import layout, results
from rayad.cli import main
from rayad.dashboard import streamlit_command
from rayad.metrics import pixel_curves

GOOD_EXPERIMENT = {"category": "x", "objective": {"metrics": ["val_image_auroc"], "modes": ["max"]}, "settings": {},
                   "space": {"params": {}}}

@pytest.mark.parametrize("seed", range(5))
def test_threshold_stats_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores, labels = rng.random(50).round(2), rng.integers(0, 2, 50)
    threshold = float(np.quantile(scores, rng.random()))
    stats = results.threshold_stats(scores, labels, threshold)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert (stats["tn"], stats["fp"], stats["fn"], stats["tp"]) == (tn, fp, fn, tp)
    assert stats["precision"] == pytest.approx(precision_score(labels, predicted, zero_division=0))
    assert stats["recall"] == pytest.approx(recall_score(labels, predicted, zero_division=0))
    assert stats["f1"] == pytest.approx(f1_score(labels, predicted, zero_division=0))


def test_outcome_names_each_image():
    images = pd.DataFrame({"score": [0.9, 0.9, 0.1, 0.1], "label": [1, 0, 1, 0]})
    assert results.outcome(images, 0.5).tolist() == ["true positive", "false positive", "false negative",
                                                     "true negative"]


def test_pixel_curves_are_thinned_points_of_sklearns_curve():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 32, 32)) < 0.2
    maps = rng.random((4, 32, 32)).astype(np.float32) + masks * 0.5
    curves = pixel_curves(maps, masks, points=50)
    fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    exact = set(zip(fpr.round(12), tpr.round(12), strict=True))
    shown = list(zip(np.round(curves["roc"]["fpr"], 12), np.round(curves["roc"]["tpr"], 12), strict=True))
    assert len(shown) <= 50 and shown[0] == (0, 0) and shown[-1] == (1, 1) and set(shown) <= exact
    assert pixel_curves(maps, None) is None and pixel_curves(maps, np.zeros_like(masks)) is None


def test_a_write_that_fails_midway_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("written before")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        layout.atomic_write(path, fail)
    assert path.read_text() == "written before" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_write_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "shared").mkdir()
    target, link = tmp_path / "shared" / "metrics.json", tmp_path / "metrics.json"
    target.write_text("old")
    link.symlink_to(target)
    layout.atomic_write(link, lambda p: p.write_text("new"))
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["metrics.json"]


def test_a_failed_write_names_the_file_asked_for_not_the_temporary_one(tmp_path):
    def fail(tmp):
        raise PermissionError(13, "Permission denied", str(tmp))

    with pytest.raises(PermissionError) as err:
        layout.atomic_write(tmp_path / "metrics.json", fail)
    assert err.value.filename == str(tmp_path / "metrics.json") and err.value.strerror == "Permission denied"


def test_scan_experiments_at_one_or_two_levels(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "experiment.json").write_text("{}")
    (tmp_path / "demo" / "brick").mkdir(parents=True)
    (tmp_path / "demo" / "brick" / "trials.parquet").write_bytes(b"")
    (tmp_path / "data" / "x").mkdir(parents=True)
    assert layout.scan_experiments(tmp_path)[0] == [tmp_path / "a", tmp_path / "demo" / "brick"]
    assert layout.scan_experiments(tmp_path / "a")[0] == [tmp_path / "a"]
    assert layout.scan_experiments(tmp_path / "missing")[0] == []


def test_a_folder_that_cannot_be_read_hides_no_other_experiment():
    with open_folder() as runs:
        for exp in ("a", "private", "demo/brick", "demo/private"):
            (runs / exp).mkdir(parents=True)
            (runs / exp / "experiment.json").write_text("{}")
        private(runs / "private")
        private(runs / "demo" / "private")
        with unprivileged():
            found, unreadable = layout.scan_experiments(runs)
            assert layout.scan_experiments(runs)[0] == found == [runs / "a", runs / "demo" / "brick"]
    assert unreadable == {runs / "private": "Permission denied", runs / "demo" / "private": "Permission denied"}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("experiment.json", None, "experiment.json is missing"),
    ("experiment.json", "{not json", "experiment.json is unreadable"),
    ("experiment.json", "[1, 2]", "not a JSON object"),
    ("experiment.json", json.dumps({"category": "x"}), "lacks objective, settings, space"),
    ("trials.parquet", "PAR1garbage", "trials.parquet is unreadable"),
    ("experiment.json", json.dumps({**GOOD_EXPERIMENT, "best": 5}), "unexpected best"),  # raised AttributeError
    ("experiment.json", json.dumps({**GOOD_EXPERIMENT, "best": {"test": 3}}), "unexpected best"),
    # pages crashed (an unhashable status, a number as a chart title) or showed the worse trial as the best
    ("experiment.json", json.dumps({**GOOD_EXPERIMENT, "status": ["x"]}), "unexpected status"),
    ("experiment.json", json.dumps({**GOOD_EXPERIMENT, "category": 7}), "unexpected category"),
    ("experiment.json", json.dumps({**GOOD_EXPERIMENT, "objective": {"metrics": [5], "modes": ["max"]}}),
     "unexpected objective's metric names"),
    ("experiment.json", json.dumps({**GOOD_EXPERIMENT, "objective": {"metrics": ["m"], "modes": ["bogus"]}}),
     "unexpected objective's metric names"),
])
def test_a_broken_file_becomes_the_experiments_problem(tmp_path, name, content, message):
    (tmp_path / "experiment.json").write_text(json.dumps(GOOD_EXPERIMENT))
    if content is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_text(content)
    assert message in results.overview(tmp_path)["problem"]


@pytest.mark.parametrize("started_at", [1e20, -1, float("nan"), float("inf"), True, "yesterday"])
def test_an_implausible_start_time_is_the_experiments_problem(tmp_path, started_at):
    (tmp_path / "experiment.json").write_text(json.dumps({**GOOD_EXPERIMENT, "started_at": started_at}))
    assert "unexpected started_at" in results.overview(tmp_path)["problem"]  # 1e20 raised OutOfBoundsDatetime
    (tmp_path / "experiment.json").write_text(json.dumps({**GOOD_EXPERIMENT, "started_at": 1.7e9}))
    assert results.overview(tmp_path)["started"] == pd.Timestamp("2023-11-14 22:13:20")


def test_test_results_need_per_image_scores(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "test_metrics.json").write_text(json.dumps({"image_auroc": 0.9}))
    with pytest.raises(results.StoreError, match="lacks per-image scores"):
        results.read_test_results(tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ({"scores": [0.1, float("nan"), 0.3]}, "1 of 3 scores are NaN or infinite"),
    ({"scores": [0.1, "high", 0.3]}, "must be numbers"),
    ({"threshold": None}, "must be numbers"),
    ({"pixel_threshold": float("inf")}, "a threshold is NaN or infinite"),
    # the Model page crashed on each: a format code, .items() of a list, a DataFrame of a number
    ({"image_auroc": "x"}, "unexpected image_auroc, pixel_auroc, aupro, f1_max \\(numbers or null\\)"),
    ({"per_defect": [1, 2]}, "unexpected per_defect"),
    ({"pixel_curves": {"roc": 5}}, "unexpected pixel_curves"),
])
def test_test_results_with_scores_that_are_no_numbers_are_corrupt(tmp_path, change, message):
    good = {"scores": [0.1, 0.2, 0.3], "labels": [0, 1, 1], "paths": ["a", "b", "c"], "threshold": 0.15}
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "test_metrics.json").write_text(json.dumps(good))
    assert results.read_test_results(tmp_path).threshold == 0.15
    (tmp_path / "best" / "test_metrics.json").write_text(json.dumps({**good, **change}))
    with pytest.raises(results.StoreError, match=message):
        results.read_test_results(tmp_path)


def test_a_confidence_interval_is_two_finite_numbers():
    assert results.interval([0.1, 0.35]) == (0.1, 0.35)
    assert all(results.interval(v) is None for v in (None, [0.1], [float("nan"), 1.0], ["a", 1.0], {"low": 0.1}))


def test_dashboard_command_checks_its_flags(tmp_path, capsys):
    argv, env = streamlit_command(tmp_path, "127.0.0.1", 8600, "http://127.0.0.1:8000")
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert env["RAYAD_RUNS"] == str(tmp_path) and env["RAYAD_SERVE_URL"] == "http://127.0.0.1:8000"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = str(taken.getsockname()[1])
    (tmp_path / "runs.txt").write_text("")
    for flags, message in [(["--runs", str(tmp_path / "nope")], "no such directory"),
                           (["--runs", str(tmp_path / "runs.txt")], "runs.txt: a file, not a folder"),
                           (["--runs", str(tmp_path), "--port", "0"], "0 is not a port"),
                           (["--runs", str(tmp_path), "--port", busy], f"cannot listen on 127.0.0.1:{busy}"),
                           (["--runs", str(tmp_path), "--host", "999.1.1.1"], "--host 999.1.1.1: not a usable host"),
                           (["--runs", str(tmp_path), "--host", "192.0.2.1"],  # TEST-NET-1: no machine's own
                            "--host 192.0.2.1: not an address of this machine"),
                           (["--runs", str(tmp_path), "--serve-url", "localhost:8000"], "needs http://")]:
        try:
            code = main(["dashboard", *flags])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert code == 2
        assert message in capsys.readouterr().err
    taken.close()
