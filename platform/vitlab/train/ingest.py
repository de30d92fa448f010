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
        own = {k: v for k, v in datasets.items() if k not in ("train", "val")}  # one worker's train stream
        others = {k: v for k, v in datasets.items() if k not in own and k != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in own.items():
            # A split of one: its executor runs in a coordinator actor, as for "train", not inside the Train
            # worker (a plain iterator would run Ray Data's scheduling loop in the training process).
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            split = ds.streaming_split(1, equal=True)[0]
            for i in range(world_size):
                output[i][name] = split
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(val.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i]["val"] = split
        return output


def dataset_config(cfg: JobConfig, train_names: list[str]) -> ExactValDataConfig:
    """``train_names``: the one shared "train" stream, split equally; or under data.repeated_aug one dataset
    per worker (train_0, train_1, ...), which is not split: each worker takes its own whole."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.deterministic or cfg.positional_stream  # a position needs the order
    return ExactValDataConfig(
        datasets_to_split=["train", "val"],
        execution_options={**dict.fromkeys(train_names, options), "val": ExecutionOptions(preserve_order=True)},
    )
