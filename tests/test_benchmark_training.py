"""The benchmarks that train models keep them between runs: a model already trained is reused, one whose
training was stopped goes on from its checkpoint (benchmarks/variants.py; benchmarks/ablation.py does the same)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
