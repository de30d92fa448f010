"""Ray jobs on a real head started with `ray start --head` (token authentication on, 127.0.0.1): `vitlab submit`
runs data preparation and training as jobs tracked in MLflow, plain `ray job submit --working-dir .` runs vitlab
too, `vitlab jobs` lists, shows and stops them, and a missing or wrong token is a one-line error (exit 2)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from tests.support import BIN, ROOT, TINY, VITLAB, in_thread
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.raycluster import start_head
from vitlab.train import storage

RAY = str(BIN / "ray")


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def job_id_of(stdout: str) -> str:
    m = re.search(r"submitted job (\S+) to ", stdout)
    assert m, stdout[-3000:]
    return m.group(1)


@pytest.fixture(scope="module")
def head(s3):
    """The head starts with the S3 server's variables in its environment, as cluster nodes have their bucket's
    credentials: jobs keep their data and checkpoints in s3://vitlab/jobs."""
    h = start_head(num_cpus=2)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def prepared(head, store):
    """Digits shards made by a job: `vitlab submit -- data prepare digits --out s3://...` (the README's flow)."""
    out = "s3://vitlab/jobs/digits"
    proc = run([VITLAB, "submit", "--address", head.url, "--", "data", "prepare", "digits", "--out", out],
               head.client_env())
    return out, proc


@pytest.mark.timeout(600)
def test_data_prepare_as_a_job(prepared):
    out, proc = prepared
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "prepared digits" in proc.stdout and proc.stdout.strip().splitlines()[-1].split()[2] == "SUCCEEDED"
    assert json.loads(storage.read_bytes(f"{out}/manifest.json"))["splits"]["train"]["rows"] == 1437


SHARED = "s3://vitlab/jobs/shared"  # the cluster's s3://BUCKET/vitlab


@pytest.fixture(scope="module")
def submitted(head, prepared, store):
    """A 2-epoch training submitted as a job: its run tracked in the module's store, its run dir in S3."""
    data, _ = prepared
    uri = f"sqlite:///{store / 'mlflow.db'}"
    proc = run([VITLAB, "submit", "--address", head.url, "--tracking-uri", uri, "--storage-path", SHARED,
                "--", "train", "jobs/digits_vit.yaml", "train.epochs=2", f"data.path={data}", "run.name=submitted",
                *TINY], head.client_env())
    return proc, uri


@pytest.mark.timeout(600)
def test_submit_train_succeeds_and_is_in_mlflow(submitted, head, s3):
    proc, uri = submitted
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    job_id = job_id_of(proc.stdout)
    assert f"dashboard: {head.url}/#/jobs/{job_id}" in proc.stdout
    assert "val top-1" in proc.stdout  # the job's own summary, streamed
    assert proc.stdout.strip().splitlines()[-1].startswith(f"job {job_id} SUCCEEDED after ")

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`ray.job_id` = '{job_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_top1"))
    assert steps == [1, 2]
    assert runs[0].data.params["train.epochs"] == "2"
    # relative run.storage_path ("runs") went under VITLAB_STORAGE_PATH, as on a cluster with S3
    assert runs[0].data.tags["run_dir"] == f"{SHARED}/runs/submitted"
    assert any("/checkpoint_" in k for k in s3.keys("jobs/shared/runs/submitted/"))


@pytest.mark.timeout(600)
def test_submit_batch_predict_writes_the_val_split_s_predictions_to_s3(submitted, head, prepared, s3):
    """`vitlab submit -- predict MODEL DATA --out s3://...`: Ray Data on the cluster, the Parquet in the bucket,
    and the top-1 of the run's best model on its val split equal to that run's best val_top1."""
    (trained, uri), (data, _) = submitted, prepared
    assert trained.returncode == 0, trained.stdout[-3000:]
    out = "s3://vitlab/jobs/predictions"
    proc = run([VITLAB, "submit", "--address", head.url, "--", "predict", f"{SHARED}/runs/submitted/best_model.pt",
                data, "--out", out, "--top-k", "3"], head.client_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"job {job_id_of(proc.stdout)} SUCCEEDED after ")
    printed = re.search(r"top-1 [\d.]+ \((\d+)/360 of the val split\)", proc.stdout)
    assert printed, proc.stdout[-3000:]
    correct = int(printed.group(1))

    client = mlflow.MlflowClient(uri)
    run_id = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.mlflow.runName = 'submitted'")[0].info.run_id
    best = max(m.value for m in client.get_metric_history(run_id, "val_top1"))
    assert correct / 360 == best  # exactly: the same rows, decode and weights as the run's eval

    marker = json.loads(storage.read_bytes(f"{out}/_vitlab_predictions.json"))
    assert (marker["rows"], marker["predicted"], marker["correct"]) == (360, 360, correct)
    fs, root = storage.filesystem(out)
    table = pq.read_table([f"{root}/{f}" for f in marker["files"]], filesystem=fs)
    assert table.num_rows == 360 and len(set(table.column("key").to_pylist())) == 360
    assert sum(table.column("correct").to_pylist()) == correct
    assert {f"jobs/predictions/{f}" for f in marker["files"]} <= set(s3.keys("jobs/predictions/"))


@pytest.mark.timeout(600)
def test_failed_job_exits_1(head):
    proc = run([VITLAB, "submit", "--address", head.url, "--", "train", "jobs/digits_vit.yaml",
                "data.path=/nonexistent/shards"], head.client_env())
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "manifest.json" in proc.stdout  # the job's own one-line error, streamed
    assert re.search(r"job \S+ FAILED after \d+s: Job entrypoint command failed with exit code 2$",
                     proc.stdout.strip().splitlines()[-1])
    # --no-wait returns at once; `vitlab jobs logs --follow` then waits and reports the same way
    quick = run([VITLAB, "submit", "--no-wait", "--address", head.url, "--", "train", "jobs/digits_vit.yaml",
                 "data.path=/nonexistent/shards"], head.client_env())
    assert quick.returncode == 0 and "vitlab jobs logs" in quick.stdout, quick.stdout + quick.stderr
    follow = run([VITLAB, "jobs", "logs", job_id_of(quick.stdout), "--follow", "--address", head.url],
                 head.client_env())
    assert follow.returncode == 1 and "manifest.json" in follow.stdout and "FAILED" in follow.stdout


@pytest.mark.timeout(600)
def test_plain_ray_job_submit_and_jobs_commands(head, prepared, store):
    """`ray job submit --working-dir .` (the README's plain form) runs vitlab from the cluster's PATH with the
    repo as working dir, without .venv, .git or data; then `vitlab jobs` lists it, shows it and stops it."""
    data, _ = prepared
    env = head.client_env()
    check = "test ! -e .venv && test ! -e .git && test ! -e data && test ! -e mlflow.db"
    train = (f"vitlab train jobs/digits_vit.yaml train.epochs=50 data.path={data} run.name=plain "
             f"run.storage_path=s3://vitlab/jobs/plain_runs tracking.uri=sqlite:///{store / 'plain.db'} "
             + shlex.join(TINY))
    proc = run([RAY, "job", "submit", "--address", head.url, "--working-dir", ".", "--no-wait",
                "--submission-id", "plain-train-1", "--", "sh", "-c", f"{check} && {train}"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deadline = time.time() + 240
    logs = ""
    while time.time() < deadline and "epoch 1/50" not in logs:
        time.sleep(2)
        got = run([VITLAB, "jobs", "logs", "plain-train-1", "--address", head.url], env)
        assert got.returncode == 0, got.stderr
        logs = got.stdout
        status = run([VITLAB, "jobs", "status", "plain-train-1", "--address", head.url], env).stdout
        assert "FAILED" not in status, logs[-3000:]
    assert "epoch 1/50" in logs, logs[-3000:]  # vitlab is training inside the plain job

    listed = run([VITLAB, "jobs", "list", "--address", head.url], env)
    assert listed.returncode == 0 and re.search(r"plain-train-1\s+RUNNING", listed.stdout), listed.stdout
    stopped = run([VITLAB, "jobs", "stop", "plain-train-1", "--address", head.url], env, timeout=120)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "job plain-train-1 STOPPED", stopped.stdout
    follow = run([VITLAB, "jobs", "logs", "plain-train-1", "--follow", "--address", head.url], env)
    assert follow.returncode == 1 and "STOPPED" in follow.stdout.strip().splitlines()[-1]
    unknown = run([VITLAB, "jobs", "status", "no-such-job", "--address", head.url], env)
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr


@pytest.mark.timeout(300)
def test_token_from_each_standard_place(head, tmp_path):
    base = {k: v for k, v in head.client_env().items() if not k.startswith("RAY_AUTH")}
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(head.token + "\n")
    for extra in ({"RAY_AUTH_TOKEN": head.token},  # no RAY_AUTH_MODE needed: vitlab sends the token it finds
                  {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(head.token_file)},
                  {"HOME": str(home)}):
        proc = run([VITLAB, "jobs", "list", "--address", head.url], {**base, **extra})
        assert proc.returncode == 0, (extra, proc.stderr)
        assert proc.stdout.strip().endswith(f"jobs on {head.url}")


@pytest.mark.timeout(300)
def test_missing_or_refused_token_is_one_line_exit_2(head, tmp_path):
    base = {k: v for k, v in head.client_env().items() if not k.startswith("RAY_AUTH")}
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    cases = [
        ({"HOME": str(empty_home)}, "requires an authentication token and none was found"),
        ({"HOME": str(empty_home), "RAY_AUTH_MODE": "token"}, "requires an authentication token"),
        ({"RAY_AUTH_TOKEN": "0" * 64}, "refused the token from $RAY_AUTH_TOKEN"),
        ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, "cannot read the token file"),
    ]
    for extra, message in cases:
        proc = run([VITLAB, "jobs", "list", "--address", head.url], {**base, **extra})
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, \
            (extra, proc.stderr)
    # submit stops at the same check, before uploading anything
    proc = run([VITLAB, "submit", "--address", head.url, "--", "data", "prepare", "digits", "--out",
                str(tmp_path / "never")], {**base, "HOME": str(empty_home)})
    assert proc.returncode == 2 and "none was found" in proc.stderr and not (tmp_path / "never").exists()


@pytest.mark.timeout(300)
def test_following_a_job_when_the_head_goes_away_is_one_line(head, tmp_path, monkeypatch):
    """Last in this module: it stops the head. `jobs logs -f` waits UNREACHABLE_GRACE_S for a head that
    stopped answering, then says so in one line (exit 2), no traceback."""
    from vitlab import jobs

    env = head.client_env()
    long_job = [VITLAB, "submit", "--no-wait", "--address", head.url, "--", "data", "synth", "--out",
                str(tmp_path / "synth"), "--classes", "100", "--per-class", "500"]
    proc = run(long_job, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = job_id_of(proc.stdout)
    for key in [k for k in os.environ if k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    monkeypatch.setattr(jobs, "UNREACHABLE_GRACE_S", 3.0)
    thread, result = in_thread(lambda: run_cli("jobs", "logs", job_id, "--follow", "--address", head.url))
    time.sleep(3)
    head.stop()
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in result, result
    assert_one_line_error(result["value"], f"the Ray cluster at {head.url} stopped answering")
