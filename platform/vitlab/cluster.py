"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one started on 127.0.0.1."""

from __future__ import annotations

import logging
import os

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
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    log.info("started a local Ray: %s", ray.cluster_resources())
