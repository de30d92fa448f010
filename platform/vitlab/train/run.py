"""One training, start to end: preflight, the MLflow run, the Trainer's fit, and the run's outputs (the plain
best model, MLflow artifacts, the outcome that --output-json writes). `vitlab train` and every sweep trial
land in ``train``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from vitlab import logs, plots, tracking
from vitlab import model as models
from vitlab.cluster import connect
from vitlab.config import JobConfig
from vitlab.data.manifest import Manifest
from vitlab.data.pipeline import start_epoch_clock
from vitlab.errors import UserError
from vitlab.redact import redact, redact_all
from vitlab.train import state, storage
from vitlab.train.callbacks import EpochMetricsCallback
from vitlab.train.init_from import InitWeights, load_init_weights
from vitlab.train.inputs import LoopInputs
from vitlab.train.outbox import Outbox, deliver, format_epochs
from vitlab.train.preflight import Checked, preflight
from vitlab.train.trainer import build_trainer

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training ran and failed (a worker error after the retries, a non-finite loss)."""


@dataclass
class TrainOutcome:
    """What --output-json writes (see docs/training.md)."""

    val_top1: float  # of best_model.pt's weights: the live ones, or the EMA under run.best_by=val_top1_ema
    val_top5: float
    best_by: str
    epochs: int
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str
    model_path: str
    model: dict[str, Any]
    normalize: dict[str, list[float]]
    wall_s: float
    images_per_s: float
    run_dir: str
    resumed: bool
    waiting_epochs: list[int]  # epochs not yet in MLflow (the server was unreachable at the end): in the outbox
    last_metrics: dict[str, float]  # the run's last report (its last epoch): the numbers Ray Train holds for it
    last_checkpoint: str | None  # that report's checkpoint

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def train(cfg: JobConfig, resume_from: str | None = None, parent_run_id: str | None = None,
          callbacks: list | None = None, tracking_key: str | None = None, log_model: bool = True,
          checked: Checked | None = None) -> TrainOutcome:
    """Fit the job and record it.

    ``tracking_key`` names the MLflow run to continue (default: the run directory); sweeps pass the trial's
    key so a trial restarted under another Train run (a PBT exploit) keeps its one MLflow run. ``checked`` is
    a preflight already done (a sweep checks once on its driver, not in every trial)."""
    start = time.perf_counter()
    if cfg.run.name is None:
        cfg = cfg.with_overrides({"run.name": "vitlab"})
    if resume_from and not storage.is_uri(resume_from) and not (Path(resume_from) / state.STATE_FILE).is_file():
        raise UserError(f"--resume-from {resume_from}: not a vitlab checkpoint (no {state.STATE_FILE})")
    checked = checked or preflight(cfg)
    manifest, uri = checked.manifest, checked.tracking_uri
    run_dir = storage.run_dir(cfg)
    has_checkpoints = storage.has_checkpoints(run_dir)
    # model.init_from starts a fresh run only: a resumed run continues from its own checkpoint
    init = _init_weights(cfg, manifest, uri) if not (resume_from or has_checkpoints) else None
    logs.keep_log_in(run_dir)  # every check passed: the command's log continues in the run's directory
    connect()
    run_id, resumed = tracking.start_run(uri, cfg.tracking.experiment, tracking_key or run_dir, cfg.run.name,
                                         cfg.flat(), {**tracking.run_tags(cfg, manifest), **_lineage(init)},
                                         parent_run_id, resume=tracking_key is not None or has_checkpoints,
                                         inputs=manifest)
    # a sweep's trials: in the log file only (the sweep's status lines say what the trials do)
    log.log(logging.DEBUG if tracking_key else logging.INFO, "MLflow run %s (%s) at %s", run_id,
            "resumed" if resumed else "new", redact(uri))
    outbox = Outbox(run_dir)
    deliver(uri, run_id, outbox)  # epochs an earlier start of this run could not send
    inputs = LoopInputs(num_classes=manifest.num_classes, train_rows=manifest.rows("train"),
                        val_rows=manifest.rows("val"), tracking_uri=uri,
                        run_id=run_id, resume_from=resume_from, epoch_clock=start_epoch_clock(),
                        init_weights=ray.put(init.state_dict) if init else None,
                        label=f"trial {cfg.run.name}: " if tracking_key else "")
    # The MLflow logger first: a sweep's forwarding callback after it hands the epoch to Tune, whose
    # scheduler may stop the trial at once; by then the epoch is in MLflow.
    trainer = build_trainer(cfg, manifest, inputs, [EpochMetricsCallback(uri, run_id, run_dir),
                                                    *(callbacks or [])])
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.end_run_quietly(uri, run_id, "FAILED")
        raise TrainingError(_root_message(e)) from e
    waiting = deliver(uri, run_id, outbox)
    outcome = finish(cfg, manifest, uri, run_id, result, start, resumed, log_model, waiting)
    if not waiting:  # else the run stays RUNNING: the next `vitlab train` of it sends the epochs and ends it
        tracking.end_run_quietly(uri, run_id, "FINISHED")
    return outcome


def _init_weights(cfg: JobConfig, manifest: Manifest, uri: str) -> InitWeights | None:
    """model.init_from's weights, adapted to the job's model and checked here, on the driver: a source that
    does not fit fails before Ray starts, and the workers receive tensors, not a path they might not reach."""
    if not cfg.model.init_from:
        return None
    init = load_init_weights(cfg.model.init_from, models.build(cfg, manifest.num_classes), uri)
    log.info("model.init_from %s (sha256 %s): %s", redact(init.source), init.sha256[:12],
             "; ".join(init.notes) or "every tensor loaded as it is")
    return init


def _lineage(init: InitWeights | None) -> dict[str, str]:
    """The MLflow tags that say what a fine-tuned run started from."""
    if init is None:
        return {}
    return {"vitlab.init_from": redact(init.source), "vitlab.init_from.sha256": init.sha256,
            "vitlab.init_from.adapted": "; ".join(init.notes) or "nothing"}


def _root_message(e: BaseException) -> str:
    """The worker's own error line (e.g. the non-finite loss and its step), not Ray's wrapping."""
    text = str(e)
    for line in reversed(text.splitlines()):
        if "Error:" in line and "ray." not in line.split("Error:")[0]:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def _best(result, best_by: str) -> tuple[Any, dict[str, Any]]:
    candidates = list(result.best_checkpoints or [])
    if not candidates and result.checkpoint is not None:
        candidates = [(result.checkpoint, result.metrics or {})]
    if not candidates:
        raise TrainingError("training finished without a checkpoint")
    return max(candidates, key=lambda cm: (cm[1].get(best_by, -1), cm[1].get("epoch", 0)))


def finish(cfg: JobConfig, manifest: Manifest, uri: str, run_id: str, result, start: float,
           resumed: bool, log_model: bool = True, waiting: list[int] | None = None) -> TrainOutcome:
    """Write the plain best model beside the run, log the artifacts (not while epochs are ``waiting`` for the
    tracking server), and build the outcome."""
    best_ckpt, best_metrics = _best(result, cfg.run.best_by)
    suffix = cfg.run.best_by.removeprefix("val_top1")  # "" (the live weights) or "_ema"
    latest = result.metrics or {}
    # as_directory(): the checkpoint itself on local storage, a downloaded copy when it is in S3 (a cluster)
    if not latest and result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            latest = state.load_metrics(d) or {}
    with best_ckpt.as_directory() as d:
        saved = state.load_state(d)
        confusion = state.load_confusion(d)
    model = models.with_weights(cfg, manifest.num_classes, saved["model" + suffix], str(best_ckpt.path))
    model_path = storage.save_torch(model.state_dict(), storage.join(storage.run_dir(cfg), storage.BEST_MODEL_FILE))
    images_per_s = float(latest.get("images_per_s", 0.0))
    if waiting:
        log.warning("MLflow unreachable: epochs %s wait in %s; run `vitlab train` of this run again (same "
                    "run.name) once the server answers, and they are logged and the run ended",
                    format_epochs(waiting), Outbox(storage.run_dir(cfg)).location)
    else:
        try:
            with tracking.quick_retries():
                images_per_s = _record(cfg, manifest, uri, run_id, model, confusion, log_model) or images_per_s
        except tracking.unreachable_errors() as e:
            log.warning("MLflow unreachable at the end of the run: artifacts and model not logged (%s)",
                        redact(storage.first_line(e)))
    return TrainOutcome(
        val_top1=float(best_metrics["val_top1" + suffix]),
        val_top5=float(best_metrics["val_top5" + suffix]),
        best_by=cfg.run.best_by,
        epochs=int(latest.get("epoch", best_metrics.get("epoch", 0))),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        checkpoint=storage.checkpoint_location(cfg, best_ckpt.path),
        model_path=model_path,
        model={"name": cfg.model.name, "kwargs": models.timm_kwargs(cfg)},
        normalize={"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        wall_s=round(time.perf_counter() - start, 2),
        images_per_s=images_per_s,
        run_dir=storage.run_dir(cfg),
        resumed=resumed,
        waiting_epochs=list(waiting or []),
        last_metrics={k: v for k, v in latest.items() if isinstance(v, (int, float))},
        last_checkpoint=(storage.checkpoint_location(cfg, result.checkpoint.path) if result.checkpoint is not None
                         else None),
    )


def _record(cfg: JobConfig, manifest: Manifest, uri: str, run_id: str, model, confusion, log_model: bool) -> float:
    """The run's artifacts (config, manifest, curves, confusion matrix) and logged model in MLflow; returns
    the mean train images/s over its epochs."""
    with tempfile.TemporaryDirectory(prefix="vitlab-artifacts-") as tmp:
        art = Path(tmp)
        (art / "config.yaml").write_text(redact(cfg.to_yaml()))
        (art / "manifest.json").write_text(json.dumps(redact_all(manifest.data), indent=2))
        curves = tracking.metric_histories(uri, run_id, tuple(key for key, _, _ in plots.LEARNING_CURVES))
        files = [art / "config.yaml", art / "manifest.json", plots.learning_curves(curves, art / "curves.png")]
        if confusion is not None:
            files.append(plots.confusion(confusion, manifest.classes, art / "confusion.png"))
        tracking.log_artifacts(uri, run_id, files)
    if log_model:
        size = cfg.data.image_size
        # batch 2: torch.export (MLflow's pt2 format) fixes a size-1 batch dimension to 1 for good
        tracking.log_torch_model(uri, run_id, model, torch.randn(2, 3, size, size).numpy())

    rates = [v for _, v in tracking.metric_history(uri, run_id, "images_per_s")]
    return float(np.mean(rates)) if rates else 0.0


def summary(outcome: TrainOutcome) -> str:
    waiting = ([f"MLflow unreachable: epochs {format_epochs(outcome.waiting_epochs)} wait in the run's outbox; "
                "run the same `vitlab train` again once the server answers to log them"]
               if outcome.waiting_epochs else [])
    return "\n".join([*waiting,
        f"val top-1 {outcome.val_top1:.2%}  top-5 {outcome.val_top5:.2%}  after {outcome.epochs} epochs "
        f"in {outcome.wall_s:.0f}s ({outcome.images_per_s:.0f} train images/s)",
        f"best model: {outcome.model_path}",
        f"MLflow run {outcome.mlflow_run_id} in {redact(outcome.tracking_uri)}",
        f"open it: vitlab ui   (or: mlflow ui --backend-store-uri {redact(outcome.tracking_uri)})",
    ])
