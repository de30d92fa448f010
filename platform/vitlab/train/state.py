"""Checkpoint save/restore: model, EMA weights, optimizer, scaler, epoch, step, every rank's RNG states, the
resolved config.

A checkpoint is a directory: ``state.pt`` (torch), ``config.yaml`` (the resolved JobConfig), ``metrics.json``
(the epoch's metrics), ``epoch_rows.json`` (the epochs it covers, as MLflow rows) and, for at most 100 classes,
``confusion.npy``. Files are written under a temporary name and renamed, so a crash never leaves a file that
looks complete. torch is imported inside the functions that use it: deploy/ reads checkpoints without paying
for torch at import time.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitlab.train import storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion.npy"
# The epochs reported since the previous checkpoint, this one's included, as MLflow rows: the controller can go
# between registering a checkpoint and logging its epochs, and a restore from it sends the ones MLflow lacks.
EPOCH_ROWS_FILE = "epoch_rows.json"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values: what a weights-only load rebuilds."""
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain timm module under DDP and torch.compile wrappers (no 'module.' / '_orig_mod.' prefix)."""
    import torch

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def write_checkpoint_dir(
    *, model, ema=None, optimizer, scaler, epoch: int, step: int, config_yaml: str, metrics: dict[str, Any],
    rng_states: list[dict[str, Any]], confusion: np.ndarray | None, position: dict[str, Any] | None = None,
    epoch_rows: list[tuple[int, dict[str, float]]] | None = None,
) -> Path:
    """Write a checkpoint into a new temporary directory and return it (for ray.train.Checkpoint)."""
    out = Path(tempfile.mkdtemp(prefix="vitlab-ckpt-"))
    state = {
        "model": unwrap(model).state_dict(),
        "model_ema": ema.module.state_dict() if ema is not None else None,  # train.ema_decay's weights
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # epochs completed
        "step": step,  # optimizer steps completed
        "rng": rng_states,  # one entry per rank
    }
    if position is not None:  # a mid-epoch checkpoint: where the epoch stands (train/loop.py)
        state["position"] = position
    storage.save_torch(state, str(out / STATE_FILE))
    storage.write_text(str(out / CONFIG_FILE), config_yaml)
    storage.write_text(str(out / METRICS_FILE), json.dumps(metrics, indent=2))
    if epoch_rows:
        storage.write_text(str(out / EPOCH_ROWS_FILE), json.dumps(epoch_rows))
    if confusion is not None:
        buf = io.BytesIO()
        np.save(buf, confusion)
        storage.write_bytes(str(out / CONFUSION_FILE), buf.getvalue())
    return out


def checkpoint_globals() -> list[Any]:
    """What a state.pt may hold beyond tensors and plain values: numpy's array type, for checkpoints whose
    numpy RNG state was stored as an array."""
    return [np.ndarray, np.dtype, np.dtype(np.uint32).__class__, np._core.multiarray._reconstruct]


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """state.pt through torch's weights-only unpickler: a crafted checkpoint can carry data, never code."""
    import torch

    with torch.serialization.safe_globals(checkpoint_globals()):
        return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


def load_metrics(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    f = Path(checkpoint_dir) / METRICS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def load_epoch_rows(checkpoint_dir: str | Path) -> list[tuple[int, dict[str, float]]]:
    """EPOCH_ROWS_FILE's rows; [] when the checkpoint has none, or they are not [epoch, {metric: number}] pairs
    (a checkpoint's own bookkeeping: a malformed one costs MLflow rows, never the restore)."""
    f = Path(checkpoint_dir) / EPOCH_ROWS_FILE
    try:
        rows = json.loads(f.read_text()) if f.is_file() else []
        return [(int(epoch), {str(k): float(v) for k, v in values.items()}) for epoch, values in rows]
    except (ValueError, TypeError, AttributeError) as e:
        log.warning("%s: not a list of [epoch, {metric: number}] (%s): its epochs are not checked in MLflow", f, e)
        return []


def load_confusion(checkpoint_dir: str | Path) -> np.ndarray | None:
    f = Path(checkpoint_dir) / CONFUSION_FILE
    return np.load(f) if f.is_file() else None


def restore(state: dict[str, Any], model, optimizer, scaler, rank: int) -> None:
    """Load a checkpoint's state into freshly built objects (before DDP wrapping)."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if rank < len(rngs):
        set_rng_state(rngs[rank])
