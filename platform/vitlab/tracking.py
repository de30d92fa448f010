"""MLflow: where every run is recorded and where people look.

The driver creates (or, on resume, finds) the run before training starts, so an unreachable server fails
fast and the run id is known. Epoch metrics are logged from the Train controller (train/callbacks.py), the
per-step curve and system metrics by rank 0 of the workers (train/steplog.py), the artifacts by the driver.
mlflow is imported inside the functions: the CLI and preflight import this module without paying for it.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitlab import __version__
from vitlab.config import JobConfig
from vitlab.data.manifest import Manifest
from vitlab.errors import UserError
from vitlab.redact import redact, redact_all
from vitlab.train.storage import first_line, run_dir

log = logging.getLogger(__name__)

RUN_KEY_TAG = "vitlab.run_key"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# While training runs, a call to a server that is down gives up after ~2 s, not MLflow's default of minutes
# (7 retries with exponential backoff): the epoch waits in the outbox instead of holding up training.
QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


MODEL_URI_SCHEMES = ("runs:/", "models:/")  # an MLflow model: runs:/<id>/model, models:/<name>@<alias>


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(MODEL_URI_SCHEMES)


def resolve_tracking_uri(uri: str | None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute: Train workers do not share the driver's working directory
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return str(Path(uri).resolve())  # a file store directory
    return uri


def default_artifact_location(uri: str) -> str | None:
    """For a local sqlite store, artifacts live beside the database file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    return None


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer, or refuses this process's credentials, is a one-line error
    before anything starts: /health (open), then one authenticated read, as every later call will be."""
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    for path, authenticated in (("/health", False), ("/api/2.0/mlflow/experiments/search?max_results=1", True)):
        request = urllib.request.Request(base + path)
        header = _auth_header() if authenticated else None
        if header:
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise UserError(f"tracking.uri {redact(uri)}: the MLflow server refused the credentials (HTTP "
                                f"{e.code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                "MLFLOW_TRACKING_TOKEN)") from None
            raise UserError(f"tracking.uri {redact(uri)}: MLflow server answered HTTP {e.code} on "
                            f"{path.split('?')[0]}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"tracking.uri {redact(uri)}: MLflow tracking server unreachable ({reason})") from None


def _auth_header() -> str | None:
    """The Authorization header MLflow's client sends: a bearer token, else basic credentials, else none."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return f"Bearer {token}"
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


def experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(uri))
    except Exception:  # created concurrently by another process (sweep trials)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_info(cwd: str | None = None) -> dict[str, str]:
    """Commit and dirty flag of the code being run, when it is a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.SubprocessError):
        return {}


def ray_job_id() -> str | None:
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("VITLAB_RAY_JOB_ID")


def run_tags(cfg: JobConfig, manifest: Manifest) -> dict[str, str]:
    """The tags of a training or sweep run: code version and commit, dataset, run directory, Ray job."""
    tags = {
        "vitlab.version": __version__,
        "manifest.sha256": manifest.sha256,
        "manifest.path": f"{manifest.root}/manifest.json",
        "run_dir": run_dir(cfg),
        **git_info(),
    }
    job_id = ray_job_id()
    if job_id:
        tags["ray.job_id"] = job_id
    return tags


def start_run(
    uri: str, experiment: str, run_key: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
    parent_run_id: str | None = None, resume: bool = True, inputs: Manifest | None = None,
) -> tuple[str, bool]:
    """Continue the newest run tagged ``run_key`` when ``resume`` (a resumed training or sweep), else create
    a new one, with the splits of the manifest ``inputs`` as its dataset inputs. Returns (run_id, resumed).
    Credentials in URIs among the values are recorded as ***."""
    import mlflow
    from mlflow.entities import Param, RunTag

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)
    run_key, tags = redact(run_key), redact_all(tags)
    run_id = find_run(client, exp_id, run_key) if resume else None
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_KEY_TAG: run_key, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's per-call limit
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("vitlab.resumed", "false")])
    if inputs is not None:
        from vitlab.lineage import log_manifest_inputs

        log_manifest_inputs(client, run.info.run_id, inputs)
    return run.info.run_id, False


def find_run(client, experiment_id: str, run_key: str) -> str | None:
    """The newest run of the experiment tagged with ``run_key`` (a run directory, a sweep trial)."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{redact(run_key)}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def _param_value(v: Any) -> str:
    s = "None" if v is None else redact(str(v))
    return s if len(s) <= 6000 else s[:5997] + "..."


def log_metrics(client, run_id: str, items: list[tuple[str, float, int]]) -> None:
    """(key, value, step) triples in batches of MLflow's per-call limit."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, s) for k, v, s in items]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def count_in_tag(uri: str, run_id: str, key: str) -> int:
    """Add one to the run's counter tag ``key`` (absent: 0) and return the new count."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    count = int(client.get_run(run_id).data.tags.get(key, "0")) + 1
    client.set_tag(run_id, key, str(count))
    return count


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a tracking server that is down (or a store that cannot be written) raises through the client."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


@contextlib.contextmanager
def quick_retries() -> Iterator[None]:
    """QUICK_RETRIES for the calls inside (MLflow reads them on every request); a user's own settings win."""
    added = {k: v for k, v in QUICK_RETRIES.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def metric_histories(uri: str, run_id: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) rows per metric key, in step order."""
    return {key: metric_history(uri, run_id, key) for key in keys}


def log_artifacts(uri: str, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)


def log_torch_model(uri: str, run_id: str, model, input_example) -> str:
    """Log the best model with mlflow.pytorch (with an input example); returns the model URI."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=input_example,
            # given, so MLflow does not load the model in a subprocess to infer them (about 13 s a run here,
            # and the inferred list lacks timm, which unpickling the model needs)
            pip_requirements=[*mlflow.pytorch.get_default_pip_requirements(), *pinned("timm", "numpy")],
        )
    return getattr(info, "model_uri", f"runs:/{run_id}/model")


def pinned(*names: str) -> list[str]:
    """``name==version`` of each installed package: a logged model's requirements."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def quiet_mlflow() -> None:
    """No artifact-download progress bars from the CLI's one-shot commands (export, register, predict)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def log_onnx_model(uri: str | None, run_id: str, onnx_path: Path, classes_json: Path, parity: dict[str, Any]) -> str:
    """Log an exported ONNX model (MLflow's onnx flavor, classes.json beside it) and its parity to the run it
    was exported from; returns the model URI."""
    import mlflow
    import onnx

    uri = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="onnx", save_as_external_data=False, extra_files=[str(classes_json)],
            # given, so MLflow does not load the model in a subprocess to infer them
            pip_requirements=pinned("onnx", "onnxruntime"),
        )
        mlflow.log_metric("onnx_parity_max_abs_diff", parity["max"])
    # start_run(run_id) ends the run FINISHED: keep the status training left it in
    client.set_terminated(run_id, status=status if status in ("FINISHED", "FAILED", "KILLED") else "FINISHED")
    return getattr(info, "model_uri", f"runs:/{run_id}/onnx")


def register_model(uri: str | None, run_id: str, name: str, alias: str | None = None) -> dict[str, Any]:
    """Register the run's logged model (``runs:/<id>/model``) under ``name``, optionally with an alias."""
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    check_tracking(uri)  # unreachable or refused: one line, not a "not found"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not name.strip():
        raise UserError("--name: expected a registered model name")
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id}: not found in the MLflow store {uri}") from None
    source = f"runs:/{run_id}/model"
    try:
        info = mlflow.models.get_model_info(source)
    except (MlflowException, OSError):
        raise UserError(f"run {run_id}: no logged model 'model' (runs of 'vitlab train' log one at the end)") from None
    try:
        # MLflow 3 keeps logged models outside the run's artifacts: register the logged model itself
        version = mlflow.register_model(f"models:/{info.model_id}" if info.model_id else source, name)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as e:
        raise UserError(f"registering {source} as '{name}': {e.message.splitlines()[0]}") from None
    return {
        "name": name, "version": int(version.version), "alias": alias, "run_id": run_id, "source": source,
        "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}", "tracking_uri": uri,
    }


def end_run(uri: str, run_id: str, status: str) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def end_run_quietly(uri: str, run_id: str, status: str) -> None:
    """Mark the MLflow run ended, on the way out of a command: a tracking failure here is a warning, never what
    the command reports."""
    try:
        with quick_retries():
            end_run(uri, run_id, status)
    except unreachable_errors() as e:
        log.warning("MLflow run %s not marked %s (%s)", run_id, status, redact(first_line(e)))
