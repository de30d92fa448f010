"""Ray Tune callbacks (they run on the sweep's driver): the sweep's MLflow parent run and its trials' ends."""

from __future__ import annotations

import mlflow
from ray.tune import Callback

from vitlab import tracking


def trial_key(sweep_dir: str, trial_id: str) -> str:
    """The MLflow run key of a trial: its Train runs' directory prefix, whatever generation (PBT) is running."""
    return f"{sweep_dir}/trials/{trial_id}"


class ParentRunCallback(Callback):
    """Best-so-far metric on the parent run; each child run's final status (completed, stopped_early,
    errored) as the tag vitlab.trial_status."""

    def __init__(self, uri: str, parent_run_id: str, metric: str, mode: str, epochs: int, sweep_dir: str):
        self.uri, self.parent, self.metric, self.mode = uri, parent_run_id, metric, mode
        self.epochs, self.sweep_dir = epochs, sweep_dir
        self.best: float | None = None
        self.results = 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if value is None:
            return
        self.results += 1
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
        mlflow.MlflowClient(self.uri).log_metric(self.parent, f"best_{self.metric}", self.best, step=self.results)

    def _child(self, trial) -> tuple[mlflow.MlflowClient, str | None]:
        client = mlflow.MlflowClient(self.uri)
        experiment = client.get_run(self.parent).info.experiment_id
        return client, tracking.find_run(client, experiment, trial_key(self.sweep_dir, trial.trial_id))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        client, child = self._child(trial)
        if child is None:
            return
        epochs = int((trial.last_result or {}).get("epoch", 0))
        status = "completed" if epochs >= self.epochs else "stopped_early"
        client.set_tag(child, "vitlab.trial_status", status)
        if status == "stopped_early":
            client.set_terminated(child, status="KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        client, child = self._child(trial)
        if child is not None:
            client.set_tag(child, "vitlab.trial_status", "errored")
            client.set_terminated(child, status="FAILED")
