"""How the two datasets are split over the Train workers (a Ray Train DataConfig).

This object travels to the Train controller, whose process imports this module to rebuild it: it imports
nothing heavier than ray.train, so the controller does not load torch or timm for it.
"""

from __future__ import annotations

from collections.abc import Callable

import ray.train
from ray.data import ExecutionOptions

from vitlab.config import JobConfig


class ExactValDataConfig(ray.train.DataConfig):
    """Train is split equally (every worker takes the same number of steps, as DDP needs); val is split
    unequally so that no row is dropped and the all-reduced counts are exact.

    ``val_beside_span``: with a train span (data.back_to_back), the val dataset is built here, once the workers'
    nodes are known: ``val_beside_span((tasks, node_ids))`` (data/pipeline.py ``val_dataset``), ``tasks`` the
    decode tasks those nodes' CPUs hold beside the workers' own (``worker_cpus`` each, ``decode_cpus`` a task)."""

    def __init__(self, *args, val_beside_span: Callable | None = None, worker_cpus: float = 1.0,
                 decode_cpus: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._val_beside_span, self._worker_cpus, self._decode_cpus = val_beside_span, worker_cpus, decode_cpus

    def _val_tasks(self, worker_node_ids: list[str]) -> int:
        nodes = set(worker_node_ids)
        cpus = sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["NodeID"] in nodes)
        return max(1, int((cpus - self._worker_cpus * len(worker_node_ids)) // self._decode_cpus))

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
            val = datasets["val"]
            if self._val_beside_span is not None:
                val = self._val_beside_span((self._val_tasks(worker_node_ids), worker_node_ids))
            val = val.copy(val)
            val.context.execution_options = self._resolve_execution_options("val")
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(val.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i]["val"] = split
        return output


def dataset_config(cfg: JobConfig, train_names: list[str], val_beside_span: Callable | None = None
                   ) -> ExactValDataConfig:
    """``train_names``: the one shared "train" stream, split equally; or under data.repeated_aug one dataset
    per worker (train_0, train_1, ...), which is not split: each worker takes its own whole."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.deterministic or cfg.positional_stream  # a position needs the order
    return ExactValDataConfig(
        datasets_to_split=["train", "val"],
        execution_options={**dict.fromkeys(train_names, options), "val": ExecutionOptions(preserve_order=True)},
        val_beside_span=val_beside_span, worker_cpus=cfg.scaling.cpus_per_worker, decode_cpus=cfg.data.decode_cpus,
    )
