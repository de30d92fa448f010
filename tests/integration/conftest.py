"""One real local Ray for the integration tier, and the digits shards prepared once."""

from __future__ import annotations

import os

import pytest

from tests.support import prepare_digits


@pytest.fixture(scope="session", autouse=True)
def empty_mlflow_db(tmp_path_factory):
    """The store every test's sqlite MLflow store starts as (tests.support.store_overrides copies it)."""
    import mlflow

    import tests.support as support

    path = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # runs MLflow's migrations once
    support.EMPTY_MLFLOW_DB = path
    yield path
    support.EMPTY_MLFLOW_DB = None


@pytest.fixture(scope="session")
def s3():
    """The session's S3 server on 127.0.0.1 with bucket s3://vitlab; its variables are set before Ray starts
    (ray_session depends on this), so Train workers and Ray Data tasks reach it too."""
    from tests.support.s3server import S3Server, point_at

    server = S3Server().start()
    point_at(server)
    server.create_bucket()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tracking_server(s3, tmp_path_factory):
    """The session's `mlflow server` as cluster.yaml runs it: basic-auth on (admin, a generated password),
    sqlite, artifacts proxied to s3://vitlab/mlflow-artifacts. Its credentials are in the environment before
    Ray starts (ray_session depends on this), as cluster.yaml puts them on every node; stores that need none
    ignore them."""
    import secrets

    from tests.support.mlflowserver import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), artifacts="s3://vitlab/mlflow-artifacts",
                          admin_password=secrets.token_urlsafe(16))
    server.start()
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=server.admin_password)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3, tracking_server):
    import ray
    from ray.data import DataContext

    from vitlab.cluster import start_local

    if not ray.is_initialized():
        start_local(num_cpus=2)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(ray_session, tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory, "digits")
