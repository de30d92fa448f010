"""LoopInputs: what every Train worker receives beside the JobConfig. A module of its own, free of torch and
timm: the Train controller unpickles it with the trainer's config (see trainer.train_loop_per_worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoopInputs:
    """What every worker needs beside the JobConfig: facts of the dataset and of this run, no settings."""

    num_classes: int
    train_rows: int
    val_rows: int  # every epoch validates all of them (an epoch that did not is not reported)
    tracking_uri: str | None  # the MLflow run rank 0 logs step metrics to (None: no step logging)
    run_id: str | None
    resume_from: str | None  # --resume-from, used when the run has no checkpoint of its own
    epoch_clock: Any  # EpochClock actor handle
    init_weights: Any = None  # ObjectRef of model.init_from's adapted state_dict (fresh runs start from it)
    label: str = ""  # before rank 0's lines: "trial <id>: " in a sweep, where several runs print at once
