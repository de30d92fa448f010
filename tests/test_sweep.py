"""Sweeps: search-space parsing and its errors, and a tiny ASHA sweep tracked as MLflow parent + children."""

import json
import subprocess
from pathlib import Path

import mlflow
import pytest

from helpers import VITLAB
from vitlab.config import load_job
from vitlab.errors import ConfigError
from vitlab.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]


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
num_samples: 4
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
params:
  optim.lr: {choice: [1.0e-5, 2.0e-5, 3.0e-3, 4.0e-3]}
""")
    base = load_job(ROOT / "jobs" / "digits_vit.yaml", [
        f"data.path={digits_dir}", "data.image_size=16", "model.kwargs.embed_dim=32", "model.kwargs.depth=1",
        "model.kwargs.num_heads=2", "train.epochs=4", "train.batch_size=64", "scaling.num_workers=1",
        "optim.warmup_epochs=0", "tracking.system_metrics=false", f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "run.name=tiny"])
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
