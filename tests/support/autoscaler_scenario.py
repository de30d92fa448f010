"""The autoscaler twin of cluster.yaml running: a head started with `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=TWIN` (token authentication on, everything on 127.0.0.1, its own temp dir and ports), whose
autoscaler adds and removes fake worker nodes (real raylets on this machine) of cluster.yaml's node types."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support import BIN as VENV_BIN
from tests.support import ROOT
from tests.support.autoscaler_twin import twin
from tests.support.raycluster import Head, free_ports, short_temp_dir


def start_twin_head(cluster_yaml: str | Path = ROOT / "cluster.yaml", timeout: float = 120.0) -> tuple[Head, dict]:
    """Start the twin's head; returns it and the twin config it runs."""
    temp_dir = short_temp_dir("vat")
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(9)
    config = twin(cluster_yaml, gcs_address=f"127.0.0.1:{gcs}")
    config_file = Path(temp_dir) / "twin.yaml"
    config_file.write_text(json.dumps(config))
    head_resources = dict(config["available_node_types"][config["head_node_type"]]["resources"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "VITLAB_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PATH=f"{VENV_BIN}:{env['PATH']}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = Path(temp_dir) / "ray_start.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(env_agent), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--temp-dir", temp_dir,
           "--num-cpus", str(int(head_resources.pop("CPU", 0))), "--num-gpus", str(int(head_resources.pop("GPU", 0))),
           f"--autoscaling-config={config_file}", "--disable-usage-stats"]
    if head_resources:
        cmd += ["--resources", json.dumps(head_resources)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir,
                                start_new_session=True)
    head = Head(temp_dir, token, token_file, dash, gcs, proc, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            text = log.read_text()[-3000:]
            head.stop()
            raise RuntimeError(f"ray start exited {proc.returncode}: {text}")
        try:
            req = urllib.request.Request(f"{head.url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return head, config
        except OSError:
            pass
        time.sleep(0.5)
    text = log.read_text()[-3000:]
    head.stop()
    raise RuntimeError(f"the twin head did not answer on {head.url} in {timeout:.0f}s: {text}")
