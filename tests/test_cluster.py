"""The Ray that rayad starts on this machine: its processes find its own state API, whatever other Ray a
`ray start` left behind (Ray Train's placement-group cleaner depends on it: docs/design.md, "Ray clusters"), and
every thread of theirs allocates from one heap (rayad.cpu.ONE_ARENA_ENV)."""

from __future__ import annotations

import http.server
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from tiny import TINY_ARGS

from rayad.cpu import ONE_ARENA_ENV

pytestmark = pytest.mark.slow

# Run in a fresh process: the suite's own cluster is already connected in this one.
PROBE = """
import ray
from rayad.cluster import connect

@ray.remote
class Alive:
    pass

@ray.remote(num_cpus=0)
def state_of(actor_id):
    from ray.util.state import get_actor
    return get_actor(actor_id, timeout=20).state  # what Ray Train's placement-group cleaner asks

@ray.remote(num_cpus=0)
def environment(name):
    import os
    return os.environ.get(name)

connect(None, log_to_driver=False)
actor = Alive.remote()
ray.get(actor.__ray_ready__.remote())
alive = ray.get(state_of.remote(actor._actor_id.hex()))
ray.kill(actor)
print(alive, ray.get(state_of.remote(actor._actor_id.hex())), ray.get(environment.remote("MALLOC_ARENA_MAX")))
"""


def test_workers_of_a_local_ray_ask_its_own_state_api_not_the_last_ray_start():
    # A short folder: Ray's socket paths under it must fit in 107 characters.
    with tempfile.TemporaryDirectory(prefix="rayad-") as tmp:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # a cluster that is gone
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MALLOC_ARENA_MAX"}
        result = subprocess.run([sys.executable, "-c", PROBE], env=env | {"RAY_TMPDIR": tmp}, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ALIVE", "DEAD", ONE_ARENA_ENV["MALLOC_ARENA_MAX"]]  # and one heap (rayad.cpu)


@pytest.mark.parametrize("address, message", [
    ("garbage", "expected HOST:PORT"),
    ("127.0.0.1:1", "cannot reach the Ray cluster at '127.0.0.1:1'"),  # ray.init retried it for ever
    ("ray://127.0.0.1:1", "cannot reach the Ray cluster at 'ray://127.0.0.1:1'"),  # 4 lines after 32 s
    ("http://127.0.0.1:8265", "not an http:// URL"),  # Ray's multi-line advice, in 4 lines
    ("127.0.0.1:{http}", "something answers there, but not Ray"),  # a dashboard's port: ray.init hung for ever
])
def test_an_address_that_is_no_ray_fails_at_once(address, message):
    from rayad.cluster import _check_reachable
    from rayad.errors import RayadError

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with pytest.raises(RayadError, match=message):
            _check_reachable(address.format(http=server.server_address[1]), "--address")
        server.shutdown()


def test_a_ray_clusters_address_passes_the_check(ray_cluster):
    from rayad.cluster import _check_reachable

    _check_reachable(ray_cluster.address, "--address")  # the GCS answers HTTP/2's opening


def test_an_address_from_ray_address_is_named_as_such(monkeypatch):
    """An http:// RAY_ADDRESS, as `ray job submit` takes, was named as --address, which was not given."""
    import ray

    from rayad.cluster import connect
    from rayad.errors import RayadError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(RayadError, match=r"^address 'http://127.0.0.1:8265' \(RAY_ADDRESS\): give the head node's"):
        connect(None)


def test_a_run_the_cluster_refuses_leaves_no_folder_behind(demo_root, tmp_path):
    """The cluster is checked before the run writes its manifest and log (it left a manifest.parquet)."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "rayad.cli", "train", "--data", str(demo_root), "--category",
                             "brick", *TINY_ARGS, "--workers", "2", "--address", "127.0.0.1:1", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    said = [line for line in result.stderr.splitlines() if line.startswith("rayad train:")]
    assert result.returncode == 2 and len(said) == 1 and "cannot reach the Ray cluster" in said[0], result.stderr
    assert not out.exists()


def test_sigterm_while_a_local_ray_starts_stops_as_ctrl_c_does(demo_root, tmp_path):
    """ray.init installs a SIGTERM handler of its own, which left with exit code 15 and no message."""
    driver = subprocess.Popen([sys.executable, "-m", "rayad.cli", "train", "--data", str(demo_root), "--category",
                               "brick", *TINY_ARGS, "--workers", "1", "--out", str(tmp_path / "run")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (gcs := _children(driver.pid, "gcs_server")):  # Ray's first process: ray.init has begun
        assert driver.poll() is None and time.monotonic() < deadline, "no local Ray started"
        time.sleep(0.02)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130 and err.strip().splitlines()[-1] == "rayad train: interrupted", err[-2000:]
    while _process(gcs[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _process(gcs[0]), "Ray's processes stop with it"


def test_ctrl_c_while_a_local_ray_shuts_down_leaves_no_ray_behind(demo_root, tmp_path):
    """Ray's own shutdown at exit took a second Ctrl-C as a traceback ("Exception ignored in atexit callback")
    and left its processes running for minutes."""
    driver = subprocess.Popen([sys.executable, "-m", "rayad.cli", "-v", "train", "--data", str(demo_root),
                               "--category", "brick", *TINY_ARGS, "--workers", "64", "--out", str(tmp_path / "run")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said, leaving = [], threading.Event()

    def read():  # all of it, so that the driver never blocks on a full pipe
        for line in driver.stderr:
            said.append(line)
            if "leaving Ray" in line:  # refused once the local Ray is up, it leaves Ray
                leaving.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert leaving.wait(timeout=180), said[-5:]
    gcs, signals, deadline = _children(driver.pid, "gcs_server"), 0, time.monotonic() + 120
    while driver.poll() is None and time.monotonic() < deadline:
        driver.send_signal(signal.SIGINT)
        signals += 1
        time.sleep(0.01)
    reader.join(timeout=60)
    assert signals > 3 and driver.wait(timeout=10) == 2, said[-5:]
    assert any("asked for 64 worker(s)" in line for line in said) and not any("Traceback" in line for line in said)
    while gcs and _process(gcs[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gcs and not _process(gcs[0]), "Ray's processes stop with it"


def test_leaving_ray_gives_a_python_caller_its_signal_handlers_back():
    """Only the command line keeps Ctrl-C ignored as it ends: a Python caller of `cli.main` kept none."""
    code = ("import signal; from rayad.cluster import leave_ray; handler = signal.getsignal(signal.SIGINT); "
            "leave_ray(process_ends=False); assert signal.getsignal(signal.SIGINT) is handler; "
            "leave_ray(process_ends=True); assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _children(pid: int, name: str) -> list[int]:
    """The PIDs of `pid`'s live child processes called `name`."""
    found = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [child for child in found if _process(child) and _process(child)[1:] == (pid, name)]


def _process(pid: int) -> tuple[str, int, str] | None:
    """(state, parent PID, name) of a live process; None for one that ended (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat[stat.rfind(")") + 2:].split()[:2]
    return None if state == "Z" else (state, int(ppid), stat[stat.find("(") + 1:stat.rfind(")")])


def test_a_ray_job_refuses_outputs_in_its_temporary_working_directory(ray_cluster, demo_root, tmp_path):
    """`ray job submit --working-dir DIR` runs the command in Ray's temporary copy of DIR: a relative `--out`
    put the model there, which Ray deletes, and the job reported success. An absolute one still works."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://{ray_cluster.head_node.webui_url}")
    (tmp_path / "project").mkdir()
    train = [sys.executable, "-m", "rayad.cli", "train", "--data", str(demo_root), "--category", "brick", *TINY_ARGS]
    refused, kept = [*train, "--out", "runs/brick"], [*train, "--out", str(tmp_path / "brick")]
    job = client.submit_job(entrypoint=f"{shlex.join(refused)}; {shlex.join(kept)}",
                            runtime_env={"working_dir": str(tmp_path / "project")})
    deadline = time.monotonic() + 400  # two trainings in a job, on a loaded machine
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    said = [line for line in logs.splitlines() if line.startswith("rayad train:")]
    assert len(said) == 1 and said[0].startswith("rayad train: error: --out runs/brick: lies in this Ray job's "
                                                 "working directory, a temporary copy that Ray deletes ("), logs
    assert status == JobStatus.SUCCEEDED and (tmp_path / "brick" / "model.json").is_file(), logs
