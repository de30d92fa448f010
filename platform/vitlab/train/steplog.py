"""Rank 0's live step curves in MLflow: ``train_loss_step`` and ``lr_step`` as training makes them.

A background thread sends them in batches, so a step never waits on the tracking server; while the server is
down they wait here (bounded) and go with the next batch that gets through.

Exactly once: a restore sends training back to its checkpoint, and the steps after it are trained again. The
logger starts at the run's last logged step (its watermark) and skips every step at or below it, so each step
appears once in the curve: the value from its first training. (MLflow cannot replace a logged point.)

Connecting (importing MLflow, opening the store, reading the watermark) happens on the background thread too,
so no worker waits for it at the first epoch's barrier (about 2 s here). Steps added before the watermark is
known wait, and those at or below it are dropped when it is.
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
CONNECT_WAIT_S = 60.0  # the longest a checkpoint waits for the connection (the watermark has quick retries)


class StepLogger:
    """Step metrics to the MLflow run from a background thread, every ``flush_every_s``; MLflow's system
    metrics beside them."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool, flush_every_s: float = 5.0):
        self.uri, self.run_id, self.system_metrics = uri, run_id, system_metrics
        self.flush_every_s = flush_every_s
        self.client = None
        self.logged_through: int | None = None  # the watermark, once the background thread has read it
        self.pending: list[tuple[str, float, int]] = []
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one batch on its way at a time: a flush returns once all are sent
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._warned = False
        self._sys = None
        self._thread = threading.Thread(target=self._run, name="vitlab-step-metrics", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.uri)
        watermark = self._watermark(client)
        with self._lock:  # from here on, flushes send: only steps above the watermark
            self.logged_through = watermark
            self.pending = [p for p in self.pending if p[2] > watermark]
            self.client = client
        if self.system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sys = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
                self._sys.start()
            except Exception as e:  # system metrics are a nicety; never fail training over them
                log.warning("MLflow system metrics unavailable: %s", e)
                self._sys = None

    def watermark(self, timeout: float = CONNECT_WAIT_S) -> int | None:
        """The run's last logged step before this start (-1 for none), once connected; None if not yet."""
        self._connected.wait(timeout)
        return self.logged_through

    def _watermark(self, client) -> int:
        """The run's last logged step of the curve (-1 for none): steps up to it were sent by an earlier start."""
        try:
            with quick_retries():
                return max((m.step for m in client.get_metric_history(self.run_id, WATERMARK_KEY)),
                           default=-1)
        except unreachable_errors() as e:
            # Unknown: log every step. At worst a redone step appears twice; training never waits for this.
            log.warning("MLflow unreachable (%s): step metrics after a restore may repeat steps",
                        redact(first_line(e)))
            return -1

    def add(self, metrics: dict[str, float], step: int) -> None:
        with self._lock:
            if self.logged_through is not None and step <= self.logged_through:
                return  # trained again after a restore: already in the curve
            self.pending.extend((k, float(v), step) for k, v in metrics.items())
            del self.pending[:-MAX_WAITING]

    def _run(self) -> None:
        try:
            self._connect()
        except Exception as e:  # no step curve, but training goes on (the epoch metrics have their own path)
            log.warning("step metrics off: no MLflow client (%s)", redact(first_line(e)))
            return
        finally:
            self._connected.set()
        while not self._stop.wait(self.flush_every_s):
            self.flush()

    def before_checkpoint(self) -> None:
        """Send what waits, before a checkpoint is reported: a restore from that checkpoint does not train
        the steps up to it again, so points of them still in memory when this process dies would be lost.
        Skipped while the server is down (training never waits on an outage)."""
        self._connected.wait(CONNECT_WAIT_S)  # the first checkpoint may come before the thread has connected
        if not self._warned:
            self.flush()

    def flush(self) -> None:
        if self.client is None:  # not connected yet (the thread sends them once it is), or it failed
            return
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
        self._thread.join(timeout=30)  # a connection under way finishes first: what waits is then sent
        self.flush()
        if self._sys is not None:
            self._sys.finish()
