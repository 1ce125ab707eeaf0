"""Starting rayad's servers for tests: a free loopback port, and `rayad serve` as a real process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rayad_serve(args: list[str], log_path: Path, in_flight: bytes | None = None) -> Iterator[str]:
    """`rayad serve ARGS --port P` in its own process, until /readyz answers 200; yields its URL, then stops it
    with SIGTERM and checks that it stopped cleanly. With `in_flight` (an image), SIGTERM comes while a request to
    score it is waiting in the scorer (give --batch-wait-ms of seconds), which must still get its score. Fails the
    test with the server's log if it never becomes ready."""
    port = free_port()
    rayad = Path(sys.executable).with_name("rayad")  # this interpreter's; else the one on PATH (pip --user)
    rayad = rayad if rayad.exists() else Path(shutil.which("rayad") or rayad)
    with log_path.open("w") as log:
        process = subprocess.Popen([str(rayad), "serve", *args, "--port", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"rayad serve did not become ready:\n{log_path.read_text()}")
                time.sleep(1)
            yield url
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                answer = pool.submit(requests.post, f"{url}/v1/predict", data=in_flight, timeout=60) \
                    if in_flight else None
                time.sleep(1 if in_flight else 0)  # on its way to the scorer, even under load
                process.send_signal(signal.SIGTERM)
                if answer is not None:  # drained: the replica finished it before stopping
                    assert answer.result().status_code == 200, answer.result().text
            assert process.wait(timeout=60) == 0, log_path.read_text()
            assert "stopped by SIGTERM" in log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=30).status_code == 200
    except requests.RequestException:
        return False
