"""The benchmarks that train models keep them between runs: a model already trained is reused, one whose
training was stopped goes on from its checkpoint (benchmarks/variants.py; benchmarks/ablation.py does the same)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variants.py"
spec = importlib.util.spec_from_file_location("variants", SCRIPT)
variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(variants)


def test_a_model_is_trained_once_and_a_stopped_one_goes_on(demo_root, tmp_path):
    first, _ = variants.trained(TINY, "brick", demo_root, tmp_path)  # a new folder: it refused to resume nothing
    (run,) = tmp_path.glob("*/brick")
    weights = (run / "model.safetensors").stat().st_mtime_ns
    assert variants.trained(TINY, "brick", demo_root, tmp_path)[0].threshold == first.threshold
    assert (run / "model.safetensors").stat().st_mtime_ns == weights, "the trained model was reused"
    (run / "model.json").unlink()  # stopped after its last checkpoint, before its model
    again, _ = variants.trained(TINY, "brick", demo_root, tmp_path)
    assert again.threshold == first.threshold


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_reuses_a_run_only_of_the_same_step_count(demo_root, tmp_path, monkeypatch):
    """A run of 2 steps was reused by `--steps 5`, and its row labelled 5 steps."""
    ablation = _script("ablation")
    trained = []
    monkeypatch.setattr(ablation, "fit", lambda cfg, data, category, run, **kw: trained.append(
        (cfg.train.steps, run.relative_to(tmp_path))))
    monkeypatch.setattr(ablation, "evaluate", lambda *args: dict.fromkeys(ablation.METRICS, 0.5))
    monkeypatch.setattr(ablation.Predictor, "load", staticmethod(lambda run: None))
    for steps in (2, 5):
        ablation.run_variant("ssae", "brick", steps, demo_root, tmp_path)
    assert trained == [(2, Path("steps_2/ssae/brick")), (5, Path("steps_5/ssae/brick"))]


@pytest.mark.parametrize(("script", "args", "message"), [
    ("metrics_speed.py", ["--images", "0"], "argument --images: 0 is not a count (at least 1)"),
    ("heap.py", ["--seconds", "0"], "argument --seconds: 0 s is no time to measure in (more than 0)"),
    # it trained twice into one folder
    ("ddp_scaling.py", ["--workers", "1"], "--workers 1: must be at least 2 (the table compares them with 1 worker)"),
    # it validated on the training images
    ("variants.py", ["--variant", "base", "--val-images", "0"], "--val-images 0: must be >= 2"),
    ("feature_knn.py", ["--runs", "r", "--data", "d"], "the following arguments are required: --val-data"),
    ("baselines.py", ["--data", "/nonexistent"], "baselines.py: error: /nonexistent: No such file or directory"),
    ("export_parity.py", ["--data", "/nonexistent", "/nonexistent-run"],
     "export_parity.py: error: /nonexistent-run: not a rayad model"),
])
def test_a_benchmark_refuses_bad_arguments_in_one_line_before_it_works(script, args, message):
    done = subprocess.run([sys.executable, str(SCRIPT.with_name(script)), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr[-2000:]
