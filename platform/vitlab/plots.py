"""Every figure vitlab logs, drawn from plain rows (no MLflow, Ray or Tune objects in here).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global backend or figure state,
so plotting is safe in any thread and leaves no open figures behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

Curve = Sequence[tuple[int, float]]  # (step or epoch, value) rows in order

LEARNING_CURVES = (  # metric key, panel, label
    ("train_loss", 0, "train loss"),
    ("val_loss", 0, "val loss"),
    ("train_top1", 1, "train top-1"),
    ("val_top1", 1, "val top-1"),
    ("val_top5", 1, "val top-5"),
    ("val_top1_ema", 1, "val top-1, EMA weights"),  # with train.ema_decay
)


def _save(fig: Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def learning_curves(histories: Mapping[str, Curve], out: Path) -> Path:
    """Loss and accuracy per epoch, train and val, from each metric's (epoch, value) rows."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for key, panel, label in LEARNING_CURVES:
        rows = histories.get(key) or []
        if rows:
            axes[panel].plot([s for s, _ in rows], [v for _, v in rows], marker="o", label=label)
    for ax, title in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return _save(fig, out)


def confusion(matrix: np.ndarray, classes: Sequence[str], out: Path) -> Path:
    """Row-normalised confusion matrix (true x predicted), with counts written in for up to 30 classes."""
    n = len(classes)
    size = min(20, 3 + n * 0.35)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    norm = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (val, best checkpoint)")
    return _save(fig, out)


def trial_curves(curves: Mapping[str, Curve], metric: str, out: Path) -> Path:
    """One line per trial: ``metric`` per epoch."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, rows in curves.items():
        if rows:
            ax.plot([e for e, _ in rows], [v for _, v in rows], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, all trials")
    ax.grid(alpha=0.3)
    if 0 < len(ax.lines) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, out)


def parallel_coordinates(trials: Sequence[tuple[Mapping[str, Any], float]], keys: Sequence[str],
                         log_keys: set[str], metric: str, out: Path) -> Path:
    """One axis per searched key (log10 for ``log_keys``), then the metric; one line per scored trial,
    coloured by its metric. ``trials`` are (params, metric value) pairs."""
    fig = Figure(figsize=(2 + 2 * (len(keys) + 1), 5))
    ax = fig.subplots()
    if trials:
        cols = []
        for k in keys:
            v = np.array([float(params[k]) for params, _ in trials])
            cols.append(np.log10(v) if k in log_keys else v)
        cols.append(np.array([score for _, score in trials]))
        data = np.stack(cols, axis=1)
        lo, hi = data.min(axis=0), data.max(axis=0)
        norm = (data - lo) / np.where(hi > lo, hi - lo, 1)
        cmap = colormaps["viridis"]
        for i in range(len(trials)):
            ax.plot(range(data.shape[1]), norm[i], color=cmap(norm[i, -1]), alpha=0.8)
        labels = [("log10 " if k in log_keys else "") + k for k in keys] + [metric]
        ax.set_xticks(range(data.shape[1]), labels, rotation=20)
        for j in range(data.shape[1]):
            ax.text(j, -0.06, f"{lo[j]:.3g}", ha="center", fontsize=7)
            ax.text(j, 1.03, f"{hi[j]:.3g}", ha="center", fontsize=7)
    ax.set_ylim(-0.1, 1.1)  # the normalised axes and their labels, also when every trial has the same values
    ax.set_yticks([])
    ax.set_title("trials: parallel coordinates (colour = metric)")
    return _save(fig, out)
