"""Everything about a job that can be checked before Ray starts: the dataset manifest, the timm model and its
kwargs, precision vs device, batch sizes vs workers and rows, and that the MLflow tracking server answers.

``preflight`` runs once per command: `vitlab train` before its Trainer, `vitlab sweep` on the driver (with
``check_job`` for every trial value), never again inside the trials.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitlab import model, tracking
from vitlab.config import JobConfig
from vitlab.data.manifest import Manifest, load_manifest
from vitlab.errors import ConfigError


@dataclass(frozen=True)
class Checked:
    """What preflight found: the dataset and the resolved MLflow tracking URI."""

    manifest: Manifest
    tracking_uri: str


def check_job(cfg: JobConfig, manifest: Manifest) -> None:
    """The checks that need the dataset but no server: cheap enough to run for every trial value."""
    if cfg.train.precision == "fp16" and not cfg.scaling.use_gpu:
        raise ConfigError("train.precision: fp16 needs scaling.use_gpu=true (use bf16 on CPU)")
    workers = cfg.scaling.max_workers
    mixing = cfg.optim.mixup > 0 or cfg.optim.cutmix > 0
    if mixing and (cfg.train.batch_size // workers) % 2:
        raise ConfigError("train.batch_size: mixup/cutmix need an even batch per worker")
    if manifest.rows("train") // workers < cfg.train.batch_size // workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: larger than the train split "
            f"({manifest.rows('train')} rows over {workers} workers)"
        )
    model.check_buildable(cfg, manifest.num_classes)


def preflight(cfg: JobConfig) -> Checked:
    """Every check that needs no Ray; returns the manifest and the tracking URI the run will use."""
    manifest = load_manifest(cfg.data.path)
    check_job(cfg, manifest)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking(uri)
    return Checked(manifest, uri)
