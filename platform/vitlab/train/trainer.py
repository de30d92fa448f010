"""JobConfig -> TorchTrainer, fit, and the run's outputs (best model file, MLflow artifacts, summary).

Everything that can be checked before Ray starts is checked first: the dataset manifest, the timm model
name, precision vs device, and that the MLflow tracking server answers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vitlab.config import JobConfig
from vitlab.data.manifest import Manifest, load_manifest
from vitlab.errors import ConfigError, UserError

log = logging.getLogger(__name__)

BEST_MODEL_FILE = "best_model.pt"


class TrainingError(RuntimeError):
    """Training ran and failed (a worker error after the retries, a non-finite loss)."""


@dataclass
class TrainOutcome:
    """What --output-json writes (see the README)."""

    val_top1: float
    val_top5: float
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


STORAGE_ENV = "VITLAB_STORAGE_PATH"


def storage_root(cfg: JobConfig) -> str:
    """run.storage_path as a URI or absolute path. On a cluster, $VITLAB_STORAGE_PATH (e.g. s3://bucket/vitlab,
    set on every node by cluster.yaml) is where a relative storage path goes: every node must see the same
    checkpoints, and a node's local disk is not shared."""
    path = cfg.run.storage_path
    if "://" in path:
        return path
    base = os.environ.get(STORAGE_ENV, "").rstrip("/")
    if base and not Path(path).is_absolute():
        return f"{base}/{path}" if "://" in base else str((Path(base) / path).resolve())
    return str(Path(path).resolve())


def run_dir(cfg: JobConfig) -> str:
    return f"{storage_root(cfg)}/{cfg.run.name}"


def has_checkpoints(path: str) -> bool:
    """Whether a Train run directory already holds checkpoints (so this run resumes it)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return False
    return any(i.base_name.startswith("checkpoint_") for i in infos)


def check_model(cfg: JobConfig, num_classes: int) -> None:
    """Build the model once on the meta device (no memory, no compute): bad kwargs fail before Ray."""
    import torch

    from vitlab.model import check_model_name, create_model, timm_kwargs

    check_model_name(cfg.model.name)
    try:
        with torch.device("meta"):
            create_model(cfg.model.name, num_classes, timm_kwargs(cfg))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"model.kwargs: timm cannot build {cfg.model.name} with {timm_kwargs(cfg)}: {e}") from None


def preflight(cfg: JobConfig) -> tuple[Manifest, str]:
    """Checks that need no Ray: returns (manifest, resolved tracking URI)."""
    from vitlab.tracking import check_tracking, resolve_tracking_uri

    if cfg.train.precision == "fp16" and not cfg.scaling.use_gpu:
        raise ConfigError("train.precision: fp16 needs scaling.use_gpu=true (use bf16 on CPU)")
    mixing = cfg.optim.mixup > 0 or cfg.optim.cutmix > 0
    if mixing and (cfg.train.batch_size // cfg.scaling.num_workers) % 2:
        raise ConfigError("train.batch_size: mixup/cutmix need an even batch per worker")
    manifest = load_manifest(cfg.data.path)
    check_model(cfg, manifest.num_classes)
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(uri)
    per_worker_rows = manifest.rows("train") // cfg.scaling.num_workers
    if per_worker_rows < cfg.train.batch_size // cfg.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: larger than the train split "
            f"({manifest.rows('train')} rows over {cfg.scaling.num_workers} workers)"
        )
    return manifest, uri


def _dataset_config(cfg: JobConfig):
    """Train is split equally (every worker takes the same number of steps, as DDP needs); val is split
    unequally so that no row is dropped and the all-reduced counts are exact."""
    import ray.train
    from ray.data import ExecutionOptions

    class ExactValDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            # Ray Train 2.60 calls this once per dataset, when a worker first asks for its shard.
            others = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                val = datasets["val"].copy(datasets["val"])
                val.context.execution_options = self._resolve_execution_options("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(val.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i]["val"] = split
            return output

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.deterministic
    return ExactValDataConfig(execution_options={"train": options, "val": ExecutionOptions(preserve_order=True)})


def build_trainer(cfg: JobConfig, manifest: Manifest, run_id: str | None, tracking_uri: str | None,
                  resume_from: str | None, epoch_clock, callbacks: list | None = None):
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from vitlab.data.pipeline import train_dataset, val_dataset
    from vitlab.model import timm_kwargs
    from vitlab.train.loop import train_loop_per_worker

    # Per-operator progress bars from every worker drown the epoch lines; the loop logs throughput itself.
    DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    datasets = {
        "train": train_dataset(manifest, cfg.data, cfg.train.seed, epoch_clock, cfg.data.decode_cpus),
        "val": val_dataset(manifest, cfg.data, cfg.data.decode_cpus),
    }
    loop_config = {
        "job": cfg.to_dict(),
        "model_kwargs": timm_kwargs(cfg),
        "num_classes": manifest.num_classes,
        "train_rows": manifest.rows("train"),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "resume_from": resume_from,
        "epoch_clock": epoch_clock,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources, accelerator_type=cfg.scaling.accelerator_type,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_root(cfg),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks or None,
            worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
        ),
        datasets=datasets,
        dataset_config=_dataset_config(cfg),
    )


def _run_tags(cfg: JobConfig, manifest: Manifest) -> dict[str, str]:
    from vitlab import __version__
    from vitlab.tracking import git_info, ray_job_id

    tags = {
        "vitlab.version": __version__,
        "manifest.sha256": manifest.sha256,
        "manifest.path": f"{manifest.root}/manifest.json",
        "run_dir": run_dir(cfg),
        **git_info(),
    }
    job_id = ray_job_id()
    if job_id:
        tags["ray.job_id"] = job_id
    return tags


def train(cfg: JobConfig, resume_from: str | None = None, parent_run_id: str | None = None,
          callbacks: list | None = None, tracking_key: str | None = None, log_model: bool = True) -> TrainOutcome:
    """Fit the job and record it; the CLI's `vitlab train` and the sweep's trials both land here.

    ``tracking_key`` names the MLflow run to continue (default: the run directory); sweeps pass the trial's
    key so a trial restarted under another Train run (a PBT exploit) keeps its one MLflow run."""
    from vitlab.cluster import connect
    from vitlab.data.pipeline import start_epoch_clock
    from vitlab.tracking import EpochMetricsCallback, end_run, start_run

    start = time.perf_counter()
    if cfg.run.name is None:
        cfg = cfg.with_overrides({"run.name": "vitlab"})
    if resume_from and not (Path(resume_from) / "state.pt").is_file() and "://" not in resume_from:
        raise UserError(f"--resume-from {resume_from}: not a vitlab checkpoint (no state.pt)")
    manifest, uri = preflight(cfg)
    connect()
    run_id, resumed = start_run(uri, cfg.tracking.experiment, tracking_key or run_dir(cfg), cfg.run.name,
                                cfg.flat(), _run_tags(cfg, manifest), parent_run_id,
                                resume=tracking_key is not None or has_checkpoints(run_dir(cfg)))
    log.info("MLflow run %s (%s) at %s", run_id, "resumed" if resumed else "new", uri)
    clock = start_epoch_clock()
    # The MLflow logger first: a sweep's forwarding callback after it hands the epoch to Tune, whose
    # scheduler may stop the trial at once; by then the epoch is in MLflow.
    callbacks = [EpochMetricsCallback(uri, run_id), *(callbacks or [])]
    trainer = build_trainer(cfg, manifest, run_id, uri, resume_from, clock, callbacks)
    try:
        result = trainer.fit()
    except Exception as e:
        end_run(uri, run_id, "FAILED")
        raise TrainingError(_root_message(e)) from e
    outcome = finish(cfg, manifest, uri, run_id, result, start, resumed, log_model)
    end_run(uri, run_id, "FINISHED")
    return outcome


def _root_message(e: BaseException) -> str:
    """The worker's own error line (e.g. the non-finite loss and its step), not Ray's wrapping."""
    text = str(e)
    for line in reversed(text.splitlines()):
        if "Error:" in line and "ray." not in line.split("Error:")[0]:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def _best(result) -> tuple[Any, dict[str, Any]]:
    candidates = list(result.best_checkpoints or [])
    if not candidates and result.checkpoint is not None:
        candidates = [(result.checkpoint, result.metrics or {})]
    if not candidates:
        raise TrainingError("training finished without a checkpoint")
    return max(candidates, key=lambda cm: (cm[1].get("val_top1", -1), cm[1].get("epoch", 0)))


def _checkpoint_location(cfg: JobConfig, ckpt) -> str:
    """A local path, or for remote storage the checkpoint's URI (Ray's Checkpoint.path drops the scheme)."""
    root = run_dir(cfg)
    return f"{root}/{Path(ckpt.path).name}" if "://" in root else str(ckpt.path)


def _save_beside_run(cfg: JobConfig, obj, name: str) -> str:
    """torch.save ``obj`` as RUN_DIR/name, on local disk or (a cluster's run.storage_path) in object storage;
    returns where it went."""
    import tempfile

    import pyarrow.fs as pafs

    from vitlab.train import state

    root = run_dir(cfg)
    if "://" not in root:
        state.atomic_torch_save(obj, Path(root) / name)
        return str(Path(root) / name)
    fs, path = pafs.FileSystem.from_uri(root)
    with tempfile.TemporaryDirectory(prefix="vitlab-best-") as tmp:
        local = Path(tmp) / name
        state.atomic_torch_save(obj, local)
        # an object store write appears whole or not at all, like the local rename
        pafs.copy_files(str(local), f"{path}/{name}", destination_filesystem=fs)
    return f"{root}/{name}"


def finish(cfg: JobConfig, manifest: Manifest, uri: str, run_id: str, result, start: float,
           resumed: bool, log_model: bool = True) -> TrainOutcome:
    """Write the plain best model, log the artifacts, and build the outcome."""
    import numpy as np
    import torch

    from vitlab import tracking
    from vitlab.model import create_model, timm_kwargs
    from vitlab.train import state

    best_ckpt, best_metrics = _best(result)
    latest = result.metrics or {}
    # as_directory(): the checkpoint itself on local storage, a downloaded copy when it is in S3 (a cluster)
    if not latest and result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            latest = state.load_metrics(d) or {}
    with best_ckpt.as_directory() as d:
        saved = state.load_state(d)
        confusion_file = Path(d) / state.CONFUSION_FILE
        confusion = np.load(confusion_file) if confusion_file.is_file() else None
    kwargs = timm_kwargs(cfg)
    model = create_model(cfg.model.name, manifest.num_classes, kwargs)
    model.load_state_dict(saved["model"], strict=True)
    model.eval()
    model_path = _save_beside_run(cfg, model.state_dict(), BEST_MODEL_FILE)

    art = tracking.temp_artifact_dir()
    (art / "config.yaml").write_text(cfg.to_yaml())
    (art / "manifest.json").write_text(json.dumps(manifest.data, indent=2))
    files = [art / "config.yaml", art / "manifest.json", tracking.learning_curves_png(uri, run_id, art / "curves.png")]
    if confusion is not None:
        files.append(tracking.confusion_png(confusion, manifest.classes, art / "confusion.png"))
    tracking.log_artifacts(uri, run_id, files)
    if log_model:
        size = cfg.data.image_size
        # batch 2: torch.export (MLflow's pt2 format) fixes a size-1 batch dimension to 1 for good
        tracking.log_torch_model(uri, run_id, model, torch.randn(2, 3, size, size).numpy())

    rates = [v for _, v in tracking.metric_history(uri, run_id, "images_per_s")]
    return TrainOutcome(
        val_top1=float(best_metrics["val_top1"]),
        val_top5=float(best_metrics["val_top5"]),
        epochs=int(latest.get("epoch", best_metrics.get("epoch", 0))),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        checkpoint=_checkpoint_location(cfg, best_ckpt),
        model_path=model_path,
        model={"name": cfg.model.name, "kwargs": kwargs},
        normalize={"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        wall_s=round(time.perf_counter() - start, 2),
        images_per_s=float(np.mean(rates)) if rates else 0.0,
        run_dir=run_dir(cfg),
        resumed=resumed,
    )


def summary(outcome: TrainOutcome) -> str:
    return "\n".join([
        f"val top-1 {outcome.val_top1:.2%}  top-5 {outcome.val_top5:.2%}  after {outcome.epochs} epochs "
        f"in {outcome.wall_s:.0f}s ({outcome.images_per_s:.0f} train images/s)",
        f"best model: {outcome.model_path}",
        f"MLflow run {outcome.mlflow_run_id} in {outcome.tracking_uri}",
        f"open it: vitlab ui   (or: mlflow ui --backend-store-uri {outcome.tracking_uri})",
    ])
