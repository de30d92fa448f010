"""Everything about a job that can be checked before Ray starts: the dataset manifest, the timm model and its
kwargs, precision and data.decode vs device, batch sizes vs workers and rows, and that the MLflow tracking server
answers.

``preflight`` runs once per command: `vitlab train` before its Trainer, `vitlab sweep` on the driver (with
``check_job`` for every trial value), never again inside the trials.
"""

from __future__ import annotations

import os
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
    if cfg.data.decode == "gpu":
        check_gpu_decode(cfg)
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


def check_gpu_decode(cfg: JobConfig) -> None:
    """data.decode=gpu decodes on the training device: CUDA workers, and no RandAugment (timm's runs on PIL images,
    on the CPU). Without RAY_ADDRESS (or with RAY_ADDRESS=local) the Ray that trains starts here (cluster.connect),
    so this machine needs a CUDA device; a cluster's workers check theirs when they start (train/loop.py)."""
    if cfg.data.randaugment:
        raise ConfigError(f"data.decode: gpu does not run data.randaugment={cfg.data.randaugment!r} (timm's "
                          "RandAugment works on PIL images, on the CPU); expected data.randaugment=null, or "
                          "data.decode=cpu")
    if not cfg.scaling.use_gpu:
        raise ConfigError("data.decode: gpu decodes on the training device, which is the CPU here "
                          "(scaling.use_gpu=false); expected scaling.use_gpu=true on CUDA GPUs, or data.decode=cpu")
    import torch

    if (os.environ.get("RAY_ADDRESS") or "local") == "local" and not torch.cuda.is_available():
        raise ConfigError("data.decode: gpu needs a CUDA device, and this machine has none (no CUDA device: "
                          "torch.cuda.is_available() is False, and the local Ray trains here); expected a machine "
                          "with an NVIDIA GPU, or data.decode=cpu")


def preflight(cfg: JobConfig) -> Checked:
    """Every check that needs no Ray; returns the manifest and the tracking URI the run will use."""
    manifest = load_manifest(cfg.data.path)
    check_job(cfg, manifest)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking(uri)
    return Checked(manifest, uri)
