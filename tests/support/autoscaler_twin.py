"""A local twin of cluster.yaml for Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`): the same node types, their resources scaled down to fit one small machine.

The twin is generated from cluster.yaml, never written by hand, so it cannot drift from it:

* worker node-type names and each type's ``min_workers`` are cluster.yaml's; the head's type is cluster.yaml's
  ``head_node_type`` under the name FAKE_HEAD_TYPE, the one the fake provider tags its head node with (under
  any other name the autoscaler would not recognise its own head and launch "head" workers);
* resources: a type's explicit ``resources`` in cluster.yaml win (the head's ``{CPU: 0}``); where cluster.yaml
  leaves them to detection (``{}``), they come from the type's ``InstanceType`` (INSTANCE_RESOURCES: what Ray
  detects on that EC2 instance). Then they are scaled: ``CPU`` becomes ``min(CPU, 1)`` (0 stays 0, so the head
  still takes no work), ``GPU`` keeps its count (fake GPUs are only logical resources, and a request for 8 GPUs
  must still fit an 8-GPU type only), so every type keeps the *shape* (the resource keys) it has on AWS;
* ``max_workers`` of each type is cluster.yaml's capped at MAX_WORKERS_CAP, and the cluster-wide
  ``max_workers`` likewise at ``MAX_WORKERS_CAP * number of worker types``;
* ``idle_timeout_minutes`` is IDLE_TIMEOUT_MINUTES (seconds, not cluster.yaml's 10 minutes);
* the provider is ``fake_multinode`` pointed at the twin head's GCS on 127.0.0.1; SSH, docker, file mounts
  and setup commands (AWS-only) are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# What Ray detects on the instance types cluster.yaml names (vCPUs, NVIDIA GPUs).
INSTANCE_RESOURCES: dict[str, dict[str, int]] = {
    "m6i.2xlarge": {"CPU": 8},
    "m6i.4xlarge": {"CPU": 16},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "p4d.24xlarge": {"CPU": 96, "GPU": 8},
    "c6i.8xlarge": {"CPU": 32},
}
FAKE_HEAD_TYPE = "ray.head.default"  # ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_TYPE
MAX_WORKERS_CAP = 1
IDLE_TIMEOUT_MINUTES = 0.25


def load(cluster_yaml: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(cluster_yaml).read_text())


def real_resources(node_type: dict[str, Any]) -> dict[str, float]:
    """The resources a node of this type has on AWS: explicit ones, else those of its instance type."""
    explicit = node_type.get("resources") or {}
    if explicit:
        return dict(explicit)
    instance = node_type["node_config"]["InstanceType"]
    if instance not in INSTANCE_RESOURCES:
        raise KeyError(f"add {instance} to INSTANCE_RESOURCES in {__file__}")
    return dict(INSTANCE_RESOURCES[instance])


def scale(resources: dict[str, float]) -> dict[str, float]:
    out = dict(resources)
    if "CPU" in out:
        out["CPU"] = min(out["CPU"], 1)
    return out


def twin(cluster_yaml: str | Path, gcs_address: str = "127.0.0.1:6379") -> dict[str, Any]:
    """The fake-provider autoscaling config twinning ``cluster_yaml`` (see the module docstring)."""
    real = load(cluster_yaml)
    head = real["head_node_type"]
    types = {}
    for name, spec in real["available_node_types"].items():
        t: dict[str, Any] = {"resources": scale(real_resources(spec)), "node_config": {}}
        if name == head:
            t["max_workers"] = 0
        else:
            t["min_workers"] = spec.get("min_workers", 0)
            t["max_workers"] = min(spec.get("max_workers", MAX_WORKERS_CAP), MAX_WORKERS_CAP)
        types[FAKE_HEAD_TYPE if name == head else name] = t
    workers = len(types) - 1
    return {
        "cluster_name": f"{real['cluster_name']}-twin",
        "max_workers": min(real.get("max_workers", workers), MAX_WORKERS_CAP * workers),
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_launch_config_check": True,
                     "disable_node_updaters": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def twin_name(cluster_yaml_name: str, cluster: dict[str, Any]) -> str:
    """The twin's name of one of cluster.yaml's node types."""
    return FAKE_HEAD_TYPE if cluster_yaml_name == cluster["head_node_type"] else cluster_yaml_name


def shape(node_type: dict[str, Any]) -> list[str]:
    """The sorted resource keys of a node type (a cluster.yaml type: those it has on AWS; a twin type: its own)."""
    if "node_config" in node_type and node_type["node_config"]:
        return sorted(real_resources(node_type))
    return sorted(node_type.get("resources") or {})
