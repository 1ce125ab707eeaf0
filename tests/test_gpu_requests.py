"""CPU and GPU resources asked for by Serve replicas, Ray Data actors and Ray Train workers, and where a Predictor
runs: checked on CPU machines (the CUDA paths themselves are in tests/gpu, marked `gpu`)."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from rayad import predict
from rayad.cluster import Cluster, check_fits, check_resources, check_shared_paths, fitting_groups, with_worker_cpus
from rayad.errors import RayadError
from rayad.precision import default_device
from rayad.serve.app import build_app
from rayad.settings import ServeSettings


@pytest.mark.parametrize("gpus", [0.0, 0.5, 1.0])
def test_serve_scorer_replicas_reserve_the_gpus_asked_for(gpus):
    app = build_app(ServeSettings(models={"m": "/models/m"}, replica_cpus=1.0, replica_gpus=gpus))
    ingress = app._bound_deployment
    scorer = ingress.init_args[0]._bound_deployment
    assert scorer.ray_actor_options == {"num_cpus": 1.0, "num_gpus": gpus}
    assert "num_gpus" not in ingress.ray_actor_options  # the ingress only routes


def _nodes(monkeypatch, node_cpus: list[float]) -> None:
    dead = {"Alive": False, "Resources": {"CPU": 1.0}}
    nodes = [{"Alive": True, "Resources": {"CPU": c}} for c in node_cpus] + [dead]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": sum(node_cpus)})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as if connected to that cluster


@pytest.mark.parametrize("node_cpus, max_replicas, asked, expected", [
    ([2.0], 1, None, 2.0),  # by default one replica takes the node's cores (2 threads)
    ([2.0], 4, None, 1.0),  # shared by the replicas it may scale to, at least 1
    ([16.0], 4, None, 4.0),
    ([0.0, 4.0, 16.0], 2, None, 2.0),  # the smallest node that has CPUs
    ([2.0], 1, 0.5, 0.5),  # as asked
])
def test_serve_scorer_replicas_fill_the_smallest_node_by_default(monkeypatch, node_cpus, max_replicas, asked,
                                                                 expected):
    _nodes(monkeypatch, node_cpus)
    app = build_app(ServeSettings(models={"m": "/models/m"}, max_replicas=max_replicas, replica_cpus=asked))
    scorer = app._bound_deployment.init_args[0]._bound_deployment
    assert scorer.ray_actor_options["num_cpus"] == expected
    assert scorer.init_args[1] == max(1, int(expected))  # its torch threads


@pytest.mark.parametrize("node_cpus, workers, asked, expected", [
    ([2.0], 1, None, 2.0),  # by default one worker takes the node's cores (2 threads)
    ([2.0], 2, None, 1.0),  # shared by the workers
    ([1.0, 1.0], 2, None, 1.0),  # the test cluster
    ([0.0, 4.0, 16.0], 3, None, 1.0),  # the smallest node that has CPUs, at least 1
    ([16.0], 4, None, 4.0),
    ([2.0], 1, 0.5, 0.5),  # as asked
])
def test_ray_train_workers_fill_the_smallest_node_by_default(monkeypatch, node_cpus, workers, asked, expected):
    _nodes(monkeypatch, node_cpus)
    cluster = with_worker_cpus(Cluster(workers=workers, cpus_per_worker=asked))
    assert cluster.cpus_per_worker == expected and cluster.worker_threads == max(1, int(expected))


@pytest.mark.parametrize("workers, cpus, held", [(2, 2.0, True), (3, 2.0, False), (4, 1.5, True), (5, 1.5, False),
                                                  (20, 0.3, True), (21, 0.3, False)])
def test_a_group_the_nodes_cannot_hold_each_on_one_node_is_refused(monkeypatch, workers, cpus, held):
    """Two nodes of 3 CPUs have 6 but hold two workers of 2 CPUs: a third waited forever, and Ctrl-C did not stop
    Ray Train's retries."""
    _nodes(monkeypatch, [3.0, 3.0])
    cluster = Cluster(workers=workers, cpus_per_worker=cpus)
    if held:
        check_resources(cluster)
        assert fitting_groups(cluster) == 1
        return
    with pytest.raises(RayadError, match=rf"asked for {workers} worker\(s\) x {cpus:g} CPU = .*; the cluster's "
                                         r"nodes hold \d+ of them at once, each on one node \(the cluster has 6 CPU"):
        check_resources(cluster)


def test_a_search_runs_as_many_trials_at_once_as_the_nodes_hold(monkeypatch):
    _nodes(monkeypatch, [3.0, 3.0, 1.0])
    assert fitting_groups(Cluster(workers=1, cpus_per_worker=2.0)) == 2  # 7 CPUs, but one 2-CPU worker a node
    assert fitting_groups(Cluster(workers=2, cpus_per_worker=1.0)) == 3


@pytest.mark.parametrize("resources, cpus, gpus, expected", [
    ({"CPU": 16.0}, 1.0, 0.0, 15),  # by CPUs, less the read tasks' share
    ({"CPU": 16.0}, 0.5, 0.0, 16),  # never more torch threads than cores
    ({"CPU": 16.0}, 2.0, 0.0, 7),  # 2 threads each
    ({"CPU": 16.0, "GPU": 2.0}, 1.0, 1.0, 2),  # by GPUs when actors ask for them
    ({"CPU": 16.0, "GPU": 2.0}, 1.0, 0.5, 4),  # fractions share a GPU
    ({"CPU": 2.0, "GPU": 4.0}, 1.0, 0.5, 1),  # and never more than the CPUs hold
])
def test_ray_data_pool_is_sized_by_cpus_or_by_the_gpus_actors_ask_for(monkeypatch, resources, cpus, gpus, expected):
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert predict.pool_size(cpus, gpus) == expected


@pytest.mark.parametrize("node_cpus, share", [
    ([2.0], 0.875),  # one actor per core, a quarter core left for one read or write at a time
    ([2.0, 2.0], 0.875),
    ([16.0], 0.9843),  # 63/64, to Ray's 1e-4
    ([3.0], 0.9166),
    ([1.0, 1.0], 0.75),  # the test cluster
    ([0.0, 2.0, 16.0], 0.875),  # a head without CPUs holds no actor; the smallest worker node sets the share
])
def test_ray_data_actors_fill_every_core_by_default(monkeypatch, node_cpus, share):
    _nodes(monkeypatch, node_cpus)
    assert predict.default_actor_cpus() == share
    assert predict.pool_size(share) == sum(int(c) for c in node_cpus)
    assert all(int(c) * share <= c - predict.READ_CPUS for c in node_cpus if c)


def test_ray_data_actors_ask_for_their_gpus(monkeypatch, trained_run, demo_root, tmp_path):
    asked = {}

    class Stop(Exception):
        pass

    class Files:  # the dataset of files read: the scoring step is recorded, then the run stops
        def map_batches(self, fn, **kwargs):
            if fn is not predict.ScoringActor:
                return self
            asked.update(kwargs)
            raise Stop

    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: Files())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as if joined: predict_with_ray starts no Ray here
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}])
    with pytest.raises(Stop):
        predict.predict_with_ray(trained_run, [str(demo_root / "brick" / "test")], str(tmp_path / "out"),
                                 cpus_per_actor=2, gpus_per_actor=0.25)
    assert asked["num_cpus"] == 2 and asked["num_gpus"] == 0.25 and asked["compute"].max_size == 4


def test_an_actor_without_a_reserved_gpu_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU node
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    context = ray.get_runtime_context()
    monkeypatch.setattr(type(context.worker), "mode", property(lambda self: ray.WORKER_MODE), raising=False)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert default_device().type == "cpu"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert default_device().type == "cuda"


@pytest.mark.parametrize("cpus, gpus, fits", [
    (2.0, 0.0, True), (0.5, 1.0, True),
    (3.0, 0.0, False),  # the cluster has 2.5 CPUs, but no node has 3
    (1.0, 1.0, False),  # a node with the GPU, another with the CPU: one process needs both on one node
    (0.5, 2.0, False),  # only the dead node had them
])
def test_a_process_no_node_can_hold_fails_at_once_instead_of_waiting_forever(monkeypatch, cpus, gpus, fits):
    nodes = [{"Alive": True, "Resources": {"CPU": 0.5, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 2.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    if fits:
        check_fits("a scorer replica", cpus, gpus)
        return
    with pytest.raises(RayadError, match=rf"a scorer replica asks for {cpus:g} CPU and {gpus:g} GPU, more than any "
                                         r"node of the cluster has \(the largest: 0.5 CPU, 1 GPU\)"):
        check_fits("a scorer replica", cpus, gpus)


def test_a_cluster_an_autoscaler_may_grow_is_waited_for_not_refused(monkeypatch, caplog):
    """A KubeRay GPU group that scales from zero has no GPU until a job asks for one: refusing the job up front
    kept the autoscaler from ever seeing it (checked for real on Ray's fake autoscaling cluster: docs/benchmarks.md,
    "Autoscaling clusters")."""
    _nodes(monkeypatch, [0.0])  # a head without CPUs, its workers scaled to zero
    monkeypatch.setattr("rayad.cluster.autoscaled", lambda: True)
    with caplog.at_level("WARNING", logger="rayad.cluster"):
        assert not check_fits("a scorer replica", 1.0, 0.0)
        check_resources(Cluster(workers=2, cpus_per_worker=1.0))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("now; waiting for the cluster's autoscaler to add nodes" in m for m in said), said


def test_ray_s_own_monitor_is_not_taken_for_an_autoscaler(ray_cluster):
    """Ray's head always runs its v1 monitor, which publishes a status; without an autoscaling config it is no
    autoscaler, and what no node can hold is refused at once."""
    from ray.experimental.internal_kv import _internal_kv_get

    from rayad.cluster import autoscaled

    deadline = time.monotonic() + 60
    while not _internal_kv_get("__autoscaling_status") and time.monotonic() < deadline:  # published every few s
        time.sleep(0.5)
    assert _internal_kv_get("__autoscaling_status") and not autoscaled()


def test_serve_refuses_replicas_the_cluster_cannot_hold_before_it_starts(ray_cluster, trained_run):
    """It waited forever ("No available node types can fulfill"), and deferred Ctrl-C until the models were up."""
    from rayad.serve import start

    settings = ServeSettings(models={"brick": str(trained_run)}, replica_cpus=1.5)  # the test nodes have 1 CPU
    with pytest.raises(RayadError, match=r"a scorer replica \(--replica-cpus, --replica-gpus\) asks for 1.5 CPU"):
        start(settings, port=1)  # before Serve starts: port 1 is never bound
    settings = ServeSettings(models={"brick": str(trained_run)}, min_replicas=3, max_replicas=3)  # 1 CPU each
    with pytest.raises(RayadError, match=r"asked for 3 scorer replica\(s\) \(--replicas or --min-replicas\) x 1 CPU "
                                         "= 3 CPU, 0 GPU; the cluster's nodes hold 2 of them at once"):
        start(settings, port=1)  # waited forever for the third replica's CPU


@pytest.mark.parametrize("workers, gpus", [(2, 0.5), (4, 0.25)])
def test_fractional_gpus_with_several_ddp_workers_fail_up_front(workers, gpus):
    cluster = Cluster(workers=workers, use_gpu=True, gpus_per_worker=gpus)
    with pytest.raises(RayadError, match="NCCL refuses"):
        check_resources(cluster)


@pytest.mark.slow
def test_every_node_must_see_storage_and_data(ray_cluster, tmp_path, demo_root):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    check_shared_paths(str(tmp_path / "storage"), str(demo_root), "brick")  # one machine: both nodes see them
    assert not list((tmp_path / "storage").iterdir())  # the marker is gone
    check_shared_paths("s3://bucket/rayad", str(demo_root), "brick")  # URIs are not checked
    with pytest.raises(RayadError, match=r"--data .*missing: missing or empty on node [0-9.]+; on a cluster it must"):
        check_shared_paths(str(tmp_path / "storage"), str(tmp_path / "missing"), "brick")
    (tmp_path / "mount" / "brick").mkdir(parents=True)  # a share not mounted there: an empty mount point
    with pytest.raises(RayadError, match=r"--data .*mount \(its brick folder\): missing or empty on node"):
        check_shared_paths(str(tmp_path / "storage"), str(tmp_path / "mount"), "brick")


@pytest.mark.parametrize("command", [["train", "--workers", "1", "--gpu"],
                                     ["tune", "--space", "quick", "--gpus-per-worker", "1"]])
def test_gpu_workers_with_a_driver_that_has_no_gpu_check_scoring_on_its_cpu(demo_root, tmp_path, capsys, monkeypatch,
                                                                             command):
    """The driver calibrates (and a search evaluates) the model on its own device, its CPU where it has no GPU (a
    KubeRay head): fp16 scoring failed there only once the training was done."""
    from rayad.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU head, also on a GPU machine
    code = main([*command, "--data", str(demo_root), "--category", "brick", "--out", str(tmp_path / "out"),
                 "--set", "scoring.precision=fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("precision fp16 needs a CUDA device (this one is cpu); use bf16 or fp32"), err
    assert not (tmp_path / "out").exists()
