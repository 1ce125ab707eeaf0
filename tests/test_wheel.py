"""The package is the product: a wheel built from the repository carries everything the commands need, and
installed into a fresh venv outside the source tree it runs them (help, a bundled space, the demo, the
dashboard, serving). The fresh venv reuses this venv's installed dependencies through a .pth file, so
nothing is downloaded."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from conftest import TINY_BASE
from servers import free_port

from rayad._bundled import FOLDERS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TINY_SPACE = "params:\n  train.steps: 2\n  train.checkpoint_every: 2\n  train.lr: {loguniform: [1.0e-3, 8.0e-3]}\n"
TINY_SETS = [arg for key, value in {**TINY_BASE, "train.warmup_steps": 1}.items()
             for arg in ("--set", f"{key}={value}")]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_lists_every_package_and_maps_the_bundled_folders():
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rayad").rglob("__init__.py")}
    bundled = {f"rayad._bundled.{folder}": folder for folder in FOLDERS}
    assert set(setuptools["packages"]) == found | set(bundled)
    assert setuptools["package-dir"] == bundled
    assert all((ROOT / folder / "__init__.py").is_file() for folder in FOLDERS)


def _imported_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_import_is_a_declared_dependency():
    local = {"rayad"} | {p.stem for p in (ROOT / "dashboard").glob("*.py")}  # the pages import the app's modules
    imported = (_imported_modules(ROOT / "rayad") | _imported_modules(ROOT / "dashboard")) - local
    third_party = imported - set(sys.stdlib_module_names)
    extras = PYPROJECT["project"]["optional-dependencies"]
    runtime = PYPROJECT["project"]["dependencies"] + extras["mlflow"]  # mlflow: imported only for --mlflow
    declared = {_canonical(re.match(r"[A-Za-z0-9_.-]+", d)[0]) for d in runtime}
    providers = importlib.metadata.packages_distributions()
    undeclared = {m: providers.get(m) for m in third_party
                  if not {_canonical(d) for d in providers.get(m, [])} & declared}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def _run(argv: list, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the repository's files (tracked or not ignored): building in place
    would leave build/ behind, whose stale files a later build would ship."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src])
    return next(out.glob("rayad-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the source tree with only the wheel installed; its dependencies are this
    interpreter's site-packages, added by a .pth file (whose own .pth files, such as the editable
    install's finder, Python does not run)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "rayad_deps.pth").write_text("\n".join(deps) + "\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--disable-pip-version-check", wheel], env=_env(venv))
    return venv


def _env(tmp: Path) -> dict[str, str]:
    """This environment without Ray's or rayad's settings but the suite's Ray Train poll interval (conftest.py).
    RAY_ADDRESS=local: each command starts a new local Ray; without an address Ray would join the latest cluster
    started on this machine (the session's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYAD_")) and k != "PYTHONPATH"}
    poll = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    return {**env, poll: os.environ[poll], "RAY_ADDRESS": "local", "RAYAD_CACHE_DIR": str(tmp / "cache")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The working directory of every command: outside the repository."""
    return tmp_path_factory.mktemp("cwd")


def _rayad(venv: Path, work: Path, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run([venv / "bin" / "rayad", *args], timeout, cwd=work, env=_env(work))


@pytest.mark.slow
def test_the_wheel_carries_the_bundled_folders(wheel):
    with zipfile.ZipFile(wheel) as whl:
        for folder in FOLDERS:
            for path in (ROOT / folder).rglob("*"):
                if path.suffix in (".py", ".yaml", ".md"):
                    name = f"rayad/_bundled/{folder}/{path.relative_to(ROOT / folder)}"
                    assert whl.read(name) == path.read_bytes(), name


@pytest.mark.slow
def test_help_and_bundled_files_resolve_inside_the_installed_package(venv, work):
    assert "dashboard" in _rayad(venv, work, "--help").stdout
    code = ("import rayad; from rayad._bundled import bundled; from rayad.tune import resolve_space; "
            "from rayad.dashboard import app_path; "
            "print(rayad.__file__, resolve_space('quick'), app_path(), bundled('serve') / 'config.yaml')")
    paths = [Path(p) for p in _run([venv / "bin" / "python", "-c", code], cwd=work, env=_env(work)).stdout.split()]
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    assert all(p.is_relative_to(site / "rayad") and not p.is_relative_to(ROOT) for p in paths), paths
    assert paths[1].read_text() == (ROOT / "tune_spaces" / "quick.yaml").read_text()
    assert paths[2].is_file() and paths[3].read_text() == (ROOT / "serve" / "config.yaml").read_text()


@pytest.fixture(scope="module")
def demo(venv, work) -> Path:
    """`rayad demo` on one category at a tiny budget, from the installed package: its runs directory (the
    three-category job runs in tests/tune/test_demo_job.py)."""
    (work / "tiny.yaml").write_text(TINY_SPACE)
    _rayad(venv, work, "demo", "--out", "runs/demo", "--categories", "brick", "--trials", 1, "--space", "tiny.yaml",
           *TINY_SETS, timeout=300)
    return work / "runs" / "demo"


@pytest.mark.slow
def test_demo_runs_from_the_installed_package(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert list(summary) == ["brick"] and summary["brick"]["trials"] == 1
    assert (demo / "brick" / "best" / "model.safetensors").is_file() and not (demo / "grass").exists()


@contextmanager
def _started(argv: list, work: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A command in its own process group, stopped at the end: SIGINT (a driver shuts down the local Ray
    it started), then SIGKILL to whatever of the group is left."""
    with log.open("w") as out:
        proc = subprocess.Popen([str(a) for a in argv], cwd=work, env=_env(work), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _get(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> requests.Response:
    """Poll `url` until it answers 200; fail with the command's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with suppress(requests.ConnectionError, requests.Timeout):
            response = requests.get(url, timeout=10)
            if response.status_code == 200:
                return response
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer 200:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(venv, demo, work) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`rayad serve` on the demo's models (started, not yet ready): its URL, process and log."""
    port, log = free_port(), work / "serve.log"
    with _started([venv / "bin" / "rayad", "serve", "--run", demo, "--port", port], work, log) as proc:
        yield f"http://127.0.0.1:{port}", proc, log


@pytest.mark.slow
def test_dashboard_answers_and_its_app_runs_from_the_installed_package(venv, demo, work, server):
    # `server` is asked for so that Serve boots while the dashboard is checked
    port, log = free_port(), work / "dashboard.log"
    with _started([venv / "bin" / "rayad", "dashboard", "--runs", demo, "--port", port], work, log) as proc:
        assert "<html" in _get(f"http://127.0.0.1:{port}/", proc, log, 60).text.lower()
        assert _get(f"http://127.0.0.1:{port}/_stcore/health", proc, log, 10).text == "ok"
    code = ("from streamlit.testing.v1 import AppTest; from rayad.dashboard import app_path; "
            "at = AppTest.from_file(str(app_path()), default_timeout=120).run(); "
            "assert not at.exception, at.exception; print(*at.sidebar.selectbox[0].options)")
    shown = _run([venv / "bin" / "python", "-c", code], cwd=work, env={**_env(work), "RAYAD_RUNS": str(demo)})
    assert shown.stdout.split() == ["brick"]


@pytest.mark.slow
def test_serve_scores_an_image_as_predict_does(venv, demo, work, server):
    url, proc, log = server
    image = sorted((demo / "data" / "brick" / "test").rglob("*.png"))[0]
    _rayad(venv, work, "predict", "--run", demo / "brick" / "best", image, "--out", "predicted.parquet")
    expected = pq.read_table(work / "predicted.parquet").to_pylist()[0]["score"]
    _get(f"{url}/readyz", proc, log, 180)
    response = requests.post(f"{url}/v1/predict?model=brick", data=image.read_bytes(), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "brick"
    assert response.json()["score"] == pytest.approx(expected, abs=1e-6)
