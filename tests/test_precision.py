"""Precision: what `auto` decides (with the CPU's flags and the probe's timings injected, never timed here),
the probe's cache, and identical scores across paths in fp32 and in bf16."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayad import precision as precision_module
from rayad.artifact import Predictor
from rayad.config import Config, ModelConfig
from rayad.errors import ConfigError
from rayad.evaluate import evaluate
from rayad.models import create_model
from rayad.precision import Choice, probe_network, resolve

BF16_CPU = frozenset({"avx2", "avx512f", "avx512_bf16"})
PLAIN_CPU = frozenset({"avx2", "fma"})


def _never():
    raise AssertionError("the probe must not run here")


def test_cpu_without_bf16_units_stays_fp32_without_probing():
    choice = resolve("auto", "cpu", _never, cpu_flags=PLAIN_CPU)
    assert choice.precision == "fp32" and "without bf16 units" in choice.reason


@pytest.mark.parametrize("seconds, expected", [({"fp32": 0.03, "bf16": 0.01}, "bf16"),
                                               ({"fp32": 0.01, "bf16": 0.03}, "fp32"),
                                               ({"fp32": 0.0100, "bf16": 0.0095}, "fp32")])  # a near-tie: fp32
def test_cpu_with_bf16_units_follows_the_probe(seconds, expected):
    choice = resolve("auto", "cpu", lambda: seconds, cpu_flags=BF16_CPU)
    assert choice.precision == expected and "probe on this CPU" in choice.reason


@pytest.mark.parametrize("seconds, expected", [({"fp32": 0.03, "bf16": 0.01}, "bf16"),
                                               ({"fp32": 0.01, "bf16": 0.03}, "fp32")])
def test_cuda_with_native_bf16_follows_the_probe(seconds, expected):
    """On an H100 at batch 16 and 128², bf16 trained at 0.93x and scored at 0.76x the speed of fp32."""
    choice = resolve("auto", "cuda", lambda: seconds, cuda_native=True)
    assert choice.precision == expected and "probe on this GPU" in choice.reason
    assert resolve("auto", "cuda", _never, cuda_native=False).precision == "fp32"


def test_explicit_precision_and_devices():
    assert resolve("fp32", "cpu", _never, cpu_flags=BF16_CPU) == Choice("fp32", "configured")
    assert resolve("bf16", "cpu", _never, cpu_flags=PLAIN_CPU).precision == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve("fp16", "cpu", _never)
    assert resolve("bf16", "cuda", _never, cuda_native=True) == Choice("bf16", "configured")


def test_probe_is_cached_per_network_shape_and_leaves_the_network_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYAD_CACHE_DIR", str(tmp_path))
    calls = []
    real = precision_module._seconds_per_pass
    monkeypatch.setattr(precision_module, "_seconds_per_pass", lambda *a: calls.append((a[2], len(a[1]))) or real(*a))
    torch.manual_seed(0)
    network = create_model(ModelConfig(widths=(8, 16), dilations=(1,)))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    first = probe_network(network, 16, training=True, device="cpu", batch_size=16)()
    assert probe_network(network, 16, training=True, device="cpu", batch_size=8)() == first, "a CPU probes 2 images"
    assert calls == [("fp32", 2), ("bf16", 2)]
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items()), "BN stats unchanged"
    assert all(p.grad is None for p in network.parameters())
    other = create_model(ModelConfig(widths=(8, 32), dilations=(1,)))
    probe_network(other, 16, training=True, device="cpu", batch_size=16)()
    assert len(calls) == 4 and len(json.loads((tmp_path / precision_module.PROBE_CACHE).read_text())) == 2
    cache = tmp_path / precision_module.PROBE_CACHE  # an entry this rayad did not write is measured again
    cache.write_text(json.dumps(dict.fromkeys(json.loads(cache.read_text()), {"fp32": "fast"})))
    assert probe_network(network, 16, training=True, device="cpu", batch_size=16)().keys() == {"fp32", "bf16"}
    assert len(calls) == 6


def test_old_configs_with_amp_load():
    raw = Config().to_dict()
    raw["train"].pop("precision")
    assert Config.from_dict({**raw, "train": {**raw["train"], "amp": True}}).train.precision == "auto"
    assert Config.from_dict({**raw, "train": {**raw["train"], "amp": False}}).train.precision == "fp32"


def test_model_json_records_both_choices(trained_run):
    meta = json.loads((trained_run / "model.json").read_text())
    assert meta["precision"]["train"]["precision"] in ("fp32", "bf16")
    assert meta["precision"]["scoring"]["precision"] in ("fp32", "bf16") and meta["precision"]["scoring"]["reason"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scores_identical_across_paths_and_batch_sizes(precision, trained_run, demo_root):
    """The same file scores the same through evaluate and predict, whatever the batch it is in (to the
    rounding of the batched kernels: 1e-6 relative, the bar Serve and predict are held to)."""
    predictor = Predictor.load(trained_run, device="cpu", precision=precision)
    assert predictor.precision.precision == precision
    metrics = evaluate(predictor, demo_root, "brick")
    for batch_size in (1, 5):
        preds, _ = predictor.predict_files(metrics["paths"], batch_size=batch_size)
        np.testing.assert_allclose(preds.scores, metrics["scores"], rtol=1e-6, atol=0)


def test_consumers_reuse_the_calibrated_precision(trained_run, monkeypatch):
    """`auto` in any process scores in the precision recorded at calibration (so served == predict ==
    evaluate even if this process's own probe would decide otherwise)."""
    recorded = json.loads((trained_run / "model.json").read_text())["precision"]["scoring"]["precision"]
    monkeypatch.setattr("rayad.artifact.resolve", lambda *a, **k: Choice("other", "must not be asked"))
    assert Predictor.load(trained_run, device="cpu").precision == Choice(recorded, "as calibrated (model.json)")
