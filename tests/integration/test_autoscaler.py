"""The autoscaler, simulated: cluster.yaml's twin (tests/support/autoscaler_twin.py) run by Ray's fake multi-node
provider. Jobs whose work needs a node type that has 0 nodes make the autoscaler add one, the jobs succeed,
``max_workers`` caps the type, and the node goes away after the twin's ``idle_timeout_minutes``."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import BIN, ROOT, TINY, VITLAB
from tests.support.autoscaler_scenario import start_twin_head
from tests.support.autoscaler_twin import FAKE_HEAD_TYPE, IDLE_TIMEOUT_MINUTES, load, shape, twin, twin_name

CLUSTER_YAML = ROOT / "cluster.yaml"

# A job needing a whole 8-GPU node twice at once: only gpu-8x-a100 fits it; the twin allows one such node.
NEEDS_A100 = """\
import os, time
import ray
ray.init()
@ray.remote(num_cpus=1, num_gpus=8)
def where():
    time.sleep(1)
    return ray.get_runtime_context().get_node_id(), os.environ.get("RAY_NODE_TYPE_NAME")
print("RESULT " + repr(ray.get([where.remote(), where.remote()])))
"""


def test_twin_agrees_with_cluster_yaml():
    real = load(CLUSTER_YAML)
    fake = twin(CLUSTER_YAML)
    assert set(fake["available_node_types"]) == {twin_name(n, real) for n in real["available_node_types"]}
    assert fake["head_node_type"] == twin_name(real["head_node_type"], real) == FAKE_HEAD_TYPE
    for name, spec in real["available_node_types"].items():
        t = fake["available_node_types"][twin_name(name, real)]
        assert shape(t) == shape(spec), name  # same resource keys (CPU, GPU) as on AWS
        if name != real["head_node_type"]:
            assert 1 <= t["max_workers"] <= spec["max_workers"] and t["min_workers"] == spec.get("min_workers", 0)
            assert ("GPU" in shape(spec)) == ("GPU" in t["resources"])
    head = fake["available_node_types"][FAKE_HEAD_TYPE]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0  # the head still takes no work
    assert fake["idle_timeout_minutes"] < real["idle_timeout_minutes"]
    assert fake["provider"]["type"] == "fake_multinode"
    # GPU counts are kept, so a request for 8 GPUs fits only the 8-GPU type, as on AWS
    gpus = {n: t["resources"].get("GPU", 0) for n, t in fake["available_node_types"].items()}
    assert gpus["gpu-8x-a100"] == 8 and gpus["gpu-4x-a10g"] == gpus["gpu-4x-a10g-spot"] == 4 and gpus["cpu-32"] == 0


def nodes(head) -> list[dict]:
    req = urllib.request.Request(f"{head.url}/api/v0/nodes?limit=1000&detail=1",
                                 headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["data"]["result"]["result"]


def workers(head) -> list[dict]:
    return [n for n in nodes(head) if not n.get("is_head_node")]


def monitor_log(head) -> str:
    return "".join(p.read_text(errors="replace")
                   for p in Path(head.temp_dir).glob("session_*/logs/monitor.log"))


def wait_for_monitor_line(head, pattern: str, timeout: float = 30) -> None:
    """The monitor logs its event summary ("Removing 1 nodes of type ...") on the loop iteration after it
    terminates a node, which may come after the node already reads DEAD."""
    deadline = time.time() + timeout
    while not re.search(pattern, monitor_log(head)):
        if time.time() > deadline:
            raise AssertionError(f"no {pattern!r} in monitor.log after {timeout:.0f}s:\n{monitor_log(head)[-3000:]}")
        time.sleep(1)


def wait_all_workers_gone(head, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if all(n["state"] == "DEAD" for n in workers(head)):
            return time.time() - start
        time.sleep(1)
    raise AssertionError(f"workers still alive after {timeout:.0f}s: {workers(head)}\n{monitor_log(head)[-3000:]}")


@pytest.fixture(scope="module")
def twin_head():
    head, config = start_twin_head(CLUSTER_YAML)
    try:
        yield head, config
    finally:
        head.stop()


def run(cmd: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_job_needing_an_absent_type_scales_it_up_within_max_workers_then_down(twin_head, tmp_path):
    head, config = twin_head
    assert workers(head) == []  # min_workers 0 everywhere: no worker nodes at first
    (tmp_path / "needs_a100.py").write_text(NEEDS_A100)
    proc = run([str(BIN / "ray"), "job", "submit", "--address", head.url, "--working-dir", str(tmp_path), "--",
                "python", "needs_a100.py"], head.client_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    placed = ast.literal_eval(re.search(r"RESULT (\[.*\])", out).group(1))
    assert {t for _, t in placed} == {"gpu-8x-a100"}
    assert len({n for n, _ in placed}) == 1  # two 8-GPU demands at once, max_workers 1: one node ran both
    added = workers(head)
    assert config["available_node_types"]["gpu-8x-a100"]["max_workers"] == 1
    assert len(added) == 1 and added[0]["resources_total"]["GPU"] == 8, added  # no other type was added
    wait_for_monitor_line(head, r"Adding 1 node\(s\) of type gpu-8x-a100")
    # idle for idle_timeout_minutes (15 s in the twin), then removed
    wait_all_workers_gone(head, timeout=IDLE_TIMEOUT_MINUTES * 60 + 60)
    wait_for_monitor_line(head, r"Removing 1 nodes of type gpu-8x-a100 \(idle\)")


@pytest.mark.timeout(400)
def test_vitlab_submit_training_on_an_absent_cpu_type(twin_head, digits_dir, tmp_path):
    """`vitlab submit -- train`: the head has CPU 0, so the Train worker needs a cpu-32 node (the autoscaler keeps
    CPU-only work off GPU types); it is added, the job SUCCEEDS, and the node goes when idle."""
    head, _ = twin_head
    wait_all_workers_gone(head, timeout=IDLE_TIMEOUT_MINUTES * 60 + 60)
    before = {n["node_id"] for n in workers(head)}
    proc = run([VITLAB, "submit", "--address", head.url, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--storage-path", str(tmp_path / "shared"), "--", "train", "jobs/digits_vit.yaml", "train.epochs=1",
                f"data.path={digits_dir}", "run.name=autoscaled", "scaling.num_workers=1", *TINY],
               head.client_env(), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:] + monitor_log(head)[-3000:]
    assert re.search(r"job \S+ SUCCEEDED after ", proc.stdout.strip().splitlines()[-1]), out[-3000:]
    new = [n for n in workers(head) if n["node_id"] not in before]
    assert len(new) == 1 and "GPU" not in new[0]["resources_total"], new
    wait_for_monitor_line(head, r"Adding 1 node\(s\) of type cpu-32")
    wait_all_workers_gone(head, timeout=IDLE_TIMEOUT_MINUTES * 60 + 60)
    wait_for_monitor_line(head, r"Removing 1 nodes of type cpu-32 \(idle\)")
