"""What a sweep's trial reports to Tune as its checkpoint: a small file naming a Train checkpoint (its location,
the generation of the trial's Train run that wrote it, its epoch), not the model's bytes a second time."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from vitlab.train import storage

POINTER_FILE = "train_checkpoint.json"


def read(checkpoint) -> dict[str, Any] | None:
    """The pointer in a Tune checkpoint (None: no checkpoint, or not a pointer)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        f = Path(d) / POINTER_FILE
        return json.loads(f.read_text()) if f.is_file() else None


def report(metrics: dict[str, Any], train_checkpoint: str | None, generation: int) -> None:
    """Report an epoch to Tune with a pointer to its Train checkpoint; Tune persists it before report returns."""
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if train_checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="vitlab-pointer-") as d:
        pointer = {"path": train_checkpoint, "generation": generation, "epoch": int(metrics.get("epoch", 0))}
        (Path(d) / POINTER_FILE).write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def write(location: str, pointer: dict[str, Any]):
    """A pointer written straight to storage (a directory holding POINTER_FILE), as a Tune checkpoint."""
    storage.write_text(storage.join(location, POINTER_FILE), json.dumps(pointer))
    fs, path = storage.filesystem(location)
    return tune.Checkpoint(path, filesystem=fs)
