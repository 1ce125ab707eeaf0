"""Stopping `rayad serve` on a cluster it joined: SIGTERM deletes its application, which the cluster would
otherwise keep serving after the driver leaves (a local Ray it starts is tested through `servers.rayad_serve`)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests
from servers import free_port

from rayad.cli import main
from rayad.errors import RayadError
from rayad.serve import ServeSettings, start

pytestmark = pytest.mark.slow


def test_sigterm_deletes_the_application_from_a_joined_cluster(ray_cluster, trained_run, capsys):
    from ray import serve

    serve.shutdown()  # a Serve instance left by another module would keep its own port
    url = f"http://127.0.0.1:{free_port()}"
    second: list[str] = []

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/readyz", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            second.append("not ready in 120 s")
        try:  # a second server on the cluster replaced this one's models and said a URL nothing served
            start(ServeSettings(models={"other": str(trained_run)}, replica_cpus=0.5), port=free_port())
        except RayadError as e:
            second.append(str(e))
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, where `main` waits

    threading.Thread(target=stop_when_ready, daemon=True).start()
    try:
        assert main(["serve", "--run", str(trained_run), "--port", url.rsplit(":", 1)[1],
                     "--replica-cpus", "0.5"]) == 0
        assert "stopped by SIGTERM: the application is deleted from the cluster" in capsys.readouterr().out
        assert "rayad" not in serve.status().applications
        assert second == ["the cluster already serves an application named 'rayad' (another rayad serve); stop that "
                          "one first (if its process is gone, serve.delete('rayad') on the cluster removes it), or "
                          "serve on another cluster"]
        # Serve, still running, keeps its address and ignores another asked for: rayad said the one asked for
        assert start(ServeSettings(models={"brick": str(trained_run)}, replica_cpus=0.5), port=free_port()) == url
        assert requests.get(f"{url}/readyz", timeout=60).status_code == 200
    finally:
        serve.shutdown()

