"""Several Ray nodes on this machine (ray.cluster_utils.Cluster, token authentication on): workers spread one
per node, a sweep's concurrent trials on different nodes, a training that loses a node after a checkpoint,
restores from it when a new node joins, and finishes with every epoch in MLflow exactly once, and a training
whose node is drained as a spot reclaim.

The scenarios run in one child process (tests/support/multinode_scenarios.py): a Cluster needs a ray.init of its own,
and this pytest process already holds the session's Ray. Each scenario prints a RESULT line checked here."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.raycluster import free_ports, kill_under, short_temp_dir
from vitlab.cluster import LOOPBACK_ENV
from vitlab.train import storage

# The scenarios took 448-801 s in the suite here (the machine's load moves them by minutes): the limit is for a
# hung cluster, not a measure. The first test's limit covers the module fixture's setup.
SCENARIOS_LIMIT_S = 1080
TEST_LIMIT_S = SCENARIOS_LIMIT_S + 120


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, s3):  # the S3 server's variables reach the scenarios' process
    tmp = tmp_path_factory.mktemp("multinode")
    temp_dir = short_temp_dir("vrm")
    dashboard, agent, gcs = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "VITLAB_"))}
    env.update({LOOPBACK_ENV: "0"}, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               VITLAB_TEST_RAY_TEMP_DIR=temp_dir, VITLAB_TEST_DASHBOARD_PORT=str(dashboard),
               VITLAB_TEST_AGENT_PORT=str(agent), VITLAB_TEST_GCS_PORT=str(gcs), PYTHONUNBUFFERED="1",
               # reports polled as in the rest of the suite (tests/conftest.py); drains noticed within 0.5 s
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
               RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5",
               # a worker group waiting for a node that left retries with what there is after 10 s, not 60
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    log = tmp / "scenarios.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.multinode_scenarios", str(tmp)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=SCENARIOS_LIMIT_S)
        except subprocess.TimeoutExpired:
            out.write(f"\nscenarios: stopped at their {SCENARIOS_LIMIT_S} s limit\n")
            out.flush()
        finally:
            kill_under(temp_dir, {proc.pid})  # the child's Ray nodes, whatever state it ended in
            proc.wait(timeout=30)
            shutil.rmtree(temp_dir, ignore_errors=True)
    text = log.read_text()
    results = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["scenario"]] = r
    sys.stdout.write(text[-5000:])  # shown when a test fails
    return results, text


def _get(scenarios, name):
    results, text = scenarios
    assert name in results, f"scenario {name} gave no result:\n{text[-6000:]}"
    r = results[name]
    assert not r.get("error"), f"{name}: {r['error']}\n{text[-6000:]}"
    return r


@pytest.mark.timeout(TEST_LIMIT_S)
def test_cluster_has_three_nodes_and_token_auth(scenarios):
    r = _get(scenarios, "cluster")
    assert r["nodes"] == 3 and r["cpus"] == 4  # the head has no CPUs
    assert r["job_api_without_token"] == 401


@pytest.mark.timeout(TEST_LIMIT_S)
def test_two_workers_one_per_node(scenarios):
    r = _get(scenarios, "spread")  # node_loss's training before the loss
    assert len(r["worker_nodes"]) == 2 and len(set(r["worker_nodes"])) == 2, r  # STRICT_SPREAD: 2 nodes
    assert set(r["worker_nodes"]) == set(r["cluster_workers"]) and r["head"] not in r["worker_nodes"]
    assert r["epochs"] and r["epochs"][0] == 1, r  # the first epoch trained and logged on that group


@pytest.mark.timeout(TEST_LIMIT_S)
def test_sweep_trials_run_on_different_nodes(scenarios):
    r = _get(scenarios, "sweep")
    assert r["concurrency"] == 2
    assert r["together"], f"the two trials never ran at the same time: {r}"
    assert all(len(set(nodes)) == len(nodes) for nodes in r["together"]), r  # never two on one node
    assert set(r["worker_nodes"]) == set(r["cluster_workers"])
    assert r["statuses"] == ["completed", "completed"] and r["epochs"] == [2, 2]


@pytest.mark.timeout(TEST_LIMIT_S)
def test_node_loss_restores_from_checkpoint(scenarios):
    r = _get(scenarios, "node_loss")
    assert r["logged_before_loss"] and max(r["logged_before_loss"]) < r["expected_epochs"], r  # lost mid-run
    assert r["final_epoch"] == r["expected_epochs"]
    expected = list(range(1, r["expected_epochs"] + 1))
    assert r["epochs"] == expected, r  # no epoch lost or logged twice
    assert r["epoch_times"] == expected, r
    assert r["workers_started"] > 2, r  # a new worker group after the loss
    assert r["added"] in r["worker_nodes"] and r["removed"] in r["worker_nodes"]
    # storage given as a URI (as s3:// on a cluster): restored from it, and the best model written to it
    assert r["checkpoint"].startswith("s3://vitlab/multinode/") and r["model_path"].endswith("/lossy/best_model.pt")
    assert storage.exists(r["model_path"])
    # the run's epoch clock lives on the driver's node (the head), so losing a worker node cannot take it
    assert r["epoch_clock_nodes"] == [r["head"]], r
    _, text = scenarios
    assert "restored from latest checkpoint of this run" in text


@pytest.mark.timeout(TEST_LIMIT_S)
def test_spot_preemption_checkpoints_before_the_deadline_and_is_not_a_failure(scenarios):
    r = _get(scenarios, "preemption")  # run.max_failures=0: a restart charged as a failure would end the run
    assert r["accepted"] and r["logged_before"] and r["epochs"] == list(range(1, r["expected_epochs"] + 1)), r
    assert r["preemptions"] == "1", r  # the run's MLflow tag
    # the barrier's cost, each epoch
    assert len(r["check_ms"]) == r["expected_epochs"] and all(ms > 0 for ms in r["check_ms"]), r
    _, text = scenarios
    text = text[text.index("drained node"):text.index('RESULT {"scenario": "preemption"')]  # this scenario's
    notices = re.findall(r"preemption notice at step (\d+)", text)
    # a notice at an epoch's last step or during its validation is answered by its end-of-epoch checkpoint
    jit = re.findall(r"just-in-time checkpoint (?:in epoch \d+ at step (\d+) of \d+|at the end of epoch \d+, "
                     r"step (\d+)) \(training paused [\d.]+ s, upload sync\)", text)
    held = re.findall(r"holding at step (\d+) until the preempted node goes", text)
    restored = re.findall(r"restored (?:after a preemption from latest checkpoint of this run: epoch \d+ at step "
                          r"\d+ of \d+|from latest checkpoint of this run: epoch \d+ done, continuing at epoch "
                          r"\d+) \(step (\d+), 2 workers\)", text)
    assert len(notices) == 1 and jit and held and restored, text[-6000:]
    assert int(restored[0]) == int(held[0]) >= int(notices[0])  # restored where it held: no step trained twice
    assert "preempted: just-in-time checkpoint taken (preemption 1 of this run)" in text


@pytest.mark.timeout(TEST_LIMIT_S)
def test_elastic_run_shrinks_to_one_worker_and_grows_back(scenarios):
    r = _get(scenarios, "elastic")
    assert r["logged_before"] and r["epochs"] == list(range(1, r["expected_epochs"] + 1)), r
    counts = list(r["workers"].values())  # the worker count of each epoch, in MLflow
    assert counts[0] == 2 and 1 in counts and counts[-1] == 2, r  # shrank after the loss, grew back after
    assert r["final_step"] == 22 * r["expected_epochs"], r  # the optimizer steps of an uninterrupted run
    assert r["images"] == [22 * 64], r  # every epoch its 22 x 64 images, on 1 worker as on 2
    _, text = scenarios
    assert re.search(r"restored from latest checkpoint of this run: .* \(step \d+, 1 workers\)", text), text[-4000:]

