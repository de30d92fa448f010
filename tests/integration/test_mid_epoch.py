"""Workers killed inside epochs, with mid-epoch checkpoints (run.checkpoint_every_steps) in S3: a restart costs
at most that many steps; on the same worker count the resumed run trains exactly what an uninterrupted one does,
and a restart on another worker count finishes the epoch with every image once.

Three fits on the session's Ray (2 CPU workers, the tiny model, 22 optimizer steps per epoch): a reference run;
a run whose Train worker is SIGKILLed inside epoch 1 (Ray restarts it, charged to run.max_failures=1) and whose
workers are all killed inside epoch 2 (the second failure ends the fit); and that run resumed on one worker.
"""

import json
import os
import re
import signal
import time

import mlflow
import pytest

from tests.support import in_thread
from tests.support import tiny_job as job
from vitlab.train import storage
from vitlab.train.run import TrainingError, train

EVERY = 4  # run.checkpoint_every_steps
STEPS = 22  # optimizer steps per epoch: 1437 digits train rows // 64
EPOCHS = ["train.epochs=2", f"run.checkpoint_every_steps={EVERY}"]


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)}


def snapshot(run_dir: str) -> dict:
    """Ray Train's record of the run's registered checkpoints (what a restart restores from)."""
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
    except (OSError, ValueError):
        return {}


def failure_decisions(run_name: str, since_ns: int) -> list[str]:
    """Ray Train's failure-policy decisions for ``run_name`` since ``since_ns``, from the controller's own log file
    (the driver's copy of these lines comes through Ray's log forwarding, which may drop or hold them)."""
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "train")
    decisions = []
    for name in sorted(os.listdir(logs)):
        if name.startswith("ray-train-app-controller-"):
            with open(os.path.join(logs, name)) as f:
                records = [json.loads(line) for line in f if line.strip()]
            decisions += [(r["timestamp_ns"], " ".join(line.strip() for line in r["message"].split("\n")[:3:2]))
                          for r in records if r.get("run_name") == run_name and r["timestamp_ns"] >= since_ns
                          and r["message"].startswith("[FailurePolicy]")]
    return [d for _, d in sorted(decisions)]


def train_worker_pids() -> list[int]:
    import psutil

    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker")]


def kill_inside_epoch(run_dir: str, epoch: int, thread, every_worker: bool = False) -> dict:
    """SIGKILL one Train worker (or all) once a mid-epoch checkpoint of ``epoch`` (1-based) is registered."""
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        latest = (snapshot(run_dir).get("latest_checkpoint_result") or {}).get("metrics", {})
        if latest.get("mid_epoch") and latest["epoch"] == epoch - 1:
            for pid in train_worker_pids()[slice(None) if every_worker else slice(-1, None)]:
                os.kill(pid, signal.SIGKILL)
            return latest
        time.sleep(0.05)
    raise AssertionError(f"no mid-epoch checkpoint of epoch {epoch} registered: {snapshot(run_dir)}")


@pytest.mark.timeout(600)
def test_workers_killed_inside_epochs_resume_at_the_exact_image(ray_session, digits_dir, tmp_path, capfd):
    ref = train(job(tmp_path, digits_dir, "reference", *EPOCHS))

    spot = ["run.storage_path=s3://vitlab/runs", "train.log_every_steps=5", *EPOCHS]
    cfg = job(tmp_path, digits_dir, "spot", *spot, "run.max_failures=1")
    run_dir = storage.run_dir(cfg)
    started_ns = time.time_ns()
    thread, result = in_thread(lambda: train(cfg))
    try:
        first = kill_inside_epoch(run_dir, 1, thread)  # Ray restarts the group on 2 workers
        second = kill_inside_epoch(run_dir, 2, thread, every_worker=True)  # over max_failures: the fit ends
    finally:
        thread.join(timeout=300)
    assert isinstance(result.get("error"), TrainingError), result
    resumed = train(job(tmp_path, digits_dir, "spot", *spot, "scaling.num_workers=1"))
    assert resumed.resumed and resumed.epochs == 2

    # the first failure was retried, the second ended the fit (run.max_failures=1)
    assert failure_decisions("spot", started_ns) == ["[FailurePolicy] RETRY Error count: 1 (max allowed: 1)",
                                                     "[FailurePolicy] RAISE Error count: 2 (max allowed: 1)"]
    # Ray forwards the workers' lines to the driver every second: wait for them rather than a fixed time
    logs, deadline = "", time.time() + 15
    while time.time() < deadline:
        logs += "".join(capfd.readouterr())
        if logs.count("restored from latest checkpoint of this run") >= 2:
            break
        time.sleep(0.5)
    restores = re.findall(rf"restored from latest checkpoint of this run: epoch (\d+) at step (\d+) of {STEPS} "
                          r"\(step (\d+), (\d) workers\)", logs)
    # each restart continued inside its epoch, from the last checkpoint: at most EVERY steps trained again
    assert [(int(e), int(w)) for e, _, _, w in restores] == [(1, 2), (2, 1)], logs[-3000:]
    for (e, k, s, _), killed in zip(restores, (first, second), strict=True):
        assert int(k) >= killed["epoch_step"] and int(k) % EVERY == 0 and int(s) == STEPS * (int(e) - 1) + int(k)

    uri, run_id = ref.tracking_uri, resumed.mlflow_run_id
    ref_loss, loss = history(uri, ref.mlflow_run_id, "val_loss"), history(uri, run_id, "val_loss")
    assert sorted(loss) == [1, 2]  # each epoch logged once
    # the same 2 workers restarted inside epoch 1: the same batches, the same weights, the same val loss
    assert loss[1] == pytest.approx(ref_loss[1], abs=1e-6), (loss, ref_loss)
    assert history(uri, run_id, "workers") == {1: 2, 2: 1}
    # every epoch trained its planned images once, the one finished on another worker count too
    assert set(history(uri, run_id, "train_images").values()) == {STEPS * 64}
    # live step metrics: the steps trained again after each restore are not logged again, none is missing
    assert sorted(history(uri, run_id, "train_loss_step")) == list(range(5, 2 * STEPS + 1, 5))
    registered = snapshot(run_dir)
    assert registered["latest_checkpoint_result"]["metrics"]["step"] == 2 * STEPS  # as many steps as uninterrupted
    # keep-best-k ranks epoch checkpoints only: a mid-epoch one is kept only while it is the latest
    kept = [r["metrics"] for r in registered["checkpoint_results"]]
    assert len(kept) == 2 and not any(m.get("mid_epoch") for m in kept), kept
