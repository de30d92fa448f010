"""JobConfig -> TorchTrainer: scaling, failure and checkpoint configs, the two datasets and how they are split
over the workers. Nothing here runs anything: ``train.run`` fits what ``build_trainer`` returns.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import ray.train
from ray.data import DataContext
from ray.train.torch import TorchTrainer

from vitlab.config import JobConfig
from vitlab.data.manifest import Manifest
from vitlab.data.pipeline import shared_span, train_datasets, val_dataset
from vitlab.train.ingest import dataset_config
from vitlab.train.inputs import LoopInputs
from vitlab.train.storage import storage_root


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker. The Train controller unpickles this function with the trainer
    but never calls it, so the loop (timm, the model, the epoch code) is imported here, on the workers only:
    on the controller it would cost about 2 s of CPU before every Train run starts its workers."""
    from vitlab.train.loop import worker_loop

    worker_loop(config)


def build_trainer(cfg: JobConfig, manifest: Manifest, inputs: LoopInputs, callbacks: list) -> TorchTrainer:
    """The job's TorchTrainer. Every worker receives the JobConfig whole and the LoopInputs beside it."""
    # Per-operator progress bars from every worker drown the epoch lines; the loop logs throughput itself.
    DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    # one train stream per possible rank: an elastic run's workers take the first W of them
    span = shared_span(cfg, inputs.train_rows)
    train = train_datasets(manifest, cfg.data, cfg.train.seed, inputs.epoch_clock, cfg.scaling.max_workers,
                           cfg.positional_stream, span)
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg, "inputs": inputs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_seconds,
            resources_per_worker=resources, accelerator_type=cfg.scaling.accelerator_type,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_root(cfg),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute=cfg.run.best_by,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   max_preemption_failures=cfg.run.max_preemption_failures),
            callbacks=callbacks or None,
            worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
        ),
        datasets={**train, "val": val_dataset(manifest, cfg.data)},
        # beside a span's decode actors, val is sized to the workers' nodes once they are known (train/ingest.py)
        dataset_config=dataset_config(cfg, list(train), partial(val_dataset, manifest, cfg.data) if span else None),
    )
