"""An MLflow tracking server as a cluster runs it: `mlflow server` on 127.0.0.1 with basic-auth on, a sqlite
backend and proxied artifacts in S3 (the clients hold no S3 credentials of their own for it): credentials
refused or missing, a server that cannot be reached. Train, export and register go through it with
MLFLOW_TRACKING_USERNAME/PASSWORD in test_s3.py (the cluster's training: data and checkpoints in S3 too), and a
sweep in test_sweep.py (the ASHA sweep)."""

import base64
import urllib.error
import urllib.request

from tests.support.cli import assert_one_line_error, run_cli
from tests.support.raycluster import free_ports


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
