"""Multi-node scenarios on one machine, run by tests/integration/test_multinode.py in a process of their own.

A `ray.cluster_utils.Cluster` (a head with no CPUs, like cluster.yaml's, and two worker nodes of 2 CPUs each,
token authentication on) hosts, in order:

  sweep       a 2-trial sweep whose trials (1 worker of 1.5 CPUs + 0.5 for decoding) can only fit one per node;
  node_loss   a 2-worker training with scaling.placement_strategy=STRICT_SPREAD (one worker per node until the
              loss: the `spread` result) that loses a node (all its processes killed) after its first
              checkpoint; a new node joins a few seconds later and the run must restore and finish. Its
              checkpoints are in S3 (the suite's server on 127.0.0.1), as on a real cluster;
  preemption  the same training, its node drained as a spot reclaim (reason PREEMPTION, a deadline) with
              run.max_failures=0: just-in-time checkpoints before the deadline, then the node goes, a new one
              comes, and the run restores from the last checkpoint and finishes;
  elastic     a training on [1, 2] workers that loses a node, goes on with one, and gets two again when a node
              joins, with the global batch and the step count of an uninterrupted run.

It prints one line `RESULT {json}` per scenario (node ids, MLflow epoch lists) for the test to check. A Cluster
needs its own ray.init in its own process, which the pytest process (with the session's Ray) cannot give it.

    python -m tests.support.multinode_scenarios OUT_DIR [sweep node_loss preemption elastic]    (from the repo root)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tests.support import in_thread, tiny_job

NODE_CPUS = 2
# The drain comes as an epoch starts (the epoch before it shows in MLflow): its first check, after the first
# batches load (seconds here, no check runs meanwhile), must come before the deadline; the run's epochs must
# outlast it, so that it holds and restarts: the notice came at epochs 2-3 here (the epoch in MLflow lags training)
# and the hold at epochs 3-8.
PREEMPTION_DEADLINE_S = 12
PREEMPTION_EPOCHS = 12
ELASTIC_ALONE_S = 120  # at most, for the one-worker epoch


def result(name: str, **values) -> None:
    print("RESULT " + json.dumps({"scenario": name, **values}), flush=True)


class ActorWatch:
    """Polls the State API for live Ray Train workers: which nodes they ran on, and which ran together."""

    def __init__(self, interval: float = 0.5):
        self.address = f"http://127.0.0.1:{os.environ['VITLAB_TEST_DASHBOARD_PORT']}"
        self.interval = interval
        self.seen: dict[str, str] = {}  # actor id -> node id
        self.first_seen: dict[str, float] = {}  # actor id -> when it was first seen alive
        self.together: list[list[str]] = []  # node ids of the workers alive at one moment (2+ of them)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        from ray.util.state import list_actors

        while not self._stop.is_set():
            try:
                alive = list_actors(address=self.address, detail=True, raise_on_missing_output=False,
                                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            except Exception as e:  # the State API is briefly unavailable while a node goes away
                print(f"watch: {e}", flush=True)
                alive = []
            for a in alive:
                self.seen[a["actor_id"]] = a["node_id"]
                self.first_seen.setdefault(a["actor_id"], time.time())
            if len(alive) >= 2:
                self.together.append(sorted(a["node_id"] for a in alive))
            self._stop.wait(self.interval)


def job(tmp: Path, data: str, name: str, *extra: str):
    return tiny_job(tmp, data, name, "data.decode_cpus=0.5", *extra)


def epochs_in_mlflow(uri: str, run_id: str, key: str = "val_top1") -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def worker_node_ids(cluster) -> list[str]:
    return [n.node_id for n in cluster.worker_nodes]


def wait_for_first_epoch(uri: str, run_name: str, thread: threading.Thread) -> list[int]:
    """The epochs in MLflow once the first is there: it is checkpointed (epochs reach MLflow only once a
    checkpoint covers them)."""
    import mlflow

    logged: list[int] = []
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and not logged:
        runs = mlflow.MlflowClient(uri).search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()],
            filter_string=f"attributes.run_name = '{run_name}'") if Path(uri[len("sqlite:///"):]).exists() else []
        logged = epochs_in_mlflow(uri, runs[0].info.run_id) if runs else []
        time.sleep(0.2)
    return logged


def scenario_sweep(cluster, tmp: Path, data: str) -> None:
    from vitlab.tune.space import load_space
    from vitlab.tune.sweep import auto_concurrency, run_sweep

    space = tmp / "space.yaml"
    space.write_text("metric: val_top1\nmode: max\nnum_samples: 1\nmax_concurrent_trials: auto\n"
                     "scheduler: {name: fifo}\nparams:\n  optim.lr: {grid: [1.0e-3, 3.0e-3]}\n")
    # One trial = 1 worker of 1.5 CPUs + 0.5 CPU of decoding = one 2-CPU node; two such workers cannot share one.
    base = job(tmp, data, "sw", "train.epochs=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1.5")
    with ActorWatch() as watch:
        report = run_sweep(base, load_space(space), str(space))
    result("sweep", concurrency=auto_concurrency(base), together=watch.together[:3],
           worker_nodes=sorted(watch.seen.values()), cluster_workers=sorted(worker_node_ids(cluster)),
           statuses=[t["status"] for t in report["trials"]], epochs=[t["epochs_run"] for t in report["trials"]])


def scenario_node_loss(cluster, tmp: Path, data: str) -> None:

    from vitlab.train.run import train

    epochs = 4
    # Checkpoints in S3, as on a cluster: the new node restores from there.
    cfg = job(tmp, data, "lossy", f"train.epochs={epochs}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
              "scaling.placement_strategy=STRICT_SPREAD", "run.max_failures=3",
              f"run.storage_path=s3://vitlab/multinode/{tmp.name}")
    uri = cfg.tracking.uri
    clocks_before = set(_actors("EpochClock"))
    with ActorWatch() as watch:
        thread, out = in_thread(lambda: train(cfg, log_model=False))
        logged = wait_for_first_epoch(uri, "lossy", thread)
        # Before the loss: where the first worker group ran, against the cluster's worker nodes at that time.
        result("spread", worker_nodes=sorted(watch.together[0]) if watch.together else [],
               cluster_workers=sorted(worker_node_ids(cluster)), head=cluster.head_node.node_id, epochs=logged)
        victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
        removed_at = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        print(f"removed node {victim.node_id} after epochs {logged}", flush=True)
        time.sleep(5)  # the run waits: STRICT_SPREAD needs two nodes with CPUs, the head has none
        new = cluster.add_node(temp_dir=os.environ["VITLAB_TEST_RAY_TEMP_DIR"], object_store_memory=150 * 1024**2,
                               num_cpus=NODE_CPUS)
        print(f"added node {new.node_id}, {time.time() - removed_at:.1f}s after the loss", flush=True)
        thread.join(timeout=420)
    if thread.is_alive():
        out["error"] = "training still running 7 minutes after the node came back"
    o = out.get("value")
    clocks = {a: n for a, n in _actors("EpochClock").items() if a not in clocks_before}
    result("node_loss", error=_error(out), logged_before_loss=logged, removed=victim.node_id,
           head=cluster.head_node.node_id, epoch_clock_nodes=sorted(clocks.values()),
           added=new.node_id, worker_nodes=sorted(set(watch.seen.values())), workers_started=len(watch.seen),
           epochs=epochs_in_mlflow(o.tracking_uri, o.mlflow_run_id) if o else None,
           epoch_times=epochs_in_mlflow(o.tracking_uri, o.mlflow_run_id, "epoch_time_s") if o else None,
           final_epoch=o.epochs if o else None, expected_epochs=epochs,
           model_path=o.model_path if o else None, checkpoint=o.checkpoint if o else None)


def scenario_preemption(cluster, tmp: Path, data: str) -> None:
    """A 2-worker STRICT_SPREAD training whose node is drained as a spot reclaim (GCS drain, reason PREEMPTION,
    a deadline PREEMPTION_DEADLINE_S away), as the autoscaler does, with run.max_failures=0: the run must take
    its just-in-time checkpoints, hold, and restart from the last one once the node is gone and a new one came."""
    import mlflow
    import ray
    from ray.core.generated import autoscaler_pb2

    from vitlab.train.run import train

    cfg = job(tmp, data, "spot", f"train.epochs={PREEMPTION_EPOCHS}", "scaling.num_workers=2",
              "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=STRICT_SPREAD", "run.max_failures=0",
              "run.checkpoint_every_steps=1000", "run.preemption_check_every_steps=2",
              f"run.storage_path=s3://vitlab/multinode/{tmp.name}")
    thread, out = in_thread(lambda: train(cfg, log_model=False))
    logged = wait_for_first_epoch(cfg.tracking.uri, "spot", thread)
    victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    deadline_ms = int((time.time() + PREEMPTION_DEADLINE_S) * 1000)
    accepted, refusal = ray._raylet.GcsClient(address=cluster.address).drain_node(
        victim.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim",
        deadline_ms)
    print(f"drained node {victim.node_id} after epochs {logged}, deadline in {PREEMPTION_DEADLINE_S}s: "
          f"{accepted} {refusal}", flush=True)
    time.sleep(max(0.0, deadline_ms / 1000 - time.time()) + 1)  # the reclaim comes after the deadline
    cluster.remove_node(victim, allow_graceful=False)
    new = cluster.add_node(temp_dir=os.environ["VITLAB_TEST_RAY_TEMP_DIR"], object_store_memory=150 * 1024**2,
                           num_cpus=NODE_CPUS)
    thread.join(timeout=420)
    o = out.get("value")
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(o.mlflow_run_id) if o else None
    result("preemption", error=_error(out) or (None if o else "still running 7 minutes after the drain"),
           accepted=accepted, logged_before=logged, removed=victim.node_id, added=new.node_id,
           epochs=epochs_in_mlflow(o.tracking_uri, o.mlflow_run_id) if o else None,
           preemptions=run.data.tags.get("vitlab.preemptions") if run else None,
           check_ms=[round(m.value, 2) for m in mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(
               o.mlflow_run_id, "preemption_check_ms")] if o else None,
           deadline_ms=deadline_ms, expected_epochs=PREEMPTION_EPOCHS)


def scenario_elastic(cluster, tmp: Path, data: str) -> None:
    """An elastic training (scaling.num_workers=[1, 2], a worker fills a node) that loses a node: it goes on with
    one worker from its latest checkpoint; a node joins again and the next resize check brings back two. The
    global batch stays 64 throughout, so the run takes the optimizer steps of an uninterrupted one."""
    import mlflow

    from vitlab.train import storage
    from vitlab.train.run import train

    # runway: the grow-back must come while it still trains. It comes 5-8 s after the join, which follows the
    # first one-worker epoch in MLflow: at epoch 3 or 4 on this machine, at epoch 8 at the latest seen.
    epochs = 10
    # A worker takes 1.5 CPUs + 0.5 for a decode task: one per 2-CPU node, which is what Ray Train's elastic
    # count sees (it fits workers into each node's total resources, as the AutoscalingCoordinator reserves
    # them; a placement strategy is not part of it).
    cfg = job(tmp, data, "elastic", f"train.epochs={epochs}", "scaling.num_workers=[1, 2]",
              "scaling.cpus_per_worker=1.5", "scaling.resize_check_seconds=2", "run.max_failures=3",
              f"run.storage_path=s3://vitlab/multinode/{tmp.name}")
    with ActorWatch(interval=0.2) as watch:
        thread, out = in_thread(lambda: train(cfg, log_model=False))
        logged = wait_for_first_epoch(cfg.tracking.uri, "elastic", thread)
        victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
        before = set(watch.first_seen)
        removed_at = time.time()
        # a node that leaves the cluster (as the autoscaler terminates one): the GCS knows at once, so Ray Train's
        # elastic count of free resources no longer includes it
        cluster.remove_node(victim, allow_graceful=True)
        print(f"elastic: removed node {victim.node_id} after epochs {logged}", flush=True)
        # one worker trains alone: wait for an epoch of it in MLflow
        client, deadline = mlflow.MlflowClient(cfg.tracking.uri), time.time() + ELASTIC_ALONE_S
        alone: list[int] = []
        while time.time() < deadline and thread.is_alive() and not alone:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string="attributes.run_name = 'elastic'")
            alone = [int(m.step) for m in client.get_metric_history(runs[0].info.run_id, "workers") if m.value == 1]
            time.sleep(0.2)
        # from the loss to a new worker group alive (it then restores and trains)
        restarted = [t for a, t in watch.first_seen.items() if a not in before]
        one_worker = set(watch.first_seen)
        new = cluster.add_node(temp_dir=os.environ["VITLAB_TEST_RAY_TEMP_DIR"], object_store_memory=150 * 1024**2,
                               num_cpus=NODE_CPUS)
        added_at = time.time()
        print(f"elastic: added node {new.node_id}", flush=True)
        refresh_autoscaling_coordinator()
        thread.join(timeout=420)
    grown = [t for a, t in watch.first_seen.items() if a not in one_worker]  # to the two-worker group alive
    o = out.get("value")
    history = {}
    if o:
        client = mlflow.MlflowClient(o.tracking_uri)
        history = {int(m.step): int(m.value) for m in client.get_metric_history(o.mlflow_run_id, "workers")}
    snapshot = json.loads(storage.read_bytes(storage.join(storage.run_dir(cfg), "checkpoint_manager_snapshot.json")))
    result("elastic", error=_error(out) or (None if o else "still running 7 minutes after the loss"),
           logged_before=logged, epochs=epochs_in_mlflow(o.tracking_uri, o.mlflow_run_id) if o else None,
           expected_epochs=epochs, workers=history,
           resumed_after_s=round(min(restarted) - removed_at, 1) if restarted else None,
           grown_after_s=round(min(grown) - added_at, 1) if grown else None,
           final_step=snapshot["latest_checkpoint_result"]["metrics"]["step"],
           images=sorted({m.value for m in mlflow.MlflowClient(o.tracking_uri).get_metric_history(
               o.mlflow_run_id, "train_images")}) if o else None)


def refresh_autoscaling_coordinator() -> None:
    """Ray Train's elastic count asks Ray's AutoscalingCoordinator, which re-reads the cluster's nodes only every
    20 s (its TICK_INTERVAL_S): a node that joins is used up to 20 s + scaling.resize_check_seconds later. This
    test's one-worker epochs last about a second, so it asks for that re-read now instead of spending the 20-epoch
    runway waiting for it (get_reserved_resources with recompute=True runs the coordinator's tick)."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("vitlab-test", recompute=True), timeout=30)


def _error(out: dict) -> str | None:
    """in_thread's error as text for a RESULT line."""
    return repr(out["error"]) if isinstance(out.get("error"), BaseException) else out.get("error")


def _actors(class_name: str) -> dict[str, str]:
    """actor id -> node id of every actor of that class, dead or alive."""
    from ray.util.state import list_actors

    address = f"http://127.0.0.1:{os.environ['VITLAB_TEST_DASHBOARD_PORT']}"
    return {a["actor_id"]: a["node_id"] for a in list_actors(
        address=address, filters=[("class_name", "=", class_name)], detail=True, raise_on_missing_output=False)}


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


SCENARIOS = {"sweep": scenario_sweep, "node_loss": scenario_node_loss, "preemption": scenario_preemption,
             "elastic": scenario_elastic}


def main() -> int:
    import logging

    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster records its head in /tmp/ray/ray_current_cluster (and deletes that file on shutdown), where any
    # other process's plain ray.init() on this machine would find it and connect to this cluster instead of
    # starting its own. Keep this test cluster out of that shared file.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    temp_dir = os.environ["VITLAB_TEST_RAY_TEMP_DIR"]  # short, so Ray's socket paths fit
    dashboard_port = int(os.environ["VITLAB_TEST_DASHBOARD_PORT"])
    common = {"temp_dir": temp_dir, "object_store_memory": 150 * 1024**2}
    # Every process of this cluster (and Ray Train's PlacementGroupCleaner, which looks its cluster up by
    # address) must find this cluster, not one of the other Rays on the machine: fix the GCS port, export it.
    gcs_port = int(os.environ["VITLAB_TEST_GCS_PORT"])
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "gcs_server_port": gcs_port,
        "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": int(os.environ["VITLAB_TEST_AGENT_PORT"])})
    try:
        for _ in range(2):
            cluster.add_node(**common, num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        print(f"cluster: {ray.cluster_resources()}", flush=True)
        result("cluster", nodes=len([n for n in ray.nodes() if n["Alive"]]), cpus=ray.cluster_resources()["CPU"],
               job_api_without_token=_http_status(f"http://127.0.0.1:{dashboard_port}/api/jobs/"))
        from vitlab.data.prepare import prepare

        data = str(tmp / "digits")
        prepare("digits", data)
        for name in names:
            start = time.time()
            try:
                SCENARIOS[name](cluster, tmp, data)
            except Exception as e:
                import traceback

                traceback.print_exc()
                result(name, error=repr(e))
            print(f"scenario {name}: {time.time() - start:.0f}s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
