"""What a person watches: a quiet terminal with progress lines (the rest in the run's log file), a sweep's status
lines, live step metrics exactly once, the manifest as MLflow dataset inputs, Ray Data's iterator numbers,
profiles; and the MLflow UI over a real training and sweep, in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.support import JOB, ROOT, TINY, VITLAB, browser, store_overrides
from vitlab.data.manifest import load_manifest
from vitlab.train.steplog import StepLogger

# Lines of Ray's and MLflow's own that a quiet terminal never shows (they are in the log file).
CHATTER = ("(RayTrainWorker", "(TrainController", "(SplitCoordinator", "Setting up process group",
           "Checkpoint successfully created", "Reporting training result", "Started a local Ray instance",
           "Execution plan of Dataset", "system_metrics_monitor", "Token authentication", "RayDeprecationWarning")
TIMED_LINE = re.compile(r"^\d\d:\d\d:\d\d ")


def _vitlab(ray_session, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    return subprocess.run([VITLAB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


SPACE = """metric: val_top1
mode: max
num_samples: 1
max_concurrent_trials: 1
scheduler: {name: fifo}
params:
  optim.lr: {grid: [1.0e-3, 3.0e-3]}
"""
EPOCHS = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("watch")


@pytest.fixture(scope="module")
def cli_run(ray_session, digits_dir, store):
    proc = _vitlab(ray_session, "train", str(JOB), *TINY, f"data.path={digits_dir}", *store_overrides(store, "watched"),
                   f"train.epochs={EPOCHS}", "train.log_every_seconds=0.5", "train.log_every_steps=2",
                   "train.profile_steps=[2, 4]", "--output-json", str(store / "out.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((store / "out.json").read_text()), store


@pytest.fixture(scope="module")
def cli_sweep(ray_session, digits_dir, store, cli_run):
    """Two one-worker trials in the training's MLflow store (the same experiment)."""
    (store / "space.yaml").write_text(SPACE)
    proc = _vitlab(ray_session, "sweep", str(JOB), str(store / "space.yaml"), *TINY, f"data.path={digits_dir}",
                   *store_overrides(store, "swept"), f"train.epochs={EPOCHS}", "scaling.num_workers=1",
                   "--output-json", str(store / "sweep.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((store / "sweep.json").read_text())


def test_terminal_shows_vitlab_lines_only(cli_run):
    proc, outcome, store = cli_run
    terminal = proc.stdout + proc.stderr
    for chatter in CHATTER:
        assert chatter not in terminal, (chatter, terminal[-3000:])
    # no warning and no error: stderr holds at most the raylet's notices (Ray's, about its worker processes)
    assert all("(raylet)" in line for line in proc.stderr.strip().splitlines()), proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out[-1] == f"full log: {store / 'runs' / 'watched' / 'vitlab.log'}"
    log_lines = [line for line in out if TIMED_LINE.match(line)]  # vitlab's own lines, time-stamped
    assert out[:len(log_lines)] == log_lines, out  # then the summary
    progress = [line for line in log_lines if re.search(r"epoch \d/2 step \d+/\d+: \d+ img/s, data wait \d+%, "
                                                         r"loss \d\.\d{4}, lr \S+, ETA epoch \S+, run \S+$", line)]
    assert progress, terminal[-3000:]
    assert any("epoch 2/2: train loss" in line for line in log_lines)
    assert "val top-1" in proc.stdout and "best model:" in proc.stdout
    text = (store / "runs" / "watched" / "vitlab.log").read_text()
    for chatter in ("Setting up process group", "MLflow run", "(RayTrainWorker"):
        assert chatter in text, chatter  # what the terminal did not show is in the file


def test_manifest_is_the_runs_dataset_input(cli_run, digits_dir):
    _, outcome, _ = cli_run
    run = mlflow.MlflowClient(outcome["tracking_uri"]).get_run(outcome["mlflow_run_id"])
    found = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    manifest = load_manifest(digits_dir)
    assert set(found) == {"training", "validation"}
    assert {d.digest for d in found.values()} == {manifest.sha256[:36]}
    assert json.loads(found["training"].profile)["rows"] == manifest.rows("train")
    assert json.loads(found["validation"].profile)["rows"] == manifest.rows("val")


def test_iterator_stats_profile_and_live_steps_in_mlflow(cli_run):
    _, outcome, _ = cli_run
    client = mlflow.MlflowClient(outcome["tracking_uri"])
    run_id = outcome["mlflow_run_id"]
    for key in ("data_blocked_s", "data_user_s", "data_batches", "data_wait"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key
    batches = [m.value for m in client.get_metric_history(run_id, "data_batches")]
    assert all(b >= 1 for b in batches)  # this epoch's batches, not the iterator's running total
    artifacts = {a.path for a in client.list_artifacts(run_id, "profile")}
    assert artifacts == {"profile/steps_2-3.trace.json", "profile/steps_2-3.top_ops.txt"}
    table = client.download_artifacts(run_id, "profile/steps_2-3.top_ops.txt")
    assert "Self CPU" in Path(table).read_text()
    trace = json.loads(Path(client.download_artifacts(run_id, "profile/steps_2-3.trace.json")).read_text())
    assert trace["traceEvents"]  # Chrome-trace JSON, as Perfetto opens it
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss_step"))
    assert steps and steps == list(range(2, steps[-1] + 1, 2))  # every 2nd step, each once


def test_prepare_is_quiet_and_verbose_shows_everything(ray_session, tmp_path):
    quiet = _vitlab(ray_session, "data", "prepare", "digits", "--out", str(tmp_path / "q"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert re.search(r"prepare: 1797/1797 files \(100%\), \d+ files/s, 0 rejected, ETA 0:00", quiet.stdout)
    assert "Execution plan" not in quiet.stderr + quiet.stdout and "(raylet)" not in quiet.stderr
    log_file = quiet.stdout.strip().splitlines()[-1].removeprefix("full log: ")
    assert "connected to Ray" in Path(log_file).read_text()
    loud = _vitlab(ray_session, "-v", "data", "prepare", "digits", "--out", str(tmp_path / "v"))
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "ray.data" in loud.stderr or "Execution plan" in loud.stderr + loud.stdout, loud.stderr[-3000:]


def test_step_metrics_after_a_restore_are_logged_once(tmp_path):
    """A restore sends training back to its checkpoint: the steps trained again are skipped, the curve has
    each step once (the watermark is the run's last logged step)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("steps")).info.run_id
    first = StepLogger(uri, run_id, system_metrics=False, flush_every_s=0.1)
    for step in range(1, 11):
        first.add({"train_loss_step": 1.0 / step, "lr_step": 0.1}, step)
    first.close()
    # restored at step 6; the steps come before the logger has connected and read the watermark
    again = StepLogger(uri, run_id, system_metrics=False, flush_every_s=0.1)
    for step in range(7, 15):
        again.add({"train_loss_step": 2.0, "lr_step": 0.1}, step)
    assert again.watermark() == 10
    again.close()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss_step"))
    assert [s for s, _ in history] == list(range(1, 15))
    assert dict(history)[8] == pytest.approx(1 / 8) and dict(history)[12] == 2.0  # first training's value kept


def test_sweep_prints_its_status(cli_sweep):
    proc, report = cli_sweep
    for chatter in (*CHATTER, "Configuration for experiment", "View detailed results", "tensorboard"):
        assert chatter not in proc.stdout + proc.stderr, (chatter, proc.stderr[-3000:])
    out = proc.stdout
    assert re.search(r"sweep swept-space: 2 trials, 1 at a time, scheduler fifo", out), out
    finished = re.findall(r"trial (\w+) completed: val_top1 0\.\d+ \(best 0\.\d+\)", out)
    assert sorted(finished) == sorted(t["id"] for t in report["trials"]), out
    assert re.search(r"sweep swept-space: 1 of 2 trials done \(1 completed, 0 stopped early, 0 errored\), "
                     r"\d running; best val_top1 0\.\d+ \(trial \w+: optim\.lr=0\.00\d\)", out), out
    assert re.search(r"sweep swept-space: 2 of 2 trials done \(2 completed, 0 stopped early, 0 errored\), "
                     r"0 running; best val_top1 0\.\d+ \(trial \w+: optim\.lr=0\.00\d\)", out), out
    assert re.search(r"trial \w+: epoch 2/2: train loss", out)  # each trial's lines say whose they are


ML = "workflowType=machine_learning"  # else /experiments/<id> opens MLflow's GenAI overview, with no runs table


@pytest.mark.skipif(browser.missing() is not None, reason=f"browser UI test: {browser.missing()}")
def test_mlflow_ui_in_a_real_browser(cli_run, cli_sweep, digits_dir, store):
    """`mlflow ui` over the store of the training and the sweep above, pages loaded in headless Chromium."""
    _, outcome, _ = cli_run
    _, report = cli_sweep
    client = mlflow.MlflowClient(outcome["tracking_uri"])
    run = client.get_run(outcome["mlflow_run_id"])
    exp = run.info.experiment_id
    parent = report["mlflow_parent_run_id"]
    trials = [r.info.run_id for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")]
    assert len(trials) == 2
    shots = store / "shots"
    with browser.mlflow_ui(outcome["tracking_uri"], (store / "mlartifacts").as_uri()) as base, \
            browser.headless_chromium() as driver:
        runs_page = f"{base}/#/experiments/{exp}/runs"
        run_page = f"{runs_page}/{run.info.run_id}"

        # the experiment page lists the training and the sweep's parent; the trials are nested under it
        browser.open_page(driver, f"{runs_page}?{ML}", "watched")
        browser.close_assistant(driver)
        rows = browser.wait_until(driver, lambda d: (r := browser.grid_rows(d)).keys() >= {run.info.run_id, parent}
                                  and r, what="the training and sweep rows")
        assert rows[run.info.run_id]["name"] == "watched" and rows[parent]["name"] == "swept-space"
        assert rows[parent]["expandable"] and not set(trials) & set(rows)
        # the Dataset column shows the manifest's train split: "<dir>/train (<digest>)", context Training
        dataset = browser.wait_until(driver, lambda d: next((text for col, text in browser.grid_rows(d)[
            run.info.run_id]["cells"].items() if "Dataset" in col and text != "-"), None), what="the Dataset cell")
        assert dataset.startswith(f"{Path(digits_dir).name}/train (") and "Training" in dataset, dataset
        browser.screenshot(driver, shots / "experiment.png")
        assert browser.expand_run(driver, parent)
        rows = browser.wait_until(driver, lambda d: (r := browser.grid_rows(d)).keys() >= set(trials) and r,
                                  what="the trial rows under the sweep")
        assert sorted(rows[t]["index"] for t in trials) == [rows[parent]["index"] + 1, rows[parent]["index"] + 2]
        assert all(rows[t]["name_x"] > rows[parent]["name_x"] for t in trials), "trials not indented"
        browser.screenshot(driver, shots / "experiment_sweep.png")

        # Model metrics: a val_top1 chart with one point per epoch
        browser.open_page(driver, f"{run_page}/model-metrics?{ML}", "data_wait")  # a card per metric, A to Z
        traces = browser.wait_until(driver, lambda d: browser.find_chart(d, "val_top1"), what="the val_top1 chart")
        assert browser.active_tab(driver) == "Model metrics"
        assert any(t["points"] == EPOCHS and t["x"] == list(range(1, EPOCHS + 1)) for t in traces), traces
        browser.screenshot(driver, shots / "run_metrics.png")

        # Artifacts: the plots. MLflow 3 keeps the logged model apart from the run's files: the run's Overview
        # links it, and its own Artifacts tab lists MLmodel and the weights.
        browser.open_page(driver, f"{run_page}/artifacts?{ML}", "curves.png")
        names = browser.wait_until(driver, lambda d: {"curves.png", "confusion.png", "config.yaml"} <= set(
            n := browser.artifact_names(d)) and n, what="the run's artifacts")
        assert browser.active_tab(driver) == "Artifacts" and "profile" in names
        browser.screenshot(driver, shots / "run_artifacts.png")
        browser.open_page(driver, f"{run_page}?{ML}", "Logged models")
        model_href = browser.wait_until(driver, lambda d: d.execute_script(
            "const a = Array.from(document.querySelectorAll('a[href*=\"/models/m-\"]'))"
            ".find(a => a.innerText.trim() === 'model'); return a && a.getAttribute('href')"), what="the model link")
        browser.open_page(driver, f"{base}/{model_href}/artifacts?{ML}", "MLmodel")
        files = browser.wait_until(driver, browser.artifact_names, what="the model's files")
        assert {"MLmodel", "data"} <= set(files), files
