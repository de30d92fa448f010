"""Ray Train callbacks: they run in the Train controller and see every ``ray.train.report`` of rank 0 after
its checkpoint is registered, before anything else hears of it (a sweep's scheduler, which may stop the
trial at once).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train.v2.api.callback import UserCallback

from vitlab import logs, tracking
from vitlab.redact import redact
from vitlab.train import storage
from vitlab.train.outbox import Outbox, deliver

log = logging.getLogger("vitlab.train")

PREEMPTION_NOTICE = "preemption_notice"  # in the metrics of a just-in-time checkpoint's report
NOT_LOGGED = ("epoch", "step", PREEMPTION_NOTICE)  # the step of every metric, and a flag to count
PREEMPTIONS_TAG = "vitlab.preemptions"  # how many preemption notices the run answered


def epoch_row(metrics: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """An epoch's report as the MLflow row it becomes: the epoch (the step) and its numeric metrics."""
    return int(metrics["epoch"]), {k: float(v) for k, v in metrics.items()
                                   if k not in NOT_LOGGED and isinstance(v, (int, float))}


class EpochMetricsCallback(UserCallback):
    """Rank 0's epoch metrics -> the MLflow run, each epoch exactly once, through the run's outbox.

    Epochs reported without a checkpoint wait until one covers them (a failure before that sends training
    back, and the epoch is trained again); epochs the run already holds are skipped (a resumed run). While
    the tracking server is down, checkpointed epochs wait in the outbox beside the checkpoints, and training
    goes on.
    """

    def __init__(self, uri: str, run_id: str, run_dir: str):
        self.uri, self.run_id, self.outbox = uri, run_id, Outbox(run_dir)
        self.pending: list[tuple[int, dict[str, float]]] = []

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        logs.mark_worker_logging()  # in the controller: the outbox's warnings reach the terminal
        rank0 = metrics[0]
        if rank0.get(PREEMPTION_NOTICE):
            self._count_preemption()
        if rank0.get("mid_epoch"):  # no epoch row; its checkpoint covers the epochs before it
            if checkpoint is not None and self.pending:
                deliver(self.uri, self.run_id, self.outbox, self.pending)
                self.pending.clear()
            return
        self.pending.append(epoch_row(rank0))
        if checkpoint is not None:
            deliver(self.uri, self.run_id, self.outbox, self.pending)
            self.pending.clear()

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.pending.clear()  # training goes back to the last checkpoint: these epochs are redone

    def _count_preemption(self) -> None:
        """The run's ``vitlab.preemptions`` tag counts the preemption notices answered with a checkpoint."""
        try:
            with tracking.quick_retries():
                count = tracking.count_in_tag(self.uri, self.run_id, PREEMPTIONS_TAG)
        except tracking.unreachable_errors() as e:
            log.warning("MLflow unreachable: preemption not counted in the run's tags (%s)",
                        redact(storage.first_line(e)))
            return
        log.warning("preempted: just-in-time checkpoint taken (preemption %d of this run)", count)


class ForwardToQueue(UserCallback):
    """Puts (rank 0's metrics, checkpoint path or None) of every report on a Ray queue: how a sweep's trial
    function hears of its Train run's epochs."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics[0].get("mid_epoch"):
            return  # Tune hears of epochs only
        self.queue.put((dict(metrics[0]), checkpoint.path if checkpoint else None))
