"""Sweeps: search-space parsing and its errors, and a tiny ASHA sweep tracked as MLflow parent + children."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from helpers import VITLAB
from vitlab.config import load_job
from vitlab.errors import ConfigError
from vitlab.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "digits_vit.yaml"


def tiny(tmp_path, digits_dir, *extra):
    """Overrides of jobs/digits_vit.yaml for a trial of a few seconds an epoch."""
    return [f"data.path={digits_dir}", "data.image_size=16", "model.kwargs.embed_dim=32", "model.kwargs.depth=1",
            "model.kwargs.num_heads=2", "train.batch_size=64", "scaling.num_workers=1", "optim.warmup_epochs=0",
            "tracking.system_metrics=false", f"run.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "run.name=tiny", *extra]


def write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_spaces_parse():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        spec = load_space(path)
        assert spec.params and spec.metric == "val_top1"
    pbt = load_space(ROOT / "search_spaces" / "digits_pbt.yaml")
    assert pbt.scheduler["name"] == "pbt" and "optim.lr" in pbt.scheduler["hyperparam_mutations"]


@pytest.mark.parametrize("text, message", [
    ("params:\n  optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n", r"optim\.lrr.*did you mean optim\.lr"),
    ("params:\n  optim.lr: {logunifrm: [1.0e-4, 1.0e-2]}\n", r"unknown distribution 'logunifrm'.*loguniform"),
    ("params:\n  optim.lr: {uniform: [1.0]}\n", r"uniform expects a list of 2 numbers"),
    ("params:\n  optim.lr: {loguniform: [0.0, 1.0]}\n", r"positive bounds"),
    ("params:\n  optim.lr: {uniform: [0.5, 0.1]}\n", r"low < high"),
    ("params:\n  model.kwargs.depth: {choice: []}\n", r"non-empty list"),
    ("scheduler: {name: asha2}\nparams:\n  optim.lr: {choice: [0.1]}\n", r"scheduler\.name.*asha"),
    ("mode: up\nparams:\n  optim.lr: {choice: [0.1]}\n", r"mode: expected max or min"),
    ("metrik: val_top1\nparams:\n  optim.lr: {choice: [0.1]}\n", r"unknown key 'metrik'.*metric"),
    ("search: {name: random, include_bse: true}\nparams:\n  optim.lr: {choice: [0.1]}\n", r"search\.include_bse"),
    ("search: {name: random, include_base: true}\nparams:\n  optim.lr: {grid: [0.1, 0.2]}\n", r"not with a grid"),
    ("scheduler: {name: pbt, hyperparam_mutations: {optim.lrx: {uniform: [0.1, 0.2]}}}\n"
     "params:\n  optim.lr: {choice: [0.1]}\n", r"optim\.lrx"),
])
def test_space_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, text))


def test_trial_values_are_checked_against_the_schema(tmp_path):
    from vitlab.tune.sweep import check_trial_values

    spec = load_space(write(tmp_path, "params:\n  train.epochs: {choice: [2, 'many']}\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        check_trial_values(load_job(None), spec)


def test_include_base_tries_the_job_values_first(tmp_path):
    from vitlab.tune.sweep import _search_alg

    spec = load_space(write(tmp_path, "search: {name: random, include_base: true}\nparams:\n"
                                      "  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                                      "  model.kwargs.depth: {choice: [2, 4]}\n"))
    base = load_job(JOB)
    alg = _search_alg(spec, base, concurrency=1)
    assert alg._points_to_evaluate == [{"optim.lr": base.optim.lr, "model.kwargs.depth": base.model.kwargs["depth"]}]
    assert alg.max_concurrent == 1  # Tune leaves a BasicVariantGenerator instance unlimited otherwise


def test_cli_misspelt_key_exit_2(tmp_path):
    space = write(tmp_path, "params:\n  optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    proc = subprocess.run([VITLAB, "sweep", "jobs/digits_vit.yaml", str(space)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr and proc.stderr.count("\n") == 1


def test_tiny_asha_sweep_with_mlflow_parent_and_children(ray_session, digits_dir, tmp_path):
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
    base = load_job(JOB, tiny(tmp_path, digits_dir, "train.epochs=4"))
    spec = load_space(space)
    report = run_sweep(base, spec, str(space))
    trials = report["trials"]
    assert len(trials) == 4
    assert report["trial_epochs_fifo"] == 16
    assert report["trial_epochs_total"] == sum(t["epochs_run"] for t in trials) < 16  # ASHA stopped some early
    assert any(t["status"] == "stopped_early" for t in trials)
    assert report["best_val_top1"] == max(t["val_top1"] for t in trials)
    best = Path(report["best_config"])
    assert best.is_file()
    best_cfg = load_job(best)  # `vitlab train best.yaml` runs it unchanged
    assert best_cfg.optim.lr == trials[0]["params"]["optim.lr"]

    client = mlflow.MlflowClient(report["tracking_uri"])
    parent = client.get_run(report["mlflow_parent_run_id"])
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


def test_resume_after_killing_the_driver(ray_session, digits_dir, tmp_path):
    """SIGKILL the sweep driver once a trial has finished and the next one has a checkpoint; --resume then
    finishes the sweep without training the finished trial again, and the unfinished one continues."""
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
    cmd = [VITLAB, "sweep", str(JOB), str(space), *tiny(tmp_path, digits_dir, "train.epochs=3")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finished_before: dict[str, int] = {}
    try:
        deadline = time.time() + 420
        while time.time() < deadline and driver.poll() is None:
            children = _children(uri, "tiny-space")
            done = {n: r for n, r in children.items() if r.info.status == "FINISHED"}
            running = [r for r in children.values() if r.info.status == "RUNNING"
                       and "val_top1" in r.data.metrics]
            if done and running:
                finished_before = {n: r.info.end_time for n, r in done.items()}
                break
            time.sleep(1.0)
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
    children = _children(uri, "tiny-space")
    assert len(children) == 3
    for name, end_time in finished_before.items():
        assert children[name].info.end_time == end_time, f"{name} was trained again"
    client = mlflow.MlflowClient(uri)
    for run in children.values():  # every epoch logged exactly once, across the kill
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1"))
        assert steps == [1, 2, 3], (run.info.run_name, steps)


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
  perturbation_interval: 1
  quantile_fraction: 0.5
  resample_probability: 0.0
  synch: true
  hyperparam_mutations:
    optim.lr: {choice: [1.0e-7, 3.0e-3]}
params:
  optim.lr: {grid: [1.0e-7, 3.0e-3]}
""")
    base = load_job(JOB, tiny(tmp_path, digits_dir, "train.epochs=3", "run.name=pbt"))
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
