"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one started on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket

from vitlab import logs

log = logging.getLogger(__name__)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback() -> None:
    """Called before ray is imported: a Ray this process starts (no RAY_ADDRESS) binds to 127.0.0.1 only. Not
    for a cluster's own processes, whose nodes are registered under their real addresses."""
    if os.environ.get("RAY_ADDRESS", "") in ("", "local"):  # "local": ray.init starts a new local Ray
        os.environ.setdefault(LOOPBACK_ENV, "0")


def connect(num_cpus: int | None = None) -> None:
    """Connect once per process. ``RAY_ADDRESS`` (or a job's own cluster) wins; otherwise start a local
    Ray whose dashboard listens on 127.0.0.1 only (Ray Train's state checks need the dashboard)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        logs.route_ray_output()
        log.info("connected to Ray at %s", address)
        return
    start_local(num_cpus)
    logs.route_ray_output()
    resources = ray.cluster_resources()
    log.info("started a local Ray (%g CPUs%s)", resources.get("CPU", 0),
             f", {resources['GPU']:g} GPUs" if resources.get("GPU") else "")


def start_local(num_cpus: int | None = None) -> None:
    """A local Ray whose dashboard (and State API) listens on 127.0.0.1, on a port every process is told.

    Its nodes stay on loopback when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was in the environment before ray was
    imported (Ray reads it once, at import): `vitlab` sets it when no RAY_ADDRESS names a cluster, and the
    test suite for the whole session. On Linux Ray otherwise turns 127.0.0.1 into the interface address.

    Ray Train's PlacementGroupCleaner asks the State API whether a Train controller is still alive, and
    finds it by looking for "the" Ray on this machine. With a second Ray running (a test cluster, another
    user's sweep) that lookup fails, the cleaner dies, and the placement group of a trial that Tune stopped
    is never freed: the next trial waits for its CPUs forever (seen here). RAY_API_SERVER_ADDRESS in the
    job's environment names this cluster's API server to every worker and actor instead.
    """
    import ray

    port = _free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
