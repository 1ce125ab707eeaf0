"""The deployment files (deploy/): every rayad command and flag they name exists, every repository path they
name exists, the images and Ray versions agree, and the RayService's Serve config is serve/config.yaml and
passes Serve's own schema. There is no container engine here, so the Dockerfile is checked statically."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from rayad.cli import build_parser
from rayad.cpu import ONE_ARENA_ENV
from rayad.errors import ConfigError
from rayad.serve import ServeSettings, app_builder
from rayad.tune import resolve_space

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"rayad:{PYPROJECT['project']['version']}"


def _manifests() -> dict[str, dict]:
    docs = [d for path in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


MANIFESTS = _manifests()
CLUSTERS = {"RayCluster": MANIFESTS["RayCluster"]["spec"], "RayJob": MANIFESTS["RayJob"]["spec"]["rayClusterSpec"],
            "RayService": MANIFESTS["RayService"]["spec"]["rayClusterConfig"]}


def _pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _commands() -> list[str]:
    """Shell commands the files name: the RayJob's entrypoint, `# $ ...` example lines, Dockerfile RUN lines."""
    commands = [MANIFESTS["RayJob"]["spec"]["entrypoint"]]
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            commands += re.findall(r"^#\s+\$ (.+)$", path.read_text(), flags=re.M)
    return commands + [line.removeprefix("RUN ") for line in _dockerfile() if line.startswith("RUN ")]


def _rayad_argv(command: str) -> list[list[str]]:
    """The arguments of every rayad invocation in a command line (also after `ray job submit ... --`), up to
    a redirection."""
    found = []
    for segment in re.split(r"\s(?:&&|\|\||\||;)\s", command):
        tokens = list(itertools.takewhile(lambda t: not re.match(r"\d*[<>]", t), shlex.split(segment)))
        if "--" in tokens:
            tokens = tokens[tokens.index("--") + 1:]
        if tokens and tokens[0] == "rayad":
            found.append(tokens[1:])
    return found


def test_the_files_run_rayad_tune_on_a_bundled_space_and_the_other_commands():
    invoked = [argv for command in _commands() for argv in _rayad_argv(command)]
    assert {argv[0] for argv in invoked} >= {"tune", "train", "data"}
    tune = next(argv for argv in _rayad_argv(MANIFESTS["RayJob"]["spec"]["entrypoint"]) if argv[0] == "tune")
    space = tune[tune.index("--space") + 1]
    assert not Path(space).exists() and resolve_space(space).is_file()  # a bundled space, by name


@pytest.mark.parametrize("argv", [argv for command in _commands() for argv in _rayad_argv(command)],
                         ids=lambda argv: " ".join(argv[:2]))
def test_every_rayad_command_and_flag_exists(argv):
    if argv == ["--help"]:
        with pytest.raises(SystemExit, match="0"):
            build_parser().parse_args(argv)
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"rayad {shlex.join(argv)}: not a valid rayad command line")


def test_every_repository_path_they_name_exists():
    top = "|".join(re.escape(p.name) for p in ROOT.iterdir() if not p.name.startswith("."))
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for named in re.findall(rf"(?<![\w/.:-])(?:{top})/[\w./-]*\w", path.read_text()):
                assert (ROOT / named).exists(), f"{path.relative_to(ROOT)} names {named}, which does not exist"


def test_the_three_jobs_and_the_worker_groups():
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"} == set(MANIFESTS)
    assert all(MANIFESTS[kind]["apiVersion"] == "ray.io/v1" for kind in CLUSTERS)
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in MANIFESTS["RayCluster"]["spec"]["workerGroupSpecs"]]
    assert None in gpus and "1" in gpus  # a CPU and a GPU worker group


@pytest.mark.parametrize("kind", list(CLUSTERS))
def test_every_pod_runs_the_image_on_this_ray_version_with_the_shared_volume(kind):
    cluster = CLUSTERS[kind]
    assert cluster["rayVersion"] == ray.__version__
    claim = MANIFESTS["PersistentVolumeClaim"]["metadata"]["name"]
    for pod in _pods(cluster):
        assert [c["image"] for c in pod["containers"]] == [IMAGE]
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert set(volumes.values()) == {claim}
        assert {m["name"] for c in pod["containers"] for m in c["volumeMounts"]} <= set(volumes)


@pytest.mark.parametrize("kind", list(CLUSTERS))
def test_every_worker_pod_gives_ray_one_heap_arena(kind):
    """Where Ray runs scoring and training, as the local Ray rayad starts does (rayad.cpu.ONE_ARENA_ENV)."""
    for group in CLUSTERS[kind]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert {e["name"]: e["value"] for e in container.get("env", [])}.items() >= ONE_ARENA_ENV.items()


def _mount_points(pod: dict) -> list[str]:
    return [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]]


def test_the_rayjob_writes_its_experiment_where_the_rayservice_serves_from():
    job, service = CLUSTERS["RayJob"], CLUSTERS["RayService"]
    tune = next(argv for argv in _rayad_argv(MANIFESTS["RayJob"]["spec"]["entrypoint"]) if argv[0] == "tune")
    out = Path(tune[tune.index("--out") + 1])
    head = job["headGroupSpec"]["template"]["spec"]
    assert any(out.is_relative_to(p) for p in _mount_points(head))  # the driver runs on the head
    run = Path(yaml.safe_load(MANIFESTS["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]["run"])
    for pod in _pods(service):  # a scorer replica can land on any pod
        mount = next(m for c in pod["containers"] for m in c["volumeMounts"] if run.is_relative_to(m["mountPath"]))
        on_volume = Path(mount.get("subPath", "")) / run.relative_to(mount["mountPath"])
        assert out.is_relative_to(Path(_mount_points(head)[0]) / on_volume)


def test_the_rayservice_serves_serve_config_yaml_and_it_passes_serves_schema():
    config = yaml.safe_load(MANIFESTS["RayService"]["spec"]["serveConfigV2"])
    assert config == yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), name) is app_builder
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    assert set(app.args) - {"run"} <= fields, set(app.args) - fields
    ServeSettings(**{k: v for k, v in app.args.items() if k != "run"})  # app_builder's own construction


def test_the_dockerfile_builds_the_wheel_from_the_package_sources_and_installs_it():
    lines = _dockerfile()
    copied = [src for line in lines if line.startswith("COPY ") and "--from" not in line
              for src in shlex.split(line)[1:-1]]
    assert all((ROOT / src).exists() for src in copied), copied
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "rayad",
              *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert set(copied) == needed
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert {line[1:] for line in ignore if line.startswith("!")} == needed  # the context holds exactly those
    runs = [line for line in lines if line.startswith("RUN ")]
    assert any("pip wheel" in r and "--no-deps" in r and "--wheel-dir /dist" in r for r in runs)
    install = next(r for r in runs if "pip install" in r)
    assert "source=/dist" in install and "/dist/rayad-*.whl" in install
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py311-cpu$", "\n".join(lines), flags=re.M)
    assert base and base[1] == ray.__version__


@pytest.mark.parametrize("key", ["max_upload_mb", "batch_wait_s", "replica_cpus"])
def test_a_serve_config_refuses_an_infinite_setting(key):
    """YAML reads `.inf` as a float: max_upload_mb gave every request a 500 (OverflowError), batch_wait_s hung it."""
    args = yaml.safe_load(f"{{models: {{m: /models/m}}, {key}: .inf}}")
    with pytest.raises(ConfigError, match=rf"^serve setting {key} = inf \(rayad serve --.*\): must be a finite "):
        app_builder(args)


@pytest.mark.parametrize(("args", "message"), [
    ({"run": "/models", "max_replica": 4}, r"serve config args: unknown \['max_replica'\]; valid: run and the fields"),
    ({"max_batch_size": "sixteen"}, "serve setting max_batch_size = 'sixteen': expected int"),
    ({"max_batch_size": "[16"}, r"serve setting max_batch_size = '\[16': expected int"),  # no YAML
])
def test_a_serve_config_with_a_wrong_arg_names_it(args, message):
    """Before: a TypeError of the dataclass's constructor, or of a comparison inside it."""
    with pytest.raises(ConfigError, match=message):
        app_builder(args)


BUILD_WITHOUT_RAY = """
import sys, ray
from rayad.serve import app_builder
api = app_builder({"run": sys.argv[1], "max_batch_size": "4", "api_key": "007"})._bound_deployment
scorer = api.init_args[0]._bound_deployment
print(api.init_args[1]["max_batch_size"], api.init_args[1]["api_key"], scorer.ray_actor_options["num_cpus"],
      ray._private.utils.get_num_cpus(), ray.is_initialized())
"""


def test_serve_run_s_text_args_build_the_app_before_ray_is_connected(trained_run):
    """`serve run rayad.serve:app_builder run=DIR max_batch_size=4` gives every value as text, and builds the app
    before it connects to Ray: it failed with "Ray has not been started yet", then with "'4': expected int"."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", BUILD_WITHOUT_RAY, str(trained_run)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    batch, key, cpus, machine_cpus, connected = done.stdout.split()
    assert (batch, key, connected) == ("4", "007", "False")  # the key stays text
    assert float(cpus) == float(machine_cpus)  # the local Ray's, which `serve run` starts next, for the one replica
