"""Shards -> Ray Data datasets of uint8 image batches (NHWC) and int64 labels, for ``iter_torch_batches``.

Shape of the pipeline, chosen for throughput on few cores:

* The dataset is a list of shard indices; one task reads a whole shard and decodes + crops its images,
  yielding blocks of ``data.block_rows`` rows. Read and decode are one fused task: no Parquet bytes travel
  through the object store, and nothing waits on a separate read stage for CPU (on 2 cores an actor pool
  or separate read tasks starved each other).
* The shard order and the row order inside each shard are reshuffled each epoch from (seed, epoch), and
  each image's crop/flip comes from an RNG seeded by (seed, epoch, image key), so two runs with one seed
  see the same augmented images whichever task decodes them; ``data.deterministic`` also fixes the order.
* Batches stay uint8 until the training device; ``normalize_on_device`` does mean/std there, in float.

The epoch comes from an int (tests, benchmarks) or from an ``EpochClock`` actor that the training loop
advances, since Ray Train re-executes the same dataset every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vitlab.config import DataConfig
from vitlab.data.manifest import Manifest
from vitlab.data.transforms import build_randaugment, decode_train, decode_val, row_rng

EpochSource = Any  # int, or an EpochClock actor handle


class EpochClock:
    """A tiny Ray actor holding the current epoch, read by the decode tasks (Ray Train re-runs one
    dataset per epoch, so the epoch cannot be baked into it)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


def start_epoch_clock(epoch: int = 0):
    """The clock lives on the driver's node, as Ray Train's own controller and dataset helpers do: a 0-CPU actor
    may otherwise land on any worker node, and losing that node would kill the clock and with it every restart
    of the run (seen when a node was removed mid-training)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(EpochClock).remote(epoch)


def _current_epoch(epoch: EpochSource) -> int:
    if isinstance(epoch, int):
        return epoch
    import ray

    return int(ray.get(epoch.get.remote()))


def _read_shard(path: str):
    return pq.read_table(path, columns=["image", "label", "key"])


def _blocks(n: int, block_rows: int) -> Iterator[slice]:
    for start in range(0, n, block_rows):
        yield slice(start, min(n, start + block_rows))


def _decode_train_shards(
    batch: dict[str, np.ndarray], files: list[str], data: DataConfig, seed: int, epoch: EpochSource
) -> Iterator[dict[str, np.ndarray]]:
    epoch_n = _current_epoch(epoch)
    order = np.random.default_rng([seed & 0xFFFFFFFF, epoch_n]).permutation(len(files))
    augment = build_randaugment(data.randaugment, data.image_size, data.mean)
    size = data.image_size
    for idx in batch["shard"]:
        shard = int(order[int(idx)])
        table = _read_shard(files[shard])
        rows = np.random.default_rng([seed & 0xFFFFFFFF, epoch_n, shard]).permutation(table.num_rows)
        images, labels, keys = (table.column(c).to_pylist() for c in ("image", "label", "key"))
        for part in _blocks(len(rows), data.block_rows):
            take = rows[part]
            out = np.empty((len(take), size, size, 3), dtype=np.uint8)
            for j, r in enumerate(take):
                rng = row_rng(seed, epoch_n, keys[r])
                out[j] = decode_train(images[r], size, rng, data.scale, data.ratio, data.hflip, augment,
                                      data.interpolation)
            yield {"image": out, "label": np.asarray([labels[r] for r in take], dtype=np.int64)}


def _decode_val_shards(
    batch: dict[str, np.ndarray], files: list[str], data: DataConfig
) -> Iterator[dict[str, np.ndarray]]:
    size = data.image_size
    for idx in batch["shard"]:
        table = _read_shard(files[int(idx)])
        images, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
        for part in _blocks(len(images), data.block_rows):
            out = np.stack([decode_val(b, size, data.crop_pct, data.interpolation) for b in images[part]])
            yield {"image": out, "label": labels[part].astype(np.int64)}


def _shard_indices(n: int, deterministic: bool):
    import ray

    ds = ray.data.from_items([{"shard": i} for i in range(n)], override_num_blocks=max(1, n))
    if deterministic:
        ds.context.execution_options.preserve_order = True
    return ds


def train_dataset(manifest: Manifest, data: DataConfig, seed: int = 0, epoch: EpochSource = 0):
    """The train split: RandomResizedCrop + flip (+ RandAugment), reshuffled per epoch. Each decode task
    reserves data.decode_cpus."""
    files = manifest.files("train")
    ds = _shard_indices(len(files), data.deterministic)
    return ds.map_batches(
        _decode_train_shards,
        batch_size=1,
        num_cpus=data.decode_cpus,
        fn_kwargs={"files": files, "data": data, "seed": seed, "epoch": epoch},
    )


def val_dataset(manifest: Manifest, data: DataConfig):
    """The val split: resize the shorter side to image_size / crop_pct, center-crop, fixed order."""
    files = manifest.files("val")
    ds = _shard_indices(len(files), True)
    return ds.map_batches(
        _decode_val_shards,
        batch_size=1,
        num_cpus=data.decode_cpus,
        fn_kwargs={"files": files, "data": data},
    )


def normalize_on_device(images, mean, std, device=None, channels_last: bool = False):
    """uint8 NHWC batch -> float NCHW on ``device``, (x/255 - mean) / std computed there."""
    import torch

    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = x.sub_(m).div_(s)
    # permute() of NHWC already gives channels_last strides; make it contiguous in the layout asked for.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
