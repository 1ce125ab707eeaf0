"""Real CUDA paths, on a GPU machine only: `RAYAD_TEST_GPU=1 pytest -m gpu tests/gpu` (the CPU suite hides
GPUs, see conftest.py). Scores on CUDA are compared across rayad's paths exactly as on the CPU (one device,
TF32 off), and against the CPU within the documented tolerance (docs/design.md, "Precision")."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from servers import rayad_serve
from tiny import TINY

from rayad.artifact import Predictor
from rayad.config import load_config
from rayad.evaluate import evaluate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (RAYAD_TEST_GPU=1)")]

CPU_TOLERANCE = 1e-4  # relative: CPU and CUDA kernels differ


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, demo_root):
    from rayad.train import fit

    out = tmp_path_factory.mktemp("cuda-run")
    fit(load_config(overrides={**TINY, "train.precision": "fp32", "scoring.precision": "fp32"}), demo_root,
        "brick", out, device="cuda", progress=False)
    return out


def test_evaluate_and_predict_agree_on_cuda(cuda_run, demo_root):
    predictor = Predictor.load(cuda_run, device="cuda")
    assert next(predictor.model.parameters()).is_cuda
    metrics = evaluate(predictor, demo_root, "brick")
    preds, errors = predictor.predict_files(metrics["paths"], batch_size=3)
    assert errors == [None] * len(metrics["paths"])
    np.testing.assert_allclose(preds.scores, metrics["scores"], rtol=1e-6)
    assert preds.masks().dtype == bool and isinstance(preds.maps, np.ndarray)


def test_cpu_and_cuda_scores_agree_within_the_tolerance(cuda_run, demo_root):
    paths = [str(p) for p in sorted((demo_root / "brick" / "test" / "good").glob("*.png"))]
    on_cuda = Predictor.load(cuda_run, device="cuda").predict_files(paths)[0].scores
    on_cpu = Predictor.load(cuda_run, device="cpu", precision="fp32").predict_files(paths)[0].scores
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=CPU_TOLERANCE)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs 2 GPUs")
def test_nccl_ddp_with_two_gpu_workers(demo_root, tmp_path):
    from rayad.cluster import Cluster
    from rayad.train.ray_train import fit_distributed

    cfg = load_config(overrides={**TINY, "train.precision": "fp32"})
    run = fit_distributed(cfg, demo_root, "brick", tmp_path / "ddp", Cluster(workers=2, use_gpu=True))
    assert Predictor.load(run, device="cuda").threshold > 0


def test_gpu_serve_replica_scores_as_predict(cuda_run, demo_root, tmp_path):
    args = ["--run", str(cuda_run), "--replica-gpus", "0.5", "--replica-cpus", "1"]
    with rayad_serve(args, tmp_path / "serve.log") as url:
        image = demo_root / "brick" / "test" / "scratch" / "000.png"
        expected = Predictor.load(cuda_run, device="cuda").predict_files([image])[0].scores[0]
        for heatmap in ("false", "true"):
            served = requests.post(f"{url}/v1/predict?heatmap={heatmap}", data=image.read_bytes(), timeout=60)
            assert served.status_code == 200, served.text
            assert served.json()["score"] == pytest.approx(float(expected), rel=1e-6)
            assert ("heatmap_png" in served.json()) == (heatmap == "true")


DETERMINISTIC_FIT = """
import json, sys
from rayad.config import load_config
from rayad.train import fit
overrides = {**json.loads(sys.argv[3]), "train.precision": "fp32", "train.deterministic": True,
             "train.ssim_weight": 0.5}
fit(load_config(overrides=overrides), sys.argv[1], "brick", sys.argv[2], device="cuda", progress=False)
"""


def test_deterministic_training_repeats_bit_for_bit_on_cuda(demo_root, tmp_path):
    """`train.deterministic: true`: two runs give the same weights, with the SSIM term on too (both
    workarounds of filters.differentiated_deterministically run). Each run has its own process, as the
    deterministic mode is process-wide."""
    from safetensors.torch import load_file

    runs = [tmp_path / f"run{i}" for i in range(2)]
    for run in runs:
        subprocess.run([sys.executable, "-c", DETERMINISTIC_FIT, str(demo_root), str(run), json.dumps(TINY)],
                       check=True)
    first, second = (load_file(run / "model.safetensors") for run in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_auto_precision_probes_the_gpu_at_the_batch_it_runs(tmp_path, monkeypatch):
    from rayad.models import create_model
    from rayad.precision import PROBE_CACHE, probe_network, resolve

    monkeypatch.setenv("RAYAD_CACHE_DIR", str(tmp_path))
    network = create_model(load_config(overrides=TINY).model).cuda()
    choice = resolve("auto", "cuda", probe_network(network, 64, training=True, device="cuda", batch_size=16))
    assert choice.precision in ("fp32", "bf16") and "probe on this GPU" in choice.reason
    (key,) = json.loads((tmp_path / PROBE_CACHE).read_text())
    assert torch.cuda.get_device_name() in key and '"batch": 16' in key


def test_corruption_makes_no_host_sync_on_cuda():
    """Every draw stays on the GPU (the sizes come from a host generator): a sync would raise here."""
    from rayad.corruption import Corruptor

    x = torch.rand(8, 3, 64, 64, device="cuda")
    corruptor = Corruptor(load_config(None).corruption)
    corruptor(x, torch.Generator(device="cuda").manual_seed(0))  # the first call may copy constants over
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = corruptor(x, torch.Generator(device="cuda").manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.inputs.is_cuda and bool(out.mask.amax() > 0)
