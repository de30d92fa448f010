"""The autoscaler twin of cluster.yaml running: a head started with `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=TWIN` (token authentication on, everything on 127.0.0.1, its own temp dir and ports), whose
autoscaler adds and removes fake worker nodes (real raylets on this machine) of cluster.yaml's node types."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import ROOT
from tests.support.autoscaler_twin import twin
from tests.support.raycluster import Head, start_head


def start_twin_head(cluster_yaml: str | Path = ROOT / "cluster.yaml", timeout: float = 120.0) -> tuple[Head, dict]:
    """Start the twin's head; returns it and the twin config it runs."""
    config: dict = {}

    def autoscaling(temp_dir: Path, gcs_port: int) -> list[str]:
        config.update(twin(cluster_yaml, gcs_address=f"127.0.0.1:{gcs_port}"))
        (temp_dir / "twin.yaml").write_text(json.dumps(config))
        return [f"--autoscaling-config={temp_dir / 'twin.yaml'}"]

    plain = twin(cluster_yaml)
    resources = dict(plain["available_node_types"][plain["head_node_type"]]["resources"])
    head = start_head(num_cpus=int(resources.pop("CPU", 0)), num_gpus=int(resources.pop("GPU", 0)),
                      resources=resources, extra_args=autoscaling, prefix="vat", timeout=timeout,
                      extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    return head, config
