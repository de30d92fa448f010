"""What both test tiers share: paths, the one tiny job, small real datasets, a CLI runner, real Ray clusters."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from vitlab.config import JobConfig, load_job

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "digits_vit.yaml"
BIN = Path(sys.executable).parent  # the virtualenv running the tests
VITLAB = str(BIN / "vitlab")

# The one tiny model: jobs/digits_vit.yaml shrunk to 16-px images and a one-block ViT, seconds per epoch.
TINY = ["data.image_size=16", "data.scale=[0.8, 1.0]", "model.kwargs.patch_size=4", "model.kwargs.embed_dim=32",
        "model.kwargs.depth=1", "model.kwargs.num_heads=2", "train.batch_size=64", "optim.lr=2e-3",
        "optim.warmup_epochs=0", "optim.label_smoothing=0.0", "tracking.system_metrics=false"]


# A migrated, empty MLflow sqlite store, made once by the integration tier's session (tests/integration/conftest.py).
# MLflow builds a new store by running every schema migration, about 2 s of CPU on the path of each test's first
# MLflow call; a copy of this one takes milliseconds and is the same store.
EMPTY_MLFLOW_DB: Path | None = None


def store_overrides(store: Path, name: str) -> list[str]:
    """Run name, checkpoints and the MLflow sqlite store of a test run, all under ``store`` (a copy of
    EMPTY_MLFLOW_DB there, when the session made one and the store has none yet)."""
    db = store / "mlflow.db"
    if EMPTY_MLFLOW_DB is not None and not db.exists():
        store.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EMPTY_MLFLOW_DB, db)
    return [f"run.name={name}", f"run.storage_path={store / 'runs'}", f"tracking.uri=sqlite:///{db}"]


def tiny_job(store: Path, data: str, name: str, *overrides: str) -> JobConfig:
    """jobs/digits_vit.yaml with the tiny model on ``data``, its outputs under ``store``; ``overrides`` last."""
    return load_job(JOB, [*TINY, f"data.path={data}", *store_overrides(store, name), *overrides])


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a daemon thread; the dict gets its 'value' or its 'error' (a test's assertions see it)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def mlflow_run(uri: str, experiment: str, run_name: str):
    """The newest MLflow run of that name in the experiment, or None."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"]) if exp else []
    return runs[0] if runs else None


def logged_epochs(uri: str, experiment: str, run_name: str) -> list[int]:
    """The epochs whose val_top1 the run holds in MLflow (sorted; [] before the run exists)."""
    import mlflow

    run = mlflow_run(uri, experiment, run_name)
    if run is None:
        return []
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_top1"))


def prepare_digits(tmp_path_factory, folder: str) -> str:
    """scikit-learn's digits prepared into shards under a session temp folder (each tier's fixture, once)."""
    from vitlab.data.prepare import prepare

    out = tmp_path_factory.mktemp(folder) / "shards"
    prepare("digits", str(out))
    return str(out)
