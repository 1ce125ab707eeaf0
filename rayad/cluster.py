"""The Ray cluster rayad runs on: start or join it, and check that what a job asks for fits in it.

Training (`rayad train --workers`), searches, `predict --ray`, Serve and the demo all connect here.
"""

from __future__ import annotations

import os

import ray

from rayad.errors import RayadError
from rayad.settings import Cluster

__all__ = ["Cluster", "check_resources", "connect", "fitting_groups"]


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray sized to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        # "local" starts a new instance (ray.init(None) would join one another program started here). It
        # includes the dashboard: Train's placement-group cleanup uses its state API.
        ray.init(address=address or "local", log_to_driver=log_to_driver)
    except ConnectionError as e:
        raise RayadError(f"cannot reach the Ray cluster at {address!r} ({e})") from None


def check_resources(cluster: Cluster) -> None:
    """Fail within seconds (Ray Train would wait forever) when the cluster cannot hold the workers."""
    total = ray.cluster_resources()
    need_cpu = cluster.workers * cluster.cpus_per_worker
    need_gpu = cluster.workers * cluster.gpus_per_worker if cluster.use_gpu else 0
    have_cpu, have_gpu = total.get("CPU", 0), total.get("GPU", 0)
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise RayadError(f"asked for {cluster.describe()} = {need_cpu:g} CPU, {need_gpu:g} GPU; "
                         f"the cluster has {have_cpu:g} CPU, {have_gpu:g} GPU")


def fitting_groups(cluster: Cluster) -> int:
    """How many worker groups of `cluster`'s shape the cluster holds at once (at least 1)."""
    total = ray.cluster_resources()
    fits = total.get("CPU", 0) // (cluster.workers * cluster.cpus_per_worker)
    if cluster.use_gpu:
        fits = min(fits, total.get("GPU", 0) // (cluster.workers * cluster.gpus_per_worker))
    return max(1, int(fits))
