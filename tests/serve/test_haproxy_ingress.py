"""`rayad serve --ingress haproxy`: the CLI starts its own local Ray with Ray Serve's HAProxy ingress and
serves the same scores over real HTTP."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import requests
from servers import rayad_serve

from rayad.artifact import Predictor
from rayad.cli import main


@pytest.mark.slow
def test_haproxy_ingress_serves_the_same_scores(trained_run, demo_root, tmp_path):
    # each request waits 3 s for others to batch with: the one in flight at SIGTERM is still there
    args = ["--run", str(trained_run), "--ingress", "haproxy", "--replica-cpus", "0.5", "--batch-wait-ms", "3000"]
    image = demo_root / "brick" / "test" / "scratch" / "001.png"
    with rayad_serve(args, tmp_path / "serve.log", in_flight=image.read_bytes()) as url:
        served = requests.post(f"{url}/v1/predict", data=image.read_bytes(), timeout=60).json()
        expected = Predictor.load(trained_run).predict_files([image])[0]
        assert served["score"] == pytest.approx(float(expected.scores[0]), abs=1e-6)
        bad = requests.post(f"{url}/v1/predict", data=b"not an image", timeout=60)
        assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]
        # Ray puts it in a folder per node, inside rayad's private one
        sockets = list(Path(tempfile.gettempdir()).glob("rayad-haproxy-*/*/admin.sock"))
        assert sockets, "HAProxy's admin socket is not in rayad's private folder"
        assert all(p.parent.parent.stat().st_mode & 0o077 == 0 for p in sockets)  # only this user enters it


def test_haproxy_ingress_on_an_existing_cluster_needs_the_variables(trained_run, monkeypatch, capsys):
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--run", str(trained_run), "--ingress", "haproxy", "--address", "10.0.0.1:6379"]) == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().err
