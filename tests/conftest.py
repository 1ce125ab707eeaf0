"""Shared fixtures: a tiny demo dataset, a tiny config and a trained tiny model, all made once per session."""

from __future__ import annotations

import contextlib
import os

# The CPU suite hides GPUs before torch or Ray look for them, so that it runs (and means the same) on a GPU
# machine; RAYAD_TEST_GPU=1 keeps them for the `gpu` tests (tests/gpu).
if os.environ.get("RAYAD_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Ray Train's controller polls its workers every 2 s, and a worker's report waits for the poll (Ray keeps a queue
# of one): a tiny run, which reports every 2 steps, would spend most of its time waiting. Ray's own setting,
# inherited by the test clusters' processes and passed on by Ray Train to its controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import SEARCH_STEPS, TINY, TINY_BASE  # noqa: E402

from rayad.config import Config, load_config  # noqa: E402
from rayad.data.demo import make_demo_dataset  # noqa: E402


def pytest_configure(config):
    if os.environ.get("RAYAD_TEST_GPU") == "1" and not torch.cuda.is_available():
        pytest.exit("RAYAD_TEST_GPU=1, but torch sees no CUDA GPU: every gpu test would skip", returncode=2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the image cache out of the home directory and use few threads, as CI has 2 cores."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYAD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A miniature demo dataset (MVTec layout): 3 categories, 12 train, 4 good + 2 per defect type in test."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0, n_train=12, n_test_good=4, n_per_defect=2)


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory):
    """A search space for tests: 6 steps, validation every 2, a conditional parameter."""
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text("""\
params:
  train.steps: 6
  train.checkpoint_every: 2
  train.lr: {loguniform: [1.0e-3, 8.0e-3]}
  corruption.p_corrupt: {uniform: [0.5, 1.0]}
  model.skip: {choice: [ccm, add]}
  corruption.noise_std: {choice: [0.0, 0.02], when: {model.skip: add}}
""")
    return path


@pytest.fixture
def tiny_config() -> Config:
    return load_config(overrides=TINY)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_root):
    """A tiny model trained on the demo 'brick' category, with its artifact."""
    from rayad.train import fit

    out = tmp_path_factory.mktemp("run")
    fit(load_config(overrides=TINY), demo_root, "brick", out, progress=False)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One real 2-node Ray cluster on loopback (a head and a worker node, 1 CPU each, own raylets),
    shared by every Ray test of the session. The head runs the dashboard: Ray Train's placement-group
    cleanup, needed when Tune stops a trial, asks its state API, and it takes Ray job submissions."""
    import ray
    from ray.cluster_utils import Cluster
    from servers import free_port

    node_args = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": 80 * 1024**2}
    # each node's agent on a port of its own: on Ray's one default port, one agent of the two lost the race
    # and ran without its HTTP server, and the head's, which takes job submissions, lost it
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": True,
                                                            "dashboard_agent_listen_port": free_port()})
    cluster.add_node(**node_args, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_experiment(ray_cluster, demo_root, tiny_space, tmp_path_factory):
    """A real search on the test cluster: 4 trials of the tiny space on brick at SEARCH_STEPS, two objectives,
    tracked in a local MLflow store (`record["settings"]["mlflow"]`); returns (experiment dir, the record
    `run_search` returned)."""
    from rayad.tune import SearchSettings, run_search

    root = tmp_path_factory.mktemp("exp")
    exp = root / "brick-tiny"
    # --set of a value the space fixes (train.steps: 6) wins over it in every trial
    settings = SearchSettings(data_root=str(demo_root), category="brick", space=str(tiny_space), trials=4,
                              overrides={**TINY_BASE, "train.steps": SEARCH_STEPS}, search_seed=0,
                              metric=("val_image_auroc", "val_aupro"), mode=("max", "max"),
                              mlflow=f"sqlite:///{root / 'mlflow.db'}")
    with contextlib.chdir(root):  # a sqlite MLflow store keeps artifacts in ./mlruns
        return exp, run_search(settings, exp, verbose=0)
