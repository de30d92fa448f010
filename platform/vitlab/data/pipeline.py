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

Repeated augmentation (``data.repeated_aug = k > 1``, DeiT's RASampler) needs to place rows: the k copies of
an image must reach k different workers, which a shared stream split by Ray cannot promise. So each worker
gets a stream of its own (``train_datasets``): the epoch's image sequence is the shuffled shards' shuffled
rows, its first ceil(rows / k) images are each repeated k times, and worker r takes the positions r, r + W,
r + 2W, ... of that list (W workers), rows // W of them, as RASampler does. Consecutive copies of one image
land on consecutive workers. A worker reads only the shards that hold its positions.

With mid-epoch checkpoints (``positional``, data/positions.py) each worker instead takes one contiguous piece of
the epoch's positions, in order; under repeated augmentation position p is copy p % k of image p // k, so the k
copies of an image are neighbours and land in the same optimizer step (for a ViT, with no batch norm, the same
gradient as copies spread over workers), and each worker still reads only the shards of its piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vitlab.config import DataConfig
from vitlab.data.manifest import Manifest
from vitlab.data.positions import EpochPlan, Interval
from vitlab.data.transforms import build_randaugment, decode_train, decode_val, row_rng
from vitlab.errors import UserError

EpochSource = Any  # int, or an EpochClock actor handle


class EpochClock:
    """A tiny Ray actor holding the current epoch, read by the decode tasks (Ray Train re-runs one
    dataset per epoch, so the epoch cannot be baked into it), and, for positional streams, the epoch's
    ``EpochPlan`` as a dict (which positions are left and how they are laid out over the workers)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.plan_dict: dict | None = None

    def set(self, epoch: int, plan_dict: dict | None = None) -> None:
        self.epoch, self.plan_dict = epoch, plan_dict

    def get(self) -> int:
        return self.epoch

    def plan(self) -> dict | None:
        return self.plan_dict


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
    if isinstance(epoch, EpochPlan):
        return epoch.epoch
    import ray

    return int(ray.get(epoch.get.remote()))


def _current_plan(epoch: EpochSource) -> EpochPlan:
    if isinstance(epoch, EpochPlan):
        return epoch
    import ray

    found = ray.get(epoch.plan.remote())
    if found is None:
        raise RuntimeError("a positional train stream was read before the training loop set its epoch plan")
    return EpochPlan.from_dict(found)


def _read_shard(path: str):
    return pq.read_table(path, columns=["image", "label", "key"])


def _blocks(n: int, block_rows: int) -> Iterator[slice]:
    for start in range(0, n, block_rows):
        yield slice(start, min(n, start + block_rows))


def epoch_positions(start: int, rows: int, repeats: int, rank: int | None, world: int, total: int):
    """Which copies of a shard's rows one worker trains on this epoch: (row offsets into the shard's epoch
    order, repeat indices). The shard holds images start .. start+rows-1 of the epoch's sequence of ``total``
    images; ``rank`` None means every row once (the shared stream, split by Ray)."""
    if rank is None:
        return np.arange(rows), np.zeros(rows, dtype=np.int64)
    low, high = start * repeats, min((start + rows) * repeats, (total // world) * world)
    first = low + (rank - low) % world
    positions = np.arange(first, max(first, high), world)
    return positions // repeats - start, positions % repeats


def piece_rows(piece: list[Interval], start: int, rows: int, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """What a worker's piece of a positional stream takes from one shard, in the piece's order: (row offsets
    into the shard's epoch order, copy indices). The shard holds images start .. start+rows-1 of the epoch's
    order; under repeated augmentation position p is copy p % k of image p // k."""
    low, high = start * repeats, (start + rows) * repeats
    parts = [np.arange(max(lo, low), min(hi, high)) for lo, hi in piece if lo < high and hi > low]
    positions = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return positions // repeats - start, positions % repeats


def _decode_train_shards(
    batch: dict[str, np.ndarray], files: list[str], shard_rows: list[int], data: DataConfig, seed: int,
    epoch: EpochSource, rank: int | None = None, world: int = 1, positional: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    plan = _current_plan(epoch) if positional else None
    piece = plan.piece(rank) if plan is not None else None
    epoch_n = plan.epoch if plan is not None else _current_epoch(epoch)
    order = np.random.default_rng([seed & 0xFFFFFFFF, epoch_n]).permutation(len(files))
    starts = np.concatenate([[0], np.cumsum([shard_rows[s] for s in order])])  # of each shard, in epoch order
    augment = build_randaugment(data.randaugment, data.image_size, data.mean)
    size = data.image_size
    for idx in batch["shard"]:
        shard = int(order[int(idx)])
        if piece is not None:
            offsets, repeats = piece_rows(piece, int(starts[int(idx)]), shard_rows[shard], data.repeated_aug)
        else:
            offsets, repeats = epoch_positions(int(starts[int(idx)]), shard_rows[shard], data.repeated_aug, rank,
                                               world, int(starts[-1]))
        if not len(offsets):
            continue  # none of this worker's positions: the shard is not read
        table = _read_shard(files[shard])
        if table.num_rows != shard_rows[shard]:
            raise UserError(f"{files[shard]}: {table.num_rows} rows, the manifest says {shard_rows[shard]} "
                            "(the dataset changed after it was prepared; prepare it again)")
        rows = np.random.default_rng([seed & 0xFFFFFFFF, epoch_n, shard]).permutation(table.num_rows)[offsets]
        images, labels, keys = (table.column(c).to_pylist() for c in ("image", "label", "key"))
        for part in _blocks(len(rows), data.block_rows):
            take, copy = rows[part], repeats[part]
            out = np.empty((len(take), size, size, 3), dtype=np.uint8)
            for j, (r, k) in enumerate(zip(take, copy, strict=True)):
                rng = row_rng(seed, epoch_n, keys[r], int(k))
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


def train_dataset(manifest: Manifest, data: DataConfig, seed: int = 0, epoch: EpochSource = 0,
                  rank: int | None = None, world: int = 1, positional: bool = False):
    """The train split: RandomResizedCrop + flip (+ RandAugment), reshuffled per epoch; with ``rank``, the one
    worker's stream: of repeated augmentation, or, ``positional``, its piece of the epoch plan (in order).
    Each decode task reserves data.decode_cpus."""
    files = manifest.files("train")
    ds = _shard_indices(len(files), data.deterministic or positional)
    return ds.map_batches(
        _decode_train_shards,
        batch_size=1,
        num_cpus=data.decode_cpus,
        fn_kwargs={"files": files, "shard_rows": manifest.shard_rows("train"), "data": data, "seed": seed,
                   "epoch": epoch, "rank": rank, "world": world, "positional": positional},
    )


def train_key(data: DataConfig, rank: int, positional: bool = False) -> str:
    """The name of the train dataset a worker reads: one shared stream, or its own under repeated_aug or
    when the stream is positional (mid-epoch checkpoints: see data/positions.py)."""
    return "train" if data.repeated_aug == 1 and not positional else f"train_{rank}"


def train_datasets(manifest: Manifest, data: DataConfig, seed: int, epoch: EpochSource, world: int,
                   positional: bool = False):
    """The trainer's train datasets by name (see ``train_key``)."""
    if data.repeated_aug == 1 and not positional:
        return {"train": train_dataset(manifest, data, seed, epoch)}
    return {train_key(data, r, positional): train_dataset(manifest, data, seed, epoch, r, world, positional)
            for r in range(world)}


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
