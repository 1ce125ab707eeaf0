"""Starting and stopping `rayad serve`: SIGTERM on a cluster it joined deletes its application, which the cluster
would otherwise keep serving after the driver leaves (a local Ray it starts is tested through
`servers.rayad_serve`), after finishing the requests it holds; a taken port is one line."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from servers import free_port

from rayad.cli import main
from rayad.errors import RayadError
from rayad.serve import ServeSettings, start

pytestmark = pytest.mark.slow


def _ready_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=30).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def test_sigterm_deletes_the_application_from_a_joined_cluster(ray_cluster, trained_run, capsys):
    from ray import serve

    serve.shutdown()  # a Serve instance left by another module would keep its own port
    url = f"http://127.0.0.1:{free_port()}"
    second: list[str] = []

    def stop_when_ready() -> None:
        if not _ready_within(url, 120):
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



def test_a_stop_under_load_finishes_the_requests_taken_and_refuses_new_ones_with_503(ray_cluster, trained_run,
                                                                                     demo_root, capsys):
    """Serve stops the scorer replicas at once: requests queued for them waited 20 s, then got a plain-text 500."""
    from ray import serve

    serve.shutdown()
    url = f"http://127.0.0.1:{free_port()}"
    image = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    answers: list[tuple[int, str, float]] = []  # status, JSON error or body, seconds
    sent_at_stop: list[int] = []
    stopped = threading.Event()

    def send(batch: bool) -> None:  # a batch puts its images in the scorer's queue at once
        while not stopped.is_set():
            start_at = time.monotonic()
            try:
                response = requests.post(f"{url}/v1/predict/batch", files=[("f", image)] * 32, timeout=60) if batch \
                    else requests.post(f"{url}/v1/predict", data=image, timeout=60)
            except requests.ConnectionError:  # the application is gone
                return
            body = response.json().get("error", "") if "json" in response.headers.get("content-type", "") \
                else response.text
            answers.append((response.status_code, body, time.monotonic() - start_at))
            if response.status_code == 404:
                return

    def load_then_stop() -> None:
        _ready_within(url, 120)
        senders = [threading.Thread(target=send, args=(i % 2 == 0,), daemon=True) for i in range(8)]
        for sender in senders:
            sender.start()
        time.sleep(3)
        sent_at_stop.append(len(answers))
        os.kill(os.getpid(), signal.SIGTERM)
        stop_senders_after_main_returns.wait(120)
        stopped.set()
        for sender in senders:
            sender.join(60)

    stop_senders_after_main_returns = threading.Event()
    worker = threading.Thread(target=load_then_stop, daemon=True)
    worker.start()
    try:
        assert main(["serve", "--run", str(trained_run), "--port", url.rsplit(":", 1)[1], "--replica-cpus", "0.5",
                     "--max-batch-size", "1", "--max-queued", "64"]) == 0
    finally:
        stop_senders_after_main_returns.set()
        worker.join(180)
        serve.shutdown()
    assert "stopped by SIGTERM" in capsys.readouterr().out
    assert sent_at_stop and sent_at_stop[0] > 0, "no request was answered before the stop"
    served = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 503]
    after_delete = [a for a in answers if a[0] == 404 and "not found" in a[1]]  # Ray's proxy, once the app is gone
    assert len(served) + len(refused) + len(after_delete) == len(answers), [a for a in answers if a[0] not in
                                                                            (200, 503, 404)]
    assert all(error == "the server is stopping; retry shortly" for _, error, _ in refused), refused
    assert all(seconds < 15 for *_, seconds in answers), max(s for *_, s in answers)


def test_a_model_whose_files_changed_since_the_start_is_refused_not_scored_under_its_old_card(
        ray_cluster, trained_run, tiny_experiment, demo_root, tmp_path):
    """Scorer replicas load a model when first asked: one changed after the start would be scored under the version
    and image size the API read at the start (a wrong version, or a 500 for another size)."""
    from ray import serve

    serve.shutdown()
    run = tmp_path / "brick"
    shutil.copytree(trained_run, run)
    url = start(ServeSettings(models={"brick": str(run)}, replica_cpus=0.5), port=free_port())
    try:
        for name in ("model.safetensors", "model.json"):  # another model, before any request loads this one
            shutil.copy(tiny_experiment[0] / "best" / name, run / name)
        image = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
        answer = requests.post(f"{url}/v1/predict", data=image, timeout=120)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"].startswith("model 'brick' changed on disk since the server started (version ")
    finally:
        serve.shutdown()


def test_a_taken_port_is_one_line_before_serve_starts(trained_run):
    """A local Ray's Serve proxy failed on it after 45 s with a 45-line traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "rayad.cli", "serve", "--run", str(trained_run), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    said = [line for line in done.stderr.splitlines() if line.startswith("rayad serve:")]
    assert done.returncode == 2 and said == [f"rayad serve: error: --port {port}: cannot listen on 127.0.0.1:{port} "
                                             "(Address already in use); pick another --port"], done.stderr
    assert "Traceback" not in done.stderr
