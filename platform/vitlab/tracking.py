"""MLflow: where every run is recorded and where people look.

The driver creates (or, on resume, finds) the run before training starts, so an unreachable server fails
fast and the run id is known. Epoch metrics are logged by a Ray Train callback in the Train controller
(`EpochMetricsCallback`): it sees each report after its checkpoint is registered and before anything else
hears of it (a sweep's scheduler, which may stop the trial at once), buffers epochs until a checkpoint
covers them and logs each epoch at most once, so an epoch redone after a failure is never logged twice.
Rank 0 of the Train workers logs the per-step curve and system metrics; the driver adds the artifacts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vitlab.errors import UserError

log = logging.getLogger(__name__)

RUN_KEY_TAG = "vitlab.run_key"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


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
    """An unreachable tracking server is a one-line error before training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status >= 400:
                raise UserError(f"tracking.uri {uri}: MLflow server answered HTTP {resp.status} on /health")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"tracking.uri {uri}: MLflow tracking server unreachable ({reason})") from None


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


def start_run(
    uri: str, experiment: str, run_key: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
    parent_run_id: str | None = None, resume: bool = True,
) -> tuple[str, bool]:
    """Continue the newest run tagged ``run_key`` when ``resume`` (a resumed training or sweep), else create
    a new one. Returns (run_id, resumed)."""
    import mlflow
    from mlflow.entities import Param, RunTag

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1,
                               order_by=["attributes.start_time DESC"]) if resume else []
    if found:
        run_id = found[0].info.run_id
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
    return run.info.run_id, False


def _param_value(v: Any) -> str:
    s = "None" if v is None else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


EPOCH_PROBE = "val_top1"  # every epoch report carries it; its history says which epochs a run already has
NOT_LOGGED = ("epoch", "step")


def _log_metrics(client, run_id: str, items: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, s) for k, v, s in items]
    for i in range(0, len(metrics), 1000):  # MLflow's per-call limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


class EpochMetricsCallback:
    """Ray Train callback (runs in the Train controller): rank 0's epoch metrics -> the MLflow run.

    Epochs reported without a checkpoint wait until one covers them (a failure before that sends training
    back, and the epoch is trained again); epochs the run already holds are skipped (a resumed run).
    """

    def __new__(cls, *args, **kwargs):
        from ray.train.v2.api.callback import UserCallback

        class _Impl(UserCallback):
            def __init__(self, uri: str, run_id: str):
                self.uri, self.run_id = uri, run_id
                self.pending: list[tuple[int, dict[str, float]]] = []

            def after_report(self, run_context, metrics, checkpoint):
                rank0 = metrics[0]
                self.pending.append((int(rank0["epoch"]), {k: float(v) for k, v in rank0.items()
                                                          if k not in NOT_LOGGED and isinstance(v, (int, float))}))
                if checkpoint is not None:
                    self.flush()

            def after_exception(self, run_context, worker_exceptions):
                self.pending.clear()  # training goes back to the last checkpoint: these epochs are redone

            def flush(self) -> None:
                import mlflow

                client = mlflow.MlflowClient(tracking_uri=self.uri)
                have = {m.step for m in client.get_metric_history(self.run_id, EPOCH_PROBE)}
                items = [(k, v, epoch) for epoch, values in self.pending if epoch not in have
                         for k, v in values.items()]
                _log_metrics(client, self.run_id, items)
                self.pending.clear()

        return _Impl(*args, **kwargs)


class StepLogger:
    """Rank 0's MLflow logger inside a Train worker: per-step curves (buffered until the epoch is
    checkpointed) and MLflow system metrics."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.pending: list[tuple[str, float, int]] = []
        self._sys = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sys = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
                self._sys.start()
            except Exception as e:  # system metrics are a nicety; never fail training over them
                log.warning("MLflow system metrics unavailable: %s", e)
                self._sys = None

    def add(self, metrics: dict[str, float], step: int) -> None:
        self.pending.extend((k, float(v), step) for k, v in metrics.items())

    def flush(self) -> None:
        _log_metrics(self.client, self.run_id, self.pending)
        self.pending.clear()

    def close(self) -> None:
        if self._sys is not None:
            self._sys.finish()


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def learning_curves_png(uri: str, run_id: str, out: Path) -> Path:
    """Loss and accuracy per epoch, train and val, from the run's own metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (
        ("train_loss", ax_loss, "train loss"),
        ("val_loss", ax_loss, "val loss"),
        ("train_top1", ax_acc, "train top-1"),
        ("val_top1", ax_acc, "val top-1"),
        ("val_top5", ax_acc, "val top-5"),
    ):
        hist = metric_history(uri, run_id, key)
        if hist:
            ax.plot([s for s, _ in hist], [v for _, v in hist], marker="o", label=label)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def confusion_png(matrix, classes: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(classes)
    size = min(20, 3 + n * 0.35)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (val, best checkpoint)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
        info = mlflow.pytorch.log_model(model, name="model", input_example=input_example)
    return getattr(info, "model_uri", f"runs:/{run_id}/model")


def quiet_mlflow() -> None:
    """No artifact-download progress bars from the CLI's one-shot commands (export, register, predict)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def log_onnx_model(uri: str | None, run_id: str, onnx_path: Path, classes_json: Path, parity: dict[str, Any]) -> str:
    """Log an exported ONNX model (MLflow's onnx flavor, classes.json beside it) and its parity to the run it
    was exported from; returns the model URI."""
    import mlflow
    import onnx
    import onnxruntime

    uri = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="onnx", save_as_external_data=False, extra_files=[str(classes_json)],
            # given, so MLflow does not load the model in a subprocess to infer them
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
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


def temp_artifact_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vitlab-artifacts-"))
