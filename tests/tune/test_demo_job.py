"""`rayad demo`, the main job: demo data, a search per category, a summary; a rerun reuses the results."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny import TINY_BASE

from rayad.baselines import nearest_neighbour_metrics
from rayad.cli import main
from rayad.demo import _earlier_summary, run_demo
from rayad.errors import Interrupted, RayadError

pytestmark = pytest.mark.slow


def test_demo_searches_keeps_the_best_model_and_summarises(ray_cluster, tiny_space, tmp_path, capsys):
    summary = run_demo(tmp_path, space=str(tiny_space), trials=2, overrides=TINY_BASE, categories=("brick",))
    out = capsys.readouterr().out
    assert "best model per category" in out and "rayad evaluate --run" in out
    exp = tmp_path / "brick"
    test = json.loads((exp / "best" / "test_metrics.json").read_text())
    assert summary["brick"]["trials"] == 2 and summary["brick"]["image_auroc"] == test["image_auroc"]
    assert json.loads((tmp_path / "summary.json").read_text())["brick"]["aupro"] == test["aupro"]
    assert (tmp_path / "data" / "brick" / "train" / "good").is_dir()
    assert "nn_image_auroc" in out  # the baseline is printed beside the model
    assert summary["brick"]["nn_image_auroc"] == nearest_neighbour_metrics(tmp_path / "data", "brick")["image_auroc"]

    rows = pq.read_table(exp / "trials.parquet").to_pylist()
    before = _snapshot(exp)
    again = run_demo(tmp_path, space=str(tiny_space), trials=2, overrides=TINY_BASE, categories=("brick",))
    assert _snapshot(exp) == before, "a finished experiment is reused: no file of it is rewritten"
    assert pq.read_table(exp / "trials.parquet").to_pylist() == rows
    assert again == summary, "the reused category keeps its row, the search's seconds included"
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path)  # the same folder: it was refused as moved
    assert run_demo(link, space=str(tiny_space), trials=2, overrides=TINY_BASE, categories=("brick",)) == summary
    shutil.copytree(exp, tmp_path / "gravel")  # as if an earlier `rayad demo --categories gravel` had run
    summary_file = tmp_path / "summary.json"
    summary_file.write_text(json.dumps({"gravel": summary["brick"], **summary}))
    assert run_demo(tmp_path, space=str(tiny_space), trials=2, overrides=TINY_BASE, categories=("brick",)) == {
        "gravel": summary["brick"], **summary}, "a run with --categories adds to the folder's summary"
    assert "\ngravel " in capsys.readouterr().out
    record = tmp_path / "gravel" / "experiment.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "interrupted"}))
    assert _earlier_summary(tmp_path) == summary, "a search begun again there and stopped leaves the table"
    shutil.rmtree(tmp_path / "gravel")
    assert _earlier_summary(tmp_path) == summary, "a category whose experiment is gone leaves the table"
    with pytest.raises(RayadError, match="an earlier demo searched it with other trials; run the demo with"):
        run_demo(tmp_path, space=str(tiny_space), trials=3, overrides=TINY_BASE, categories=("brick",))
    assert _snapshot(exp) == before  # its results used to be shown as those of the new flags
    record, saved = exp / "experiment.json", (exp / "experiment.json").read_text()
    searched = json.loads(saved)  # as if the same --config file had held another value then: the rows were mixed
    searched["base_config"]["train"]["lr"] = 0.5
    record.write_text(json.dumps(searched))
    with pytest.raises(RayadError, match="its base_config changed since the search began"):
        run_demo(tmp_path, space=str(tiny_space), trials=2, overrides=TINY_BASE, categories=("brick",))
    record.write_text(saved)
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.move(tmp_path, moved)
    with pytest.raises(RayadError, match=f"searched it on {tmp_path / 'data'}; a demo folder cannot move"):
        run_demo(moved, space=str(tiny_space), trials=2, overrides=TINY_BASE, categories=("brick",))


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: modification time (ns) and SHA-256."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ctrl_c_in_a_search_stops_the_demo_and_says_how_to_resume(ray_cluster, demo_root, tmp_path, monkeypatch,
                                                                  capsys):
    searched = []

    def interrupted_search(settings, *args, **kwargs):  # as run_search after Ctrl-C (tests/tune/test_search.py)
        searched.append(settings.category)
        raise Interrupted("1 of 4 trials ended", f"rayad tune --out {tmp_path / settings.category} --resume")

    monkeypatch.setattr("rayad.demo.run_search", interrupted_search)
    (tmp_path / "data").mkdir()
    for category in ("brick", "grass"):
        (tmp_path / "data" / category).symlink_to(demo_root / category)
    assert main(["demo", "--out", str(tmp_path), "--categories", "brick", "grass"]) == 130
    assert searched == ["brick"], "the demo stops at the interrupted category"
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rayad demo:")]
    assert said == ["rayad demo: interrupted: brick: 1 of 4 trials ended; the state is saved: resume with the same "
                    "rayad demo command (finished categories are kept)"]
