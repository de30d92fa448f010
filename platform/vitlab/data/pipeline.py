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
* With ``data.back_to_back`` (the default) the shared stream runs epochs back to back: one execution covers
  ``Span.epochs`` epochs (at least SPAN_IMAGES images; one epoch of ImageNet), each cut at the source to its
  first whole optimizer steps, and every worker takes exactly its steps per epoch from it. Restarting an
  execution per epoch cost a third of a 1,000-image epoch here. A span's decode runs in a pool of actors, each
  with a second task queued behind the one it runs (``SpanDecoder``).
* Ray's costs are per task and per block, not per image: a task takes enough shards for a block of
  ``data.block_rows`` (512) rows, and yields blocks of that size across its shards.

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

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vitlab.config import DataConfig, JobConfig
from vitlab.data.manifest import Manifest
from vitlab.data.positions import EpochPlan, Interval
from vitlab.data.transforms import build_randaugment, decode_train, decode_val, row_rng
from vitlab.errors import UserError

EpochSource = Any  # int, or an EpochClock actor handle
# The shared stream runs epochs back to back in one Ray Data execution until it has this many images: restarting
# an execution costs about 0.3 s (start, first results, the last tasks' tail), a third of a 1,000-image epoch here.
SPAN_IMAGES = 100_000


@dataclass(frozen=True)
class Span:
    """The shared train stream's epochs per execution: ``epochs`` epochs of ``images`` images each (the first
    ``images`` positions of each epoch's order: whole optimizer steps of every worker), none at or past ``last``
    (the run's epoch count). The execution's first epoch is the epoch source's value when it starts."""

    epochs: int
    images: int
    last: int

    @classmethod
    def plan(cls, rows: int, batch_size: int, world: int, accum: int, last: int) -> Span | None:
        """The span of a shared stream over ``rows`` images, ``batch_size`` a step of ``world`` workers (None
        when an epoch holds no whole step: then each epoch is its own execution, as before)."""
        per_worker = batch_size // world
        steps = (rows // world) // max(per_worker, 1) // accum
        if steps < 1 or per_worker < 1:
            return None
        images = steps * accum * per_worker * world
        return cls(max(1, min(last, -(-SPAN_IMAGES // images))), images, last)


def shared_span(cfg: JobConfig, rows: int) -> Span | None:
    """The span of a job's shared train stream (None for per-worker streams: repeated augmentation, positional)."""
    if not cfg.data.back_to_back or cfg.positional_stream or cfg.data.repeated_aug > 1:
        return None
    return Span.plan(rows, cfg.train.batch_size, cfg.scaling.max_workers, cfg.optim.accum_steps, cfg.train.epochs)


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
    """One shard's rows. ParquetFile on one thread: the task already has its core; read_table's dataset discovery
    and pyarrow's thread pool cost 6x the CPU of the read itself (measured: 1.9 vs 0.3 ms per 72-row shard)."""
    columns = ["image", "label", "key"]
    if "://" in path:
        return pq.read_table(path, columns=columns, use_threads=False)
    return pq.ParquetFile(path).read(columns=columns, use_threads=False)


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


def _epoch_rows(
    batch: dict[str, np.ndarray], files: list[str], shard_rows: list[int], data: DataConfig, seed: int,
    epoch: EpochSource, rank: int | None, world: int, positional: bool, span: Span | None,
) -> Iterator[tuple[int, list[bytes], list[int], np.ndarray, np.ndarray]]:
    """The train rows of a task's shards, block by block, in the epoch's order: (epoch, the block's JPEG bytes,
    labels, row keys, copy indices); the shards and rows of this worker's stream only."""
    plan = _current_plan(epoch) if positional else None
    piece = plan.piece(rank) if plan is not None else None
    first = plan.epoch if plan is not None else _current_epoch(epoch)
    orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> its shard order, each shard's first position
    for idx, k in zip(*_items(batch, len(files)), strict=True):
        epoch_n = first + int(k)
        if span is not None and epoch_n >= span.last:
            continue  # past the run's last epoch: the span ends there
        if epoch_n not in orders:
            order = np.random.default_rng([seed & 0xFFFFFFFF, epoch_n]).permutation(len(files))
            orders[epoch_n] = order, np.concatenate([[0], np.cumsum([shard_rows[s] for s in order])])
        order, starts = orders[epoch_n]
        shard, start = int(order[int(idx)]), int(starts[int(idx)])
        if piece is not None:
            offsets, repeats = piece_rows(piece, start, shard_rows[shard], data.repeated_aug)
        elif span is not None:  # the epoch's first span.images positions
            offsets = np.arange(min(shard_rows[shard], max(0, span.images - start)))
            repeats = np.zeros(len(offsets), dtype=np.int64)
        else:
            offsets, repeats = epoch_positions(start, shard_rows[shard], data.repeated_aug, rank, world,
                                               int(starts[-1]))
        if not len(offsets):
            continue  # none of this worker's positions: the shard is not read
        table = _read_shard(files[shard])
        if table.num_rows != shard_rows[shard]:
            raise UserError(f"{files[shard]}: {table.num_rows} rows, the manifest says {shard_rows[shard]} "
                            "(the dataset changed after it was prepared; prepare it again)")
        rows = np.random.default_rng([seed & 0xFFFFFFFF, epoch_n, shard]).permutation(table.num_rows)[offsets]
        images, labels, keys = (table.column(c).to_pylist() for c in ("image", "label", "key"))
        for part in _blocks(len(rows), data.block_rows):
            take = rows[part]
            yield (epoch_n, [images[r] for r in take], [labels[r] for r in take], [keys[r] for r in take],
                   repeats[part])


def _decode_train_shards(
    batch: dict[str, np.ndarray], files: list[str], shard_rows: list[int], data: DataConfig, seed: int,
    epoch: EpochSource, rank: int | None = None, world: int = 1, positional: bool = False, span: Span | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    augment = build_randaugment(data.randaugment, data.image_size, data.mean)
    size, rows = data.image_size, data.block_rows
    out, labels_out = np.empty((rows, size, size, 3), dtype=np.uint8), []
    # Blocks of block_rows whatever the shards' sizes (a task may take several small shards): fewer, larger
    # blocks cost the consumer less (no concatenation for a batch inside one block).
    for epoch_n, images, labels, keys, copies in _epoch_rows(batch, files, shard_rows, data, seed, epoch, rank,
                                                              world, positional, span):
        for image, label, key, k in zip(images, labels, keys, copies, strict=True):
            out[len(labels_out)] = decode_train(image, size, row_rng(seed, epoch_n, key, int(k)), data.scale,
                                                data.ratio, data.hflip, augment, data.interpolation)
            labels_out.append(label)
            if len(labels_out) == rows:
                yield {"image": out, "label": np.asarray(labels_out, dtype=np.int64)}
                out, labels_out = np.empty((rows, size, size, 3), dtype=np.uint8), []
    if labels_out:
        yield {"image": out[:len(labels_out)], "label": np.asarray(labels_out, dtype=np.int64)}


def _decode_val_shards(
    batch: dict[str, np.ndarray], files: list[str], data: DataConfig
) -> Iterator[dict[str, np.ndarray]]:
    size = data.image_size
    for idx in _items(batch, len(files))[0]:
        table = _read_shard(files[int(idx)])
        images, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
        for part in _blocks(len(images), data.block_rows):
            out = np.stack([decode_val(b, size, data.crop_pct, data.interpolation) for b in images[part]])
            yield {"image": out, "label": labels[part].astype(np.int64)}


def _shard_indices(n: int, deterministic: bool, epochs: int = 1, per_task: int = 1):
    """One row per shard and epoch: ``id`` = k * n + (the shard's position in its epoch's order), k the epoch's
    offset from the execution's first (see ``_items``); a block per row, so a task takes ``per_task`` of them."""
    import ray

    ds = ray.data.from_items([{"id": i} for i in range(n * epochs)], override_num_blocks=max(1, n * epochs))
    if deterministic:
        ds.context.execution_options.preserve_order = True
    return ds


def _items(batch: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard positions, epoch offsets) of a task's rows of ``_shard_indices``."""
    if "shard" in batch:  # called directly (tests): shard positions of one epoch
        return batch["shard"], batch.get("k", np.zeros(len(batch["shard"]), dtype=np.int64))
    ids = np.asarray(batch["id"])
    return ids % n, ids // n


def shards_per_task(shard_rows: list[int], block_rows: int) -> int:
    """Shards one decode task takes: enough for a block of block_rows (one for ImageNet's 1,024-row shards).
    Ray's cost per task and block does not depend on its rows: measured here, 72-row tasks and blocks took
    1.10 ms of CPU per image in all (workers and consumer), 250-row ones 0.92, 512-row blocks 0.79."""
    mean = sum(shard_rows) / max(len(shard_rows), 1)
    return max(1, math.ceil(block_rows / max(mean, 1)))


def train_dataset(manifest: Manifest, data: DataConfig, seed: int = 0, epoch: EpochSource = 0,
                  rank: int | None = None, world: int = 1, positional: bool = False, span: Span | None = None):
    """The train split: RandomResizedCrop + flip (+ RandAugment), reshuffled per epoch; with ``rank``, the one
    worker's stream: of repeated augmentation, or, ``positional``, its piece of the epoch plan (in order); with
    ``span`` (the shared stream), span.epochs epochs per execution. Each decode task reserves data.decode_cpus."""
    files = manifest.files("train")
    per_task = shards_per_task(manifest.shard_rows("train"), data.block_rows)
    ds = _shard_indices(len(files), data.deterministic or positional, span.epochs if span is not None else 1,
                        per_task)
    decode = _encoded_train_shards if data.decode == "gpu" else _decode_train_shards  # gpu: data/gpu_decode.py
    kwargs = {"files": files, "shard_rows": manifest.shard_rows("train"), "data": data, "seed": seed,
              "epoch": epoch, "rank": rank, "world": world, "positional": positional, "span": span}
    if span is None:
        return ds.map_batches(decode, batch_size=per_task, num_cpus=data.decode_cpus, fn_kwargs=kwargs)
    return ds.map_batches(SpanDecoder, fn_constructor_kwargs={"decode": decode}, fn_kwargs=kwargs,
                          batch_size=per_task, num_cpus=data.decode_cpus, compute=_span_actors())


class SpanDecoder:
    """A span's decode, in actors that live as long as its execution. Ray Data notices a finished task only
    at its next poll (every 0.1 s), so a pool of tasks leaves each CPU idle between one task and the next; an
    actor with a second task queued behind the one it runs goes straight on (measured on 2 cores: 1,770 img/s
    with tasks, 2,390-2,610 with these actors). The pool grows to the CPUs Ray Data's budget gives it."""

    def __init__(self, decode):
        self.decode = decode

    def __call__(self, batch: dict[str, np.ndarray], **kwargs) -> Iterator[dict[str, np.ndarray]]:
        yield from self.decode(batch, **kwargs)


def _span_actors():
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=1, max_size=None, max_tasks_in_flight_per_actor=2)


def train_key(data: DataConfig, rank: int, positional: bool = False) -> str:
    """The name of the train dataset a worker reads: one shared stream, or its own under repeated_aug or
    when the stream is positional (mid-epoch checkpoints: see data/positions.py)."""
    return "train" if data.repeated_aug == 1 and not positional else f"train_{rank}"


def train_datasets(manifest: Manifest, data: DataConfig, seed: int, epoch: EpochSource, world: int,
                   positional: bool = False, span: Span | None = None):
    """The trainer's train datasets by name (see ``train_key``); ``span``, the shared stream's."""
    if data.repeated_aug == 1 and not positional:
        return {"train": train_dataset(manifest, data, seed, epoch, span=span)}
    return {train_key(data, r, positional): train_dataset(manifest, data, seed, epoch, r, world, positional)
            for r in range(world)}


def val_dataset(manifest: Manifest, data: DataConfig, beside_span: tuple[int, list[str]] | None = None):
    """The val split: resize the shorter side to image_size / crop_pct, center-crop, fixed order.

    ``beside_span`` = (tasks, node ids): validation beside a train span, whose decode actors hold their CPUs
    while it runs (idle: the span waits for the loop). Tasks that asked for CPUs as well would wait for ever on a
    full node, or make an autoscaling cluster add one; so at most ``tasks`` of them run at a time, ask for no
    CPU, and run only on these nodes (the Train workers')."""
    files = manifest.files("val")
    per_task = shards_per_task(manifest.shard_rows("val"), data.block_rows)
    ds = _shard_indices(len(files), True, 1, per_task)
    kwargs = {"files": files, "data": data}
    if beside_span is None:
        return ds.map_batches(_decode_val_shards, batch_size=per_task, num_cpus=data.decode_cpus, fn_kwargs=kwargs)
    import ray.data

    tasks, nodes = beside_span
    return ds.map_batches(_decode_val_shards, batch_size=per_task, num_cpus=0, fn_kwargs=kwargs,
                          compute=ray.data.TaskPoolStrategy(size=tasks),
                          label_selector={"ray.io/node-id": f"in({','.join(sorted(set(nodes)))})"})


def normalize_on_device(images, mean, std, device=None, channels_last: bool = False):
    """uint8 NHWC batch -> float NCHW on ``device``, (x/255 - mean) / std computed there."""
    import torch

    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = x.sub_(m).div_(s)
    # permute() of NHWC already gives channels_last strides; make it contiguous in the layout asked for.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _encoded_train_shards(
    batch: dict[str, np.ndarray], files: list[str], shard_rows: list[int], data: DataConfig, seed: int,
    epoch: EpochSource, rank: int | None = None, world: int = 1, positional: bool = False, span: Span | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``data.decode: gpu``: the rows ``_decode_train_shards`` decodes, in its order, left encoded: each image's
    JPEG bytes, the crop box (left, top, right, bottom) and the flip drawn from its row_rng as ``decode_train``
    draws them (the same crops), and the label. The training device decodes them (data/gpu_decode.py)."""
    from vitlab.data.transforms import image_size_of, random_resized_crop_box

    for epoch_n, images, labels, keys, copies in _epoch_rows(batch, files, shard_rows, data, seed, epoch, rank,
                                                              world, positional, span):
        boxes, flips = np.empty((len(images), 4), dtype=np.int32), np.empty(len(images), dtype=bool)
        for j, (image, key, k) in enumerate(zip(images, keys, copies, strict=True)):
            rng = row_rng(seed, epoch_n, key, int(k))
            boxes[j] = random_resized_crop_box(*image_size_of(image), data.scale, data.ratio, rng)
            flips[j] = rng.random() < data.hflip
        encoded = np.empty(len(images), dtype=object)
        encoded[:] = images
        yield {"jpeg": encoded, "box": boxes, "flip": flips, "label": np.asarray(labels, dtype=np.int64)}
