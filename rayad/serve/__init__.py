"""Online scoring with Ray Serve (see `app.py` for the application)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

from ray import serve
from ray.serve.context import _get_global_client

from rayad.cluster import check_group_fits
from rayad.errors import RayadError
from rayad.serve.app import app_builder, build_app, discover_models, scorer_cpus
from rayad.settings import LOCAL_HOST, SERVE_PORT, ServeSettings

log = logging.getLogger(__name__)
APP_NAME = "rayad"
DRAIN_S = 20.0  # at a stop, how long the requests being scored may take (as long as Serve's graceful shutdown)
# Ray 2.60's experimental HTTP path: HAProxy (C) in front of the ingress replicas instead of Ray's Python
# proxy actor. The cluster's processes read these when they start.
HAPROXY_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}

__all__ = ["APP_NAME", "HAPROXY_INGRESS_ENV", "ServeSettings", "app_builder", "build_app", "discover_models",
           "serve_until_stopped", "start", "use_haproxy_ingress"]


def use_haproxy_ingress(address: str | None) -> str:
    """Select the HAProxy ingress; returns the address to connect to. Without an address this is a new local
    Ray ("local": not one already running here) whose processes inherit the variables; a given cluster
    must have been started with them."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if any(os.environ.get(k) != v for k, v in HAPROXY_INGRESS_ENV.items()):
            raise RayadError("--ingress haproxy on an existing cluster: start its nodes with "
                             + " ".join(f"{k}={v}" for k, v in HAPROXY_INGRESS_ENV.items()))
        return address
    os.environ.update(HAPROXY_INGRESS_ENV)
    os.environ.update(private_haproxy_state())
    # Ray keeps a stopping ingress replica up for 30 s, for load balancers in front of the nodes to notice; the
    # local HAProxy checks every 5 s, and Ctrl-C of an idle server took 35 s
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    return "local"


def private_haproxy_state() -> dict[str, str]:
    """Where HAProxy keeps its config, state and sockets: a new folder only this user can enter (mode 700).
    Ray's template creates the admin socket with mode 666 and admin level; in /tmp/haproxy-serve, Ray's
    default, any local user could use it to redirect traffic. Removed when this process exits."""
    folder = tempfile.mkdtemp(prefix="rayad-haproxy-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state"}


def start(settings: ServeSettings, host: str = LOCAL_HOST, port: int = SERVE_PORT) -> str:
    """Deploy the application on the connected Ray cluster, serving HTTP on host:port, or where the cluster's
    Serve already listens; returns that URL. One HTTP proxy, on the head node, by default (`serve deploy
    serve/config.yaml` runs one per node)."""
    cpus, gpus = scorer_cpus(settings), settings.replica_gpus
    check_group_fits("a scorer replica (--replica-cpus, --replica-gpus)",
                     f"{settings.min_replicas} scorer replica(s) (--replicas or --min-replicas) x {cpus:g} CPU"
                     + (f" + {gpus:g} GPU" if gpus else ""),
                     settings.min_replicas, cpus, gpus)
    if APP_NAME in serve.status().applications:  # serve.run would replace it, and keep its HTTP address
        raise RayadError(f"the cluster already serves an application named {APP_NAME!r} (another rayad serve); stop "
                         f"that one first (if its process is gone, serve.delete({APP_NAME!r}) on the cluster removes "
                         "it), or serve on another cluster")
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    except RuntimeError as e:  # the proxy of a cluster's head node, where this process cannot check the port
        if "Failed to bind" not in str(e):
            raise
        raise RayadError(f"--port {port}: the cluster's Serve cannot listen on {host}:{port}; pick another --port "
                         "or --host") from None
    listening = _get_global_client().http_config  # Serve already running on the cluster keeps its own address
    if (listening.host, listening.port) != (host, port):
        log.warning("the cluster's Serve already listens on %s:%s, not %s:%s as asked: serving there",
                    listening.host, listening.port, host, port)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{listening.host}:{listening.port}"


def serve_until_stopped(settings: ServeSettings, host: str, port: int, on_start: Callable[[str], None]) -> str:
    """Deploy (see `start`), call `on_start(url)`, and block until Ctrl-C (SIGINT) or SIGTERM; then delete the
    application. First the ingress refuses new images (503) and finishes those it holds (up to DRAIN_S); then
    the deletion stops the replicas (a cluster this driver joined would otherwise keep serving it after it leaves).
    Returns the signal's name. A signal during the deployment stops once it is done; a second one stops at
    once."""
    received: list[str] = []
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        received.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs Ray's own handlers
        signal.signal(signum, on_signal)
    on_start(start(settings, host, port))
    stop.wait()
    try:
        left = serve.get_app_handle(APP_NAME).drain.remote(DRAIN_S).result(timeout_s=DRAIN_S + 10)
        if left:
            log.warning("stopping with %d request(s) still being scored after %g s: they fail", left, DRAIN_S)
    except Exception as e:  # noqa: BLE001 - Ray's errors; the application is deleted all the same
        log.warning("the ingress did not drain (%s: %s); stopping", type(e).__name__, e)
    serve.delete(APP_NAME)
    return received[0]
