"""Ray Train on a real 2-node local cluster: parity with the single-process loop, SPREAD over nodes,
file:// storage, recovery from a killed worker, and a fast error when resources are missing."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY, sigterm_after_first_checkpoint

from rayad.artifact import Predictor
from rayad.cli import main
from rayad.cluster import Cluster
from rayad.errors import ArtifactError, RayadError
from rayad.train import fit
from rayad.train.checkpoint import latest_recorded, recorded_reports
from rayad.train.ray_train import fit_distributed

pytestmark = pytest.mark.slow


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_one_worker_matches_single_process(ray_cluster, tmp_path, demo_root, tiny_config):
    """With the same thread count (a Ray worker of 1 CPU has 1): bf16 kernels, unlike fp32 ones, round
    differently with another thread count (gradients 6e-4 apart at 1 against 2 threads)."""
    cfg = tiny_config.replace({"train.num_threads": 1})
    threads = torch.get_num_threads()
    try:
        single = fit(cfg, demo_root, "brick", tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    ray_run = fit_distributed(cfg, demo_root, "brick", tmp_path / "ray", Cluster(workers=1), progress=False)
    a, b = _weights(single), _weights(ray_run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            for run in (single, ray_run)]  # with --workers too, the loss curve `--mlflow` logs
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [2, 3, 4, 6]  # log_every 2, checkpoints
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], abs=1e-5)


def test_two_workers_on_two_nodes_with_file_uri_storage(ray_cluster, tmp_path, demo_root, tiny_config):
    storage = tmp_path / "shared"
    cluster = Cluster(workers=2, placement="SPREAD", storage=storage.as_uri())
    run = fit_distributed(tiny_config, demo_root, "brick", tmp_path / "run", cluster)
    meta = Predictor.load(run).metadata
    assert meta["train"]["nodes"] == 2 and meta["train"]["workers"] == 2
    assert meta["train"]["steps"] == tiny_config.train.steps
    assert list(storage.glob("run-*/train/checkpoint_*/state.json")), "checkpoints land in the shared storage"
    checkpoint = meta["train"]["checkpoint"]  # named as a URI (Ray Train gives the path without file://)
    assert checkpoint.startswith(f"{storage.as_uri()}/run-") and "/train/checkpoint_" in checkpoint, checkpoint
    assert latest_recorded(checkpoint.rsplit("/train/", 1)[0])[0] == checkpoint
    # a second run into the same storage (one bucket for every run) found the first's checkpoints: it trained no
    # step and wrote the first's weights as its model
    other = fit_distributed(tiny_config.replace({"train.seed": 1}), demo_root, "brick", tmp_path / "other",
                            Cluster(workers=1, storage=storage.as_uri()), progress=False)
    logged = [json.loads(line)["step"] for line in (other / "train_log.jsonl").read_text().splitlines()]
    assert logged == [2, 3, 4, 6] and not torch.equal(_weights(run)["network.head.0.weight"],
                                                      _weights(other)["network.head.0.weight"])


def _train_worker_pids(started_after: float) -> list[int]:
    """PIDs of Ray Train worker processes started after `started_after` (wall time), oldest first."""
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"RayTrainWorker" not in (entry / "cmdline").read_bytes():
                continue
            start = boot + int((entry / "stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        except (OSError, IndexError, ValueError):
            continue
        if start >= started_after:
            found.append((start, int(entry.name)))
    return [pid for _, pid in sorted(found)]


def _logged_steps(log: Path) -> list[int]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # not a line being written


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path, demo_root, tiny_config):
    cfg = tiny_config.replace({"train.steps": 50, "train.checkpoint_every": 10, "train.log_every": 5})
    storage = tmp_path / "storage"
    result: dict = {}

    def train():
        try:
            result["run"] = fit_distributed(cfg, demo_root, "brick", tmp_path / "run",
                                            Cluster(workers=2, max_failures=2, storage=str(storage)), progress=False)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    began = time.time() - 1
    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.time() + 300
    log = tmp_path / "run" / "train_log.jsonl"
    # killed past its second checkpoint, between two (the first is committed), so the restarted group logs again
    while not ((logged := _logged_steps(log)) and logged[-1] in (25, 35)) and time.time() < deadline:
        time.sleep(0.05)
    pids = _train_worker_pids(began)
    assert pids, "no training worker process of this run found"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    train_info = Predictor.load(result["run"]).metadata["train"]
    assert train_info["steps"] == 50
    assert train_info["resumed_from_step"] in range(10, 50, 10), "the restarted group continued from a checkpoint"
    assert _logged_steps(log) == list(range(5, 55, 5)), "each step logged once, though the restarted group " \
                                                         "reported some again"
    preds, errors = Predictor.load(result["run"]).predict_files([demo_root / "brick" / "test" / "good" / "000.png"])
    assert errors == [None] and preds.scores[0] > 0


def test_a_workers_own_error_is_said_as_the_cli_says_rayads_errors():
    from ray.train import WorkerGroupError

    from rayad.train.ray_train import worker_error

    diverged = RayadError("training diverged: the loss is nan at step 2; lower train.lr (now 0.002)")
    crash = ZeroDivisionError("division by zero")
    assert worker_error(WorkerGroupError("rank 0 ...", {1: diverged, 0: crash})) is diverged
    ray_own = WorkerGroupError("rank 0 ...", {0: crash})
    assert worker_error(ray_own) is ray_own  # anything else keeps Ray Train's message, with every traceback


def test_ctrl_c_while_the_model_is_calibrated_stops_the_run(ray_cluster, tmp_path, demo_root, tiny_config,
                                                            monkeypatch):
    """Ray Train leaves its SIGINT handler in place after fit(), which took Ctrl-C (and SIGTERM) while the model was
    calibrated and written."""
    def interrupted_calibration(*args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # Python runs the handler between two bytecodes
        raise AssertionError("Ctrl-C did not stop the run")

    monkeypatch.setattr("rayad.train.ray_train.calibrate_and_save", interrupted_calibration)
    with pytest.raises(KeyboardInterrupt):
        fit_distributed(tiny_config, demo_root, "brick", tmp_path / "run", Cluster(workers=1), progress=False)


def test_too_many_workers_fails_before_training(ray_cluster, tmp_path, demo_root, tiny_config):
    """Ray Train would wait forever for the workers: the check refuses before a trainer starts."""
    with pytest.raises(RayadError, match=r"asked for 8 worker\(s\).*the cluster has 2 CPU"):
        fit_distributed(tiny_config, demo_root, "brick", tmp_path / "run", Cluster(workers=8))
    with pytest.raises(RayadError, match="GPU"):
        fit_distributed(tiny_config, demo_root, "brick", tmp_path / "run", Cluster(workers=1, use_gpu=True))
    assert not (tmp_path / "run" / "ray").exists(), "no Train run was started"


def test_a_damaged_record_of_ray_trains_checkpoints_is_one_error_that_says_what_helps(tmp_path):
    """Deleting the checkpoint Ray Train recorded would not help (it resumes only from that one), as the
    message for a damaged single-process checkpoint says."""
    snapshot = tmp_path / "train" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir()
    snapshot.write_text("[]")  # JSON, not Ray's record
    with pytest.raises(ArtifactError, match="record of the run's checkpoints is unreadable .*train into a new --out"):
        latest_recorded(str(tmp_path))
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_gone"}}))
    with pytest.raises(ArtifactError, match="checkpoint_gone: damaged checkpoint .*; Ray Train resumes only from"):
        latest_recorded(str(tmp_path))


def test_a_storage_pyarrow_cannot_open_names_storage(monkeypatch):
    """An S3 bucket whose region pyarrow could not resolve (no network) ended in pyarrow's words alone."""
    import pyarrow.fs

    class Unresolved:
        @staticmethod
        def from_uri(uri):
            raise OSError("When resolving region for bucket 'no-such-bucket': AWS Error NETWORK_CONNECTION")
    monkeypatch.setattr(pyarrow.fs, "FileSystem", Unresolved)
    with pytest.raises(RayadError, match=r"^s3://no-such-bucket/x: pyarrow cannot open it \(When resolving region "
                                         r".*\); check --storage$"):
        latest_recorded("s3://no-such-bucket/x")


def test_a_folder_holds_one_kind_of_run(tmp_path, demo_root, tiny_config):
    """A --workers run into a single-process run's folder would start again beside its checkpoints."""
    run = fit(tiny_config, demo_root, "brick", tmp_path / "run", progress=False)
    (run / "model.json").unlink()  # stopped before its model
    with pytest.raises(RayadError, match=r"holds a single-process run \(.*checkpoints\); resume it without --workers"):
        fit_distributed(tiny_config, demo_root, "brick", run, Cluster(workers=1), resume=True)


def test_sigterm_stops_a_ray_train_run_as_ctrl_c_does_and_resume_continues_it(ray_cluster, tmp_path, demo_root,
                                                                               capsys):
    """Ray Train's SIGINT handler aborts the run and its driver then left with SystemExit(1) and no message;
    SIGTERM went to Ray's own handler, which aborts with a C++ stack dump."""
    recorded = "ray/train/checkpoint_manager_snapshot.json"  # Ray Train recorded a checkpoint it would resume from
    code, err = sigterm_after_first_checkpoint(demo_root, tmp_path / "run", recorded, "--workers", "1",
                                               "--address", ray_cluster.address, timeout=180)
    assert code == 130, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("rayad train:")]
    assert len(said) == 1 and said[0].startswith(f"rayad train: interrupted: stopped; its last checkpoint is "
                                                 f"{tmp_path / 'run' / 'ray' / 'train'}/checkpoint_"), said
    assert said[0].endswith("; the state is saved: resume with the same command and --resume")
    # as the single-process run: no second run over it without --resume, and a resume only as it began
    run = tmp_path / "run"
    step = latest_recorded(str(run / "ray"))[1]["step"]
    budget = {**TINY, "train.steps": 10**6, "train.checkpoint_every": 20}
    train = ["train", "--data", str(demo_root), "--category", "brick", "--out", str(run), "--workers", "1",
             "--address", ray_cluster.address, *[a for k, v in budget.items() for a in ("--set", f"{k}={v}")]]
    changed = [*train, "--resume", "--set", "model.skip=add"]
    alone = train[:7] + train[11:]  # without --workers and --address: it would start again, ignoring the run
    for args, message in [(train, f"{run}: its run has checkpoints ({run / 'ray' / 'train'}/checkpoint_"),
                          (changed, "was trained with a different configuration (model.skip: 'ccm' then, 'add' now)"),
                          (alone, f"{run} holds a --workers run (workers_run.json); resume it with --workers"),
                          # in other storage it started anew, and deleted the run's log
                          ([*train, "--resume", "--storage", str(tmp_path / "elsewhere")],
                           "holds a --workers run (workers_run.json); resume it with --workers (and no --storage)")]:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main([*train, "--resume", "--set", f"train.steps={step + 2}"]) == 0
    logged = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == step + 2  # each step logged once
    assert Predictor.load(run).metadata["train"]["resumed_from_step"] == step
    kept = {p.name for p in (run / "ray" / "train").glob("checkpoint_*") if p.is_dir()}
    assert kept == set(recorded_reports(str(run / "ray"), "train"))  # what the stop wrote unrecorded is deleted
    (run / "model.json").unlink()  # stopped after its last checkpoint, before its model: resumed, it trains no step
    assert main([*train, "--resume", "--set", f"train.steps={step + 2}"]) == 0
    assert Predictor.load(run).metadata["train"]["resumed_from_step"] == step + 2
