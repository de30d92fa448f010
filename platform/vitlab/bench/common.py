"""What every `vitlab bench` shares: the machine's cores and load, argument checks, the model under test."""

from __future__ import annotations

import os
from typing import Any

from vitlab.errors import UserError
from vitlab.model import check_model_name, with_img_size

# --quick's model: a one-block ViT on 32-pixel images, seconds per benchmark (tests and smoke runs)
QUICK_MODEL = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                        "num_heads": 2})


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_avg() -> float | None:
    """The 1-minute load average: a benchmark on a shared machine says what else was running."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def check_positive(**flags: int | None) -> None:
    """Each given flag (``image_size=0`` is ``--image-size 0``) is unset or at least 1."""
    for name, v in flags.items():
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} {v}: expected a positive number")


def bench_model(model_name: str, image_size: int, batch_size: int, quick: bool, quick_batch: int,
                num_classes: int = 1000) -> tuple[str, dict[str, Any], int, int, int]:
    """(model name, timm kwargs, image size, batch size, classes) of the model a benchmark builds."""
    if quick:
        name, kwargs = QUICK_MODEL
        return name, dict(kwargs), kwargs["img_size"], min(batch_size, quick_batch), 10
    check_model_name(model_name)
    return model_name, with_img_size(model_name, {}, image_size), image_size, batch_size, num_classes
