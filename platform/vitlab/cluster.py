"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one started on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def connect(num_cpus: int | None = None) -> None:
    """Connect once per process. ``RAY_ADDRESS`` (or a job's own cluster) wins; otherwise start a local
    Ray whose dashboard listens on 127.0.0.1 only (Ray Train's state checks need the dashboard)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray at %s", address)
        return
    start_local(num_cpus)
    log.info("started a local Ray: %s", ray.cluster_resources())


def start_local(num_cpus: int | None = None) -> None:
    """A local Ray whose dashboard (and State API) listens on 127.0.0.1, on a port every process is told.

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
