"""Ray Tune callbacks (they run on the sweep's driver): the sweep's MLflow parent run and its trials' ends, and
the status lines the driver prints."""

from __future__ import annotations

import logging

import mlflow
from ray.tune import Callback

from vitlab import tracking
from vitlab.progress import Ticker

log = logging.getLogger("vitlab.tune.sweep")


def ended_as(epochs_done: int, epochs: int) -> str:
    """How a finished trial ended: "completed" (all epochs) or "stopped_early" (by the scheduler)."""
    return "completed" if epochs_done >= epochs else "stopped_early"


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
        status = ended_as(epochs, self.epochs)
        client.set_tag(child, "vitlab.trial_status", status)
        if status == "stopped_early":
            client.set_terminated(child, status="KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        client, child = self._child(trial)
        if child is not None:
            client.set_tag(child, "vitlab.trial_status", "errored")
            client.set_terminated(child, status="FAILED")


class SweepStatusCallback(Callback):
    """The sweep's progress on the driver: a line when a trial ends, and every ``every_s`` a compact table:
    trials done of the total (completed, stopped early, errored), running, and the best so far with its values."""

    def __init__(self, name: str, metric: str, mode: str, epochs: int, params: list[str], total: int,
                 every_s: float = 30.0):
        self.name, self.metric, self.mode, self.epochs, self.params = name, metric, mode, epochs, params
        self.total = total  # the sweep's trials (a searcher creates them one by one: Tune does not list them all)
        self.ticker = Ticker(every_s)

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.ticker.due():
            log.info("%s", self.table(trials))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0))
        how = "completed" if ended_as(epochs, self.epochs) == "completed" else f"stopped early after {epochs} epochs"
        best = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
        log.info("trial %s %s: %s %s (best %s)", trial.trial_id, how, self.metric, _value(result.get(self.metric)),
                 _value(best))
        log.info("%s", self.table(trials, ending=(trial, "TERMINATED")))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning("trial %s errored", trial.trial_id)
        log.info("%s", self.table(trials, ending=(trial, "ERROR")))

    def table(self, trials, ending=None) -> str:
        """``ending``: (trial, its final status) when Tune calls back before setting that status."""
        counts = {"running": 0, "completed": 0, "stopped_early": 0, "errored": 0}
        best = None
        for t in trials:
            status = ending[1] if ending is not None and t is ending[0] else t.status
            if status == "RUNNING":
                counts["running"] += 1
            elif status == "ERROR":
                counts["errored"] += 1
            elif status == "TERMINATED":
                counts[ended_as(int((t.last_result or {}).get("epoch", 0)), self.epochs)] += 1
            value = (t.metric_analysis.get(self.metric) or {}).get(self.mode)
            if value is not None and (best is None or (value > best[0] if self.mode == "max" else value < best[0])):
                best = (value, t)
        done = counts["completed"] + counts["stopped_early"] + counts["errored"]
        head = (f"sweep {self.name}: {done} of {self.total} trials done ({counts['completed']} completed, "
                f"{counts['stopped_early']} stopped early, {counts['errored']} errored), {counts['running']} running")
        if best is None:
            return head + "; no result yet"
        values = ", ".join(f"{k}={_value(best[1].config.get(k))}" for k in self.params if k in best[1].config)
        return f"{head}; best {self.metric} {_value(best[0])} (trial {best[1].trial_id}: {values})"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
