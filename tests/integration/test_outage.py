"""A tracking-server outage during training, against a real `mlflow server` that is killed and started again:
no epoch is lost or logged twice, and a training that ends while the server is down exits 0 and says what
waits to be logged."""

import json
import time
from pathlib import Path

from tests.support import JOB, TINY, in_thread, logged_epochs, mlflow_run, store_overrides
from tests.support.cli import run_cli
from tests.support.mlflowserver import MlflowServer
from vitlab.config import load_job
from vitlab.train.outbox import OUTBOX_FILE
from vitlab.train.run import train


def _waiting(outbox: Path) -> list[int]:
    try:
        return [epoch for epoch, _ in json.loads(outbox.read_text())]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _wait(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_mlflow_outage_costs_no_epoch(ray_session, digits_dir, tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        # 1. down from epoch 2 for a while, back before the end: the outbox is sent at the next checkpoint
        overrides = [*TINY, f"data.path={digits_dir}", *store_overrides(tmp_path, "outage"),
                     f"tracking.uri={server.uri}"]
        cfg = load_job(JOB, [*overrides, "train.epochs=12"])
        experiment, outbox = cfg.tracking.experiment, Path(cfg.run.storage_path) / "outage" / OUTBOX_FILE
        thread, result = in_thread(lambda: train(cfg))
        _wait(lambda: logged_epochs(server.uri, experiment, "outage"), "epoch 1 in MLflow")
        server.stop()
        _wait(lambda: len(_waiting(outbox)) >= 2 or not thread.is_alive(), "two epochs in the outbox")
        server.start()
        thread.join(timeout=600)
        assert "error" not in result, result.get("error")
        outcome = result["value"]
        assert outcome.epochs == 12 and outcome.waiting_epochs == [] and not outbox.exists()
        assert logged_epochs(server.uri, experiment, "outage") == list(range(1, 13))  # each epoch exactly once
        assert mlflow_run(server.uri, experiment, "outage").info.status == "FINISHED"

        # 2. down from epoch 2 to the end: `vitlab train` exits 0 and names the waiting epochs; the same
        # command, once the server is back, logs them and ends the run
        late = [*TINY, f"data.path={digits_dir}", *store_overrides(tmp_path, "late"), f"tracking.uri={server.uri}",
                "train.epochs=4"]
        outbox = Path(cfg.run.storage_path) / "late" / OUTBOX_FILE
        thread, result = in_thread(lambda: run_cli("train", JOB, *late))
        _wait(lambda: logged_epochs(server.uri, experiment, "late"), "epoch 1 in MLflow")
        server.stop()
        thread.join(timeout=600)
        ran = result["value"]
        assert ran.returncode == 0, ran.stderr
        waiting = _waiting(outbox)
        assert waiting and waiting == list(range(waiting[0], 5)), waiting
        assert "MLflow unreachable: epochs" in ran.stdout and "wait in the run's outbox" in ran.stdout
        server.start()
        assert mlflow_run(server.uri, experiment, "late").info.status == "RUNNING"
        again = run_cli("train", JOB, *late)
        assert again.returncode == 0, again.stderr
        assert logged_epochs(server.uri, experiment, "late") == [1, 2, 3, 4] and not outbox.exists()
        assert mlflow_run(server.uri, experiment, "late").info.status == "FINISHED"
    finally:
        server.stop()
