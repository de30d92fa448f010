"""An MLflow tracking server as a cluster runs it: `mlflow server` on 127.0.0.1 with basic-auth on, a sqlite
backend and proxied artifacts in S3 (the clients hold no S3 credentials of their own for it). Train, export
and register go through it here with MLFLOW_TRACKING_USERNAME/PASSWORD, and a sweep in test_sweep.py (the ASHA
sweep)."""

import base64
import urllib.error
import urllib.request

import mlflow
import pytest
import torch

from tests.support import tiny_job as job
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.raycluster import free_ports
from vitlab.deploy.bundle import load_bundle
from vitlab.train.run import train


def status(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_requests_without_or_with_wrong_credentials_get_401(tracking_server):
    search = f"{tracking_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(search) == 401
    assert status(search, "admin", "not-the-password") == 401
    assert status(search, "admin", tracking_server.admin_password) == 200


def test_wrong_password_is_one_line_before_training(tracking_server, digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    ran = run_cli("train", *job_args(tmp_path, digits_dir, tracking_server.uri))
    assert_one_line_error(ran, "refused the credentials (HTTP 401")
    assert "not-the-password" not in ran.stderr and not (tmp_path / "runs").exists()


def test_a_server_that_cannot_be_reached_is_unreachable(digits_dir, tmp_path):
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert_one_line_error(run_cli("train", *job_args(tmp_path, digits_dir, closed)), "unreachable")
    assert_one_line_error(run_cli("export", "runs:/0123456789abcdef/model", "--out", tmp_path / "x",
                                  "--tracking-uri", closed), "unreachable")


def job_args(tmp_path, digits_dir, uri) -> list:
    from tests.support import JOB, TINY

    return [JOB, *TINY, f"data.path={digits_dir}", f"run.storage_path={tmp_path / 'runs'}", f"tracking.uri={uri}",
            "run.name=authjob"]


@pytest.fixture(scope="module")
def trained(ray_session, tracking_server, digits_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("authtrain")
    return train(job(store, digits_dir, "through_server", "train.epochs=2", f"tracking.uri={tracking_server.uri}"))


def test_train_logs_through_the_server_and_artifacts_land_in_the_bucket(trained, tracking_server, s3):
    client = mlflow.MlflowClient(tracking_server.uri)
    run = client.get_run(trained.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert [m.step for m in client.get_metric_history(trained.mlflow_run_id, "val_top1")] == [1, 2]
    keys = s3.keys(f"mlflow-artifacts/{run.info.experiment_id}/")
    names = {k.rsplit("/", 1)[1] for k in keys if f"/{trained.mlflow_run_id}/" in k}
    assert {"config.yaml", "manifest.json", "curves.png"} <= names, names
    model = mlflow.pytorch.load_model(f"runs:/{trained.mlflow_run_id}/model")  # MLflow 3: a logged model
    assert any(k.endswith("/MLmodel") for k in keys) and model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    assert tracking_server.admin_password not in str(run.data.params) + str(run.data.tags)


def test_register_and_export_through_the_server(trained, tracking_server, tmp_path):
    ran = run_cli("register", trained.mlflow_run_id, "--name", "digits-auth", "--alias", "champion",
                  "--tracking-uri", tracking_server.uri)
    assert ran.returncode == 0, ran.stderr
    bundle = load_bundle("models:/digits-auth@champion", tracking_server.uri)
    assert bundle.run_id == trained.mlflow_run_id and bundle.model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    ran = run_cli("export", "models:/digits-auth@champion", "--out", tmp_path / "onnx",
                  "--tracking-uri", tracking_server.uri)
    assert ran.returncode == 0 and (tmp_path / "onnx" / "model.onnx").is_file(), ran.stderr
