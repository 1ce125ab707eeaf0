"""`rayad serve --ingress haproxy`: the CLI starts its own local Ray with Ray Serve's HAProxy ingress and
serves the same scores over real HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from rayad.artifact import Predictor
from rayad.cli import main

START_TIMEOUT_S = 180


@pytest.mark.slow
def test_haproxy_ingress_serves_the_same_scores(trained_run, demo_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rayad = Path(sys.executable).with_name("rayad")
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([str(rayad), "serve", "--run", str(trained_run), "--port", str(port), "--ingress",
                                "haproxy", "--replica-cpus", "0.5"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"rayad serve did not become ready:\n{(tmp_path / 'serve.log').read_text()}")
            time.sleep(1)
        image = demo_root / "brick" / "test" / "scratch" / "001.png"
        served = requests.post(f"{url}/v1/predict", data=image.read_bytes(), timeout=60).json()
        expected = Predictor.load(trained_run).predict_files([image])[0]
        assert served["score"] == pytest.approx(float(expected.scores[0]), abs=1e-6)
        bad = requests.post(f"{url}/v1/predict", data=b"not an image", timeout=60)
        assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]
        sockets = [p for p in Path(tempfile.gettempdir()).glob("rayad-haproxy-*/admin.sock") if p.exists()]
        assert sockets, "HAProxy's admin socket is not in rayad's private folder"
        assert all(p.parent.stat().st_mode & 0o077 == 0 for p in sockets)  # only this user can reach it
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_haproxy_ingress_on_an_existing_cluster_needs_the_variables(trained_run, monkeypatch, capsys):
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--run", str(trained_run), "--ingress", "haproxy", "--address", "10.0.0.1:6379"]) == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().err
