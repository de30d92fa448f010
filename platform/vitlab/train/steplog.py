"""Rank 0's live step curves in MLflow: ``train_loss_step`` and ``lr_step`` as training makes them.

A background thread sends them in batches, so a step never waits on the tracking server; while the server is
down they wait here (bounded) and go with the next batch that gets through.

Exactly once: a restore sends training back to its checkpoint, and the steps after it are trained again. The
logger starts at the run's last logged step (its watermark) and skips every step at or below it, so each step
appears once in the curve: the value from its first training. (MLflow cannot replace a logged point.)
"""

from __future__ import annotations

import logging
import threading

from vitlab.redact import redact
from vitlab.tracking import log_metrics, quick_retries, unreachable_errors
from vitlab.train.storage import first_line

log = logging.getLogger(__name__)

WATERMARK_KEY = "train_loss_step"
MAX_WAITING = 100_000  # points kept while the server is down; the oldest go first


class StepLogger:
    """Step metrics to the MLflow run from a background thread, every ``flush_every_s``; MLflow's system
    metrics beside them."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool, flush_every_s: float = 5.0):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.logged_through = self._watermark()
        self.pending: list[tuple[str, float, int]] = []
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one batch on its way at a time: a flush returns once all are sent
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="vitlab-step-metrics", daemon=True)
        self._thread.start()
        self._sys = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sys = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
                self._sys.start()
            except Exception as e:  # system metrics are a nicety; never fail training over them
                log.warning("MLflow system metrics unavailable: %s", e)
                self._sys = None

    def _watermark(self) -> int:
        """The run's last logged step of the curve (-1 for none): steps up to it were sent by an earlier start."""
        try:
            with quick_retries():
                return max((m.step for m in self.client.get_metric_history(self.run_id, WATERMARK_KEY)),
                           default=-1)
        except unreachable_errors() as e:
            # Unknown: log every step. At worst a redone step appears twice; training never waits for this.
            log.warning("MLflow unreachable (%s): step metrics after a restore may repeat steps",
                        redact(first_line(e)))
            return -1

    def add(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return  # trained again after a restore: already in the curve
        with self._lock:
            self.pending.extend((k, float(v), step) for k, v in metrics.items())
            del self.pending[:-MAX_WAITING]

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            self.flush()

    def before_checkpoint(self) -> None:
        """Send what waits, before a checkpoint is reported: a restore from that checkpoint does not train
        the steps up to it again, so points of them still in memory when this process dies would be lost.
        Skipped while the server is down (training never waits on an outage)."""
        if not self._warned:
            self.flush()

    def flush(self) -> None:
        with self._sending:
            with self._lock:
                batch, self.pending = self.pending, []
            if not batch:
                return
            try:
                with quick_retries():
                    log_metrics(self.client, self.run_id, batch)
            except unreachable_errors() as e:
                with self._lock:
                    self.pending = (batch + self.pending)[-MAX_WAITING:]
                if not self._warned:
                    log.warning("MLflow unreachable (%s): step metrics wait and are sent when it answers",
                                redact(first_line(e)))
                    self._warned = True
                return
            self._warned = False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.flush()
        if self._sys is not None:
            self._sys.finish()
