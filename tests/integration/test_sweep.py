"""Sweeps on a real local Ray: a tiny ASHA sweep tracked as MLflow parent + children on the authenticated
tracking server with its trials in S3, --resume after the driver is killed, and a PBT exploit that continues
from the donor's checkpoint."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow

from tests.support import JOB, ROOT, TINY, VITLAB, store_overrides, tiny_job
from vitlab.tune.space import load_space


def tiny(tmp_path, digits_dir, *extra):
    """The tiny job's overrides for the command line, one worker per trial."""
    return [*TINY, f"data.path={digits_dir}", *store_overrides(tmp_path, "tiny"), "scaling.num_workers=1", *extra]


def write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_tiny_asha_sweep_through_the_tracking_server_with_trials_in_s3(ray_session, tracking_server, digits_dir,
                                                                     tmp_path, s3):
    """A tiny ASHA sweep as a cluster runs one: the MLflow parent and children on the authenticated tracking
    server, the trials' checkpoints and best.yaml in S3."""
    from vitlab.config import JobConfig
    from vitlab.train import storage
    from vitlab.tune.sweep import run_sweep

    space = write(tmp_path, """
metric: val_top1
mode: max
num_samples: 1   # x the grid's 4 values, run in this order: the good rates set the rungs' cutoffs first
max_concurrent_trials: 2
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
params:
  optim.lr: {grid: [3.0e-3, 4.0e-3, 1.0e-5, 2.0e-5]}
""")
    base = tiny_job(tmp_path, digits_dir, "tiny", "scaling.num_workers=1", "train.epochs=4",
                    f"tracking.uri={tracking_server.uri}", "run.storage_path=s3://vitlab/asha")
    spec = load_space(space)
    report = run_sweep(base, spec, str(space))
    trials = report["trials"]
    assert len(trials) == 4
    assert report["trial_epochs_fifo"] == 16
    assert report["trial_epochs_total"] == sum(t["epochs_run"] for t in trials) < 16  # ASHA stopped some early
    assert any(t["status"] == "stopped_early" for t in trials)
    assert report["best_val_top1"] == max(t["val_top1"] for t in trials)
    assert report["best_config"] == "s3://vitlab/asha/tiny-space/best.yaml"
    best_cfg = JobConfig.from_yaml(storage.read_bytes(report["best_config"]).decode(), "best.yaml")
    assert best_cfg.optim.lr == trials[0]["params"]["optim.lr"]  # `vitlab train best.yaml` runs it unchanged
    assert any(k.endswith("/state.pt") for k in s3.keys("asha/tiny-space/trials/"))

    client = mlflow.MlflowClient(tracking_server.uri)
    assert report["tracking_uri"] == tracking_server.uri
    parent = client.get_run(report["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["space"]) == spec.params
    assert "best_val_top1" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials_curves.png", "parallel_coordinates.png", "best.yaml"} <= arts
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    statuses = sorted(c.data.tags.get("vitlab.trial_status", "") for c in children)
    assert "stopped_early" in statuses and "completed" in statuses
    for child in children:
        assert child.data.params["optim.lr"] in {"1e-05", "2e-05", "0.003", "0.004"}
        assert client.get_metric_history(child.info.run_id, "val_top1")
        assert tracking_server.admin_password not in str(child.data.params) + str(child.data.tags)
    assert tracking_server.admin_password not in str(parent.data.params) + str(parent.data.tags)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == tracking_server.admin_password


def _last_epoch_registered(s3, prefix: str, done: dict) -> int:
    """The highest epoch registered by a Train run of the sweep other than the finished trials' (read from Ray
    Train's checkpoint_manager_snapshot.json in S3)."""
    import boto3

    from tests.support.s3server import BUCKET, _boto_credentials

    client = boto3.client("s3", endpoint_url=s3.url, **_boto_credentials())
    epochs = [0]
    for key in s3.keys(prefix):
        run = key[len(prefix):].split("/")[0]
        if key.endswith("/checkpoint_manager_snapshot.json") and run not in done:
            snapshot = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            epochs.append(int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {})
                              .get("epoch", 0)))
    return max(epochs)


def _children(uri, parent_name):
    """The sweep's child runs (by trial run name) once its parent run exists."""
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"attributes.run_name = '{parent_name}'")
    if not parents:
        return {}
    runs = client.search_runs([parents[0].info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return {r.info.run_name: r for r in runs}


def test_resume_after_killing_the_driver(ray_session, digits_dir, tmp_path, s3):
    """SIGKILL the sweep driver once a trial has finished and the next one's Train run has registered its last
    epoch, which Tune hears of only after (the trial function forwards it): --resume then finishes the sweep
    without training the finished trial again, and the other one, restored with no epoch left, still ends as
    completed with its last epoch's metrics. The sweep keeps its state and checkpoints in S3, as on a cluster."""
    space = write(tmp_path, """
metric: val_top1
mode: max
num_samples: 1   # x the grid's 3 values
max_concurrent_trials: 1
scheduler: {name: fifo}
params:
  optim.lr: {grid: [1.0e-3, 2.0e-3, 3.0e-3]}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [VITLAB, "sweep", str(JOB), str(space), *tiny(tmp_path, digits_dir, "train.epochs=3",
                                                         "run.storage_path=s3://vitlab/sweep-kill")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finished_before: dict[str, int] = {}
    try:
        deadline = time.time() + 420
        while time.time() < deadline and driver.poll() is None:
            children = _children(uri, "tiny-space")
            done = {n: r for n, r in children.items() if r.info.status == "FINISHED"}
            running = [r for r in children.values() if r.info.status == "RUNNING"]
            if done and running and _last_epoch_registered(s3, "sweep-kill/tiny-space/trials/", done) == 3:
                finished_before = {n: r.info.end_time for n, r in done.items()}
                break
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    first_log = (tmp_path / "first.log").read_text()
    assert finished_before, f"no finished trial with a running one after it: {first_log[-3000:]}"

    out = tmp_path / "resumed.json"
    proc = subprocess.run([*cmd, "--resume", "--output-json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [t["status"] for t in report["trials"]] == ["completed"] * 3
    assert "restored from latest checkpoint of this run" in proc.stdout + proc.stderr
    # the driver's status: a line per finished trial and the table after it; none of Tune's own banners
    assert re.search(r"trial \w+ completed: val_top1 0\.\d+", proc.stdout), proc.stdout[-3000:]
    assert re.search(r"sweep tiny-space: 3 of 3 trials done \(3 completed, 0 stopped early, 0 errored\), 0 running; "
                     r"best val_top1 0\.\d+ \(trial \w+: optim\.lr=0\.00\d\)", proc.stdout), proc.stdout[-3000:]
    assert "Configuration for experiment" not in proc.stdout + proc.stderr
    children = _children(uri, "tiny-space")
    assert len(children) == 3
    for name, end_time in finished_before.items():
        assert children[name].info.end_time == end_time, f"{name} was trained again"
    client = mlflow.MlflowClient(uri)
    for run in children.values():  # every epoch logged exactly once, across the kill
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1"))
        assert steps == [1, 2, 3], (run.info.run_name, steps)
    keys = s3.keys("sweep-kill/tiny-space/trials/")
    train_runs = {k.split("/trials/")[1].split("/")[0] for k in keys if "/checkpoint_" in k}  # Train run dirs
    assert len(train_runs) == 3 and not any("_g" in name for name in train_runs), train_runs  # no spurious _gN


def test_pbt_exploit_continues_from_the_donor_checkpoint(ray_session, digits_dir, tmp_path):
    """The worse trial restarts from the better trial's checkpoint: its new Train run begins where the
    donor's checkpoint ended (epoch and optimizer step), not at epoch 1."""
    import torch

    from vitlab.train.state import load_state
    from vitlab.tune.sweep import run_sweep

    space = write(tmp_path, """
metric: val_top1
mode: max
num_samples: 1   # x the grid's 2 values
max_concurrent_trials: 2
scheduler:
  name: pbt
  perturbation_interval: 2   # one exploit, at epoch 2: a Train run per trial fewer than an interval of 1
  quantile_fraction: 0.5
  resample_probability: 0.0
  synch: true
  hyperparam_mutations:
    optim.lr: {choice: [1.0e-7, 3.0e-3]}
params:
  optim.lr: {grid: [1.0e-7, 3.0e-3]}
""")
    base = tiny_job(tmp_path, digits_dir, "pbt", "scaling.num_workers=1", "train.epochs=3")
    report = run_sweep(base, load_space(space), str(space))
    trials_dir = Path(report["sweep_dir"]) / "trials"
    exploited = sorted(trials_dir.glob("*_g*"))
    assert exploited, f"no trial exploited a donor: {sorted(p.name for p in trials_dir.iterdir())}"
    steps_per_epoch = 1437 // 64  # digits train rows // batch, one worker
    for run in exploited:
        first = min(run.glob("checkpoint_*"))
        state = load_state(first)
        assert state["epoch"] >= 2, f"{run.name} started from scratch (epoch {state['epoch']})"
        assert state["step"] == state["epoch"] * steps_per_epoch
        assert isinstance(state["model"], dict) and all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert {t["epochs_run"] for t in report["trials"]} <= {3}
    assert len({t["id"] for t in report["trials"]}) == 2, report["trials"]  # each row names its own trial
    assert not (trials_dir / "pbt_donors").exists()  # the donors' copies go at the sweep's end


def test_ctrl_c_marks_the_parent_run_killed(ray_session, digits_dir, tmp_path):
    """Ctrl-C (SIGINT) of a sweep's driver: Tune saves its state, the command exits 130, and the parent MLflow
    run is KILLED, not left RUNNING."""
    space = write(tmp_path, "metric: val_top1\nmode: max\nnum_samples: 1\nmax_concurrent_trials: 1\n"
                            "params:\n  optim.lr: {grid: [1.0e-3, 2.0e-3]}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [VITLAB, "sweep", str(JOB), str(space), *tiny(tmp_path, digits_dir, "train.epochs=20")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and driver.poll() is None:
                if any("val_top1" in r.data.metrics for r in _children(uri, "tiny-space").values()):
                    break
                time.sleep(1.0)
            driver.send_signal(signal.SIGINT)
            code = driver.wait(timeout=180)
        finally:
            if driver.poll() is None:
                driver.kill()
    text = (tmp_path / "driver.log").read_text()
    assert code == 130 and "interrupted" in text, text[-3000:]
    client = mlflow.MlflowClient(uri)
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="attributes.run_name = 'tiny-space'")[0]
    assert parent.info.status == "KILLED"
