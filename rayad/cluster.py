"""The Ray cluster rayad runs on: start or join it, and check that what a job asks for fits in it.

Training (`rayad train --workers`), searches, `predict --ray`, Serve and the demo all connect here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayad.cpu import ONE_ARENA_ENV
from rayad.errors import RayadError, stop_on_sigterm
from rayad.settings import Cluster

__all__ = ["Cluster", "check_group_fits", "check_resources", "check_shared_paths", "connect", "leave_ray",
           "fitting_groups", "node_share", "smallest_node_cpus", "with_worker_cpus"]

log = logging.getLogger(__name__)


def starts_local_ray(address: str | None) -> bool:
    """Whether `connect(address)` would start a local Ray (no address, here or in RAY_ADDRESS, or "local")."""
    return not ray.is_initialized() and (address or os.environ.get("RAY_ADDRESS")) in (None, "", "local")


def connect(address: str | None, log_to_driver: bool = True) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray sized to this machine; True when
    it started one (which ends with this process)."""
    if ray.is_initialized():
        return False
    local = starts_local_ray(address)
    try:
        if local:
            _start_local(log_to_driver)
        else:
            _join(address or os.environ["RAY_ADDRESS"], "--address" if address else "RAY_ADDRESS", log_to_driver)
    except SystemExit as e:  # ray.init's own SIGTERM handler exits: stop as Ctrl-C does, with Ray's processes
        if e.code != signal.SIGTERM:
            raise
        ray.shutdown()
        raise KeyboardInterrupt from None
    stop_on_sigterm()  # again: ray.init installed Ray's own SIGTERM handler
    return local


def leave_ray(process_ends: bool) -> None:
    """Leave Ray (stopping a local one) with Ctrl-C ignored: Ray's own shutdown at exit took a second Ctrl-C as a
    traceback and left its processes running. When `process_ends` (the command line), Ctrl-C stays ignored through
    Python's own shutdown; else the caller gets its handlers back. (SIGTERM is ignored too, but Ray's shutdown
    gives it back its default action: it still ends the process.)"""
    signals = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()  # the only one that may set handlers
    previous = [signal.signal(stop, signal.SIG_IGN) for stop in signals] if main_thread else []
    log.debug("leaving Ray (Ctrl-C is ignored now)")
    try:
        ray.shutdown()
    finally:
        if not process_ends:
            for stop, handler in zip(signals, previous, strict=False):
                signal.signal(stop, handler)


def _join(address: str, given_as: str, log_to_driver: bool) -> None:
    """Join the cluster at `address`, which `given_as` (--address or RAY_ADDRESS) gave."""
    _check_reachable(address, given_as)
    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except (ConnectionError, ValueError) as e:
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; a cluster with token authentication (a `ray start` of Ray 2.60 turns it on) needs RAY_AUTH_MODE=token "
            "and its token here")
        raise RayadError(f"cannot reach the Ray cluster at {address!r} ({e}){hint}") from None


def _check_reachable(address: str, given_as: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must answer within seconds, and as Ray does (gRPC): ray.init retries
    a silent address, or another server (the dashboard's port, say), for ever."""
    if address == "auto":
        return
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        raise RayadError(f"address {address!r} ({given_as}): give the head node's HOST:PORT (e.g. 10.0.0.1:6379), or "
                         "ray://HOST:PORT for a Ray Client server; not an http:// URL (that is the dashboard's)")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise RayadError(f"address {address!r} ({given_as}): expected HOST:PORT, the head node's (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            speaks_grpc = os.environ.get("RAY_USE_TLS") in ("1", "true") or _answers_http2(conn)
    except OSError as e:
        raise RayadError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); is `ray start --head` "
                         "running there?") from None
    if not speaks_grpc:
        raise RayadError(f"address {address!r} ({given_as}): something answers there, but not Ray; give the head "
                         "node's GCS port (6379 by default; `ray start --head` prints it), not the dashboard's (8265)")


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the server on `conn` answers HTTP/2's opening, as Ray's gRPC servers do (its SETTINGS frame). With
    TLS (RAY_USE_TLS) a server would not: the caller skips this check then."""
    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # preface, empty SETTINGS
    reply = b""
    try:
        while len(reply) < 9 and (chunk := conn.recv(9 - len(reply))):
            reply += chunk
    except TimeoutError:
        return False
    return len(reply) == 9 and reply[3] == 0x04  # a frame header whose type is SETTINGS


def _start_local(log_to_driver: bool) -> None:
    """A new Ray on this machine ("local": ray.init(None) would join one another program started here), whose
    processes all know its dashboard. Ray Train's placement-group cleaner asks the dashboard's state API
    whether a Train controller lives; without an address, a Ray process looks for the cluster of the last
    `ray start` here (`ray_current_cluster` in Ray's temp folder) or for any local GCS, which may be another
    cluster or a dead one. Then the CPUs of a trial that Tune stopped are never freed, and the next trial
    waits for them forever (docs/design.md, "Ray clusters"). Ray's processes inherit this environment."""
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    for name, value in ONE_ARENA_ENV.items():  # the heap kept in the threads that score and train (rayad.cpu)
        os.environ.setdefault(name, value)
    ray.init(address="local", dashboard_port=port, log_to_driver=log_to_driver)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_resources(cluster: Cluster) -> None:
    """Fail within seconds (Ray Train would wait forever) when the cluster cannot hold the workers, or when
    NCCL would refuse them."""
    if cluster.use_gpu and cluster.workers > 1 and cluster.gpus_per_worker < 1:
        raise RayadError(f"{cluster.workers} DDP workers with {cluster.gpus_per_worker:g} GPU each would put "
                         "several ranks on one GPU, which NCCL refuses (\"Duplicate GPU detected\"); give each "
                         "worker a whole GPU, or train with one worker")
    check_group_fits("a worker (--cpus-per-worker, and --gpu or --gpus-per-worker)", cluster.describe(),
                     cluster.workers, cluster.cpus_per_worker, cluster.gpus_per_worker if cluster.use_gpu else 0)


def check_group_fits(one: str, group: str, count: int, cpus: float, gpus: float) -> None:
    """Fail within seconds when no node holds `one` process of `cpus` CPUs and `gpus` GPUs, or the cluster does not
    hold the `group` of `count` of them: Ray would wait forever for the rest."""
    if not check_fits(one, cpus, gpus):
        return  # waits for the autoscaler, as it said
    held = places(cpus, gpus)
    if held < count:  # two nodes of 3 CPUs have 6, but hold two processes of 2 CPUs, not three
        total = ray.cluster_resources()
        _refuse(f"asked for {group} = {count * cpus:g} CPU, {count * gpus:g} GPU; the cluster's nodes hold {held:g} "
                f"of them at once, each on one node (the cluster has {total.get('CPU', 0):g} CPU, "
                f"{total.get('GPU', 0):g} GPU)")


def places(cpus: float, gpus: float) -> float:
    """How many processes of `cpus` CPUs and `gpus` GPUs the live nodes hold at once (inf when they ask for none)."""
    def share(have: float, need: float) -> float:
        return math.floor(have / need + 1e-9) if need else math.inf  # 1 // 0.1 is 9.0
    return sum(min(share(r.get("CPU", 0), cpus), share(r.get("GPU", 0), gpus))
               for r in (node["Resources"] for node in ray.nodes() if node["Alive"]))


def check_fits(what: str, cpus: float, gpus: float) -> bool:
    """Fail within seconds when no live node has `cpus` CPUs and `gpus` GPUs for one process: Ray would wait for
    such a node forever (Serve, Ray Data and Ray Train alike). False when it waits for an autoscaler instead."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return True
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    _refuse(f"{what} asks for {cpus:g} CPU and {gpus:g} GPU, more than any node of the cluster has (the largest: "
            f"{largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU)")
    return False


def _refuse(problem: str) -> None:
    """A request the cluster cannot hold now: an error, unless an autoscaler may add the nodes it needs (a KubeRay
    GPU group that scales from zero has no GPU until a job asks for one)."""
    if not autoscaled():
        raise RayadError(problem)
    log.warning("%s now; waiting for the cluster's autoscaler to add nodes (Ray waits for as long as that takes, "
                "and for ever when no node type it may add is large enough; Ctrl-C stops)", problem)


def autoscaled() -> bool:
    """Whether an autoscaler may add nodes to the connected cluster. Ray's monitor runs on every head, v1 or v2,
    and reports the nodes' types; without an autoscaling config (a local Ray, `ray start` by hand, a fixed
    KubeRay cluster) it can add none, and it names each node's type after the node, where a real autoscaler
    uses its config's types."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if not ray.is_initialized():
        return False
    try:
        if is_autoscaler_v2(fetch_from_server=True):
            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            types = {node.node_id: node.ray_node_type_name for node in [*status.active_nodes, *status.idle_nodes]}
        else:
            report = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}").get("autoscaler_report") or {}
            types = report.get("node_type_mapping") or {}
    except Exception as e:  # noqa: BLE001 - Ray's RPC and parsing errors: then no autoscaler is assumed
        log.debug("the autoscaler's status cannot be read (%s: %s)", type(e).__name__, e)
        return False
    return any(kind and kind != format_readonly_node_type(node) for node, kind in types.items())


def smallest_node_cpus() -> float:
    """The CPUs of the smallest live node that has any (a head started with 0 CPUs runs no work), or 1; where Ray
    is not connected yet (`serve run` builds its application first), those of the local Ray it would start (Ray's
    own count, which a container's CPU limit lowers). The default CPUs of Ray Train workers, Ray Data's scoring
    actors and Serve's scorer replicas fill a node of this size."""
    if not ray.is_initialized():
        return float(ray._private.utils.get_num_cpus())
    return min((node["Resources"]["CPU"] for node in ray.nodes()
                if node["Alive"] and node["Resources"].get("CPU", 0) >= 1), default=1)


def node_share(processes: int) -> float:
    """The whole cores of the smallest node shared by `processes`, at least 1."""
    return float(max(1, int(smallest_node_cpus()) // processes))


def with_worker_cpus(cluster: Cluster) -> Cluster:
    """`cluster` with its CPUs per worker (and so its torch threads) set: as given, or by default the smallest
    node's cores shared by the workers, at least 1. One worker on 2 cores trained 1.5-1.7x faster with both than
    with one (docs/benchmarks.md)."""
    if cluster.cpus_per_worker is not None:
        return cluster
    return replace(cluster, cpus_per_worker=node_share(cluster.workers))


def fitting_groups(cluster: Cluster) -> int:
    """How many worker groups of `cluster`'s shape the cluster holds at once (at least 1)."""
    held = places(cluster.cpus_per_worker, cluster.gpus_per_worker if cluster.use_gpu else 0)
    return max(1, int(min(held, 10**6) // cluster.workers))


def check_shared_paths(storage: str, data: str, category: str) -> None:
    """On a cluster of several nodes, check up front that every node sees the `--storage` folder (a marker
    written here must be visible there: a node-local folder of the same name fails at the first checkpoint)
    and the `--data` folder's `category` (where it has one), not empty (a worker landing where it is missing
    fails; an unmounted share leaves an empty mount point). URIs are not checked."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    own_folder = (Path(data) / category).is_dir()  # not in a VisA root, whose CSV may list images elsewhere
    data_path = Path(data) / category if own_folder else data
    paths = {flag: str(Path(path).absolute()) for flag, path in (("--storage", storage), ("--data", data_path))
             if "://" not in str(path)}
    marker = None
    if "--storage" in paths:
        Path(paths["--storage"]).mkdir(parents=True, exist_ok=True)
        marker = Path(paths["--storage"]) / f".rayad-node-check-{uuid.uuid4().hex}"
        marker.write_text("rayad checks that every node sees this folder")
        paths["--storage"] = str(marker)
    try:
        checks = [_missing.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"],
                                                                                                 soft=False)
                                   ).remote(paths) for n in nodes]
        for node, missing in zip(nodes, ray.get(checks, timeout=120), strict=True):
            if missing:
                flag = missing[0]
                where = storage if flag == "--storage" else data + (f" (its {category} folder)" if own_folder else "")
                raise RayadError(f"{flag} {where}: missing or empty on node {node['NodeManagerAddress']}; on a cluster "
                                 "it must be a folder every node shares (NFS, a mounted volume) or a URI such as "
                                 "s3://bucket/path")
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


@ray.remote
def _missing(paths: dict[str, str]) -> list[str]:
    return [flag for flag, path in paths.items() if not os.path.exists(path) or os.path.isdir(path)
            and not os.listdir(path)]
