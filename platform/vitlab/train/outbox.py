"""Epoch metrics on their way to MLflow, kept durable so that an outage of the tracking server costs no epoch.

Tracking is best-effort while training runs. Every checkpointed epoch is first written to OUTBOX_FILE beside
the run's checkpoints, then sent; what was sent is removed. While the server is down (past a few quick
retries), epochs wait there and training goes on; they are sent, each exactly once (an epoch MLflow already
has is skipped), at the next checkpoint, at the end of the run, or by the next ``vitlab train`` of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging

from vitlab import tracking
from vitlab.redact import redact
from vitlab.train import storage

log = logging.getLogger(__name__)

OUTBOX_FILE = "mlflow_outbox.json"
EPOCH_PROBE = "val_top1"  # every epoch report carries it; its history says which epochs a run already has
Epochs = list[tuple[int, dict[str, float]]]


class Outbox:
    """OUTBOX_FILE of one run directory (a path or a URI): the epochs not yet confirmed in MLflow."""

    def __init__(self, run_dir: str):
        self.location = storage.join(run_dir, OUTBOX_FILE)

    def load(self) -> Epochs:
        if not storage.exists(self.location):
            return []
        return [(int(epoch), values) for epoch, values in json.loads(storage.read_bytes(self.location))]

    def save(self, epochs: Epochs) -> None:
        storage.write_text(self.location, json.dumps(epochs))

    def clear(self) -> None:
        fs, path = storage.filesystem(self.location)
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)


def send(uri: str, run_id: str, epochs: Epochs) -> None:
    """Log the epochs' metrics at their epoch as step, skipping every epoch the run already holds."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    have = {m.step for m in client.get_metric_history(run_id, EPOCH_PROBE)}
    items = [(k, v, epoch) for epoch, values in epochs if epoch not in have for k, v in values.items()]
    tracking.log_metrics(client, run_id, items)


def deliver(uri: str, run_id: str, outbox: Outbox, new: Epochs = ()) -> list[int]:
    """Send what waits in the outbox and ``new`` (written to the outbox first). Returns the epochs still
    waiting: [] when everything reached MLflow."""
    waiting = dict(outbox.load())
    if new:
        waiting.update(new)
        outbox.save(sorted(waiting.items()))
    if not waiting:
        return []
    try:
        with tracking.quick_retries():
            send(uri, run_id, sorted(waiting.items()))
    except tracking.unreachable_errors() as e:
        log.warning("MLflow at %s unreachable (%s): epochs %s wait in %s and are sent when it answers",
                    redact(uri), redact(storage.first_line(e)), format_epochs(waiting), outbox.location)
        return sorted(waiting)
    outbox.clear()
    return []


def format_epochs(epochs) -> str:
    """'1-3, 5' for epochs 1, 2, 3 and 5."""
    nums = sorted(epochs)
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
