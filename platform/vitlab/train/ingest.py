"""How the two datasets are split over the Train workers (a Ray Train DataConfig).

This object travels to the Train controller, whose process imports this module to rebuild it: it imports
nothing heavier than ray.train, so the controller does not load torch or timm for it.
"""

from __future__ import annotations

import ray.train
from ray.data import ExecutionOptions

from vitlab.config import JobConfig


class ExactValDataConfig(ray.train.DataConfig):
    """Train is split equally (every worker takes the same number of steps, as DDP needs); val is split
    unequally so that no row is dropped and the all-reduced counts are exact."""

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


def dataset_config(cfg: JobConfig) -> ExactValDataConfig:
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.deterministic
    return ExactValDataConfig(execution_options={"train": options, "val": ExecutionOptions(preserve_order=True)})
