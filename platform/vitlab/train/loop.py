"""train_loop_per_worker: the seed's DDP loop, grown up. Reads top to bottom:

set up -> restore (Ray's latest checkpoint, or --resume-from) -> for each epoch: train steps, evaluate,
report metrics + checkpoint through ray.train.report (a barrier every worker reaches). The epoch metrics
reach MLflow from the Train controller (train/callbacks.py); rank 0 logs the per-step curve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from vitlab import logs
from vitlab import model as models
from vitlab.config import JobConfig
from vitlab.data.pipeline import normalize_on_device, train_key
from vitlab.progress import TrainProgress
from vitlab.train import state as ckpt
from vitlab.train.optim import (
    batch_augment,
    build_eraser,
    build_loss,
    build_mixup,
    build_optimizer,
    build_schedule,
    effective_lr,
)
from vitlab.train.profile import StepProfiler
from vitlab.train.steplog import StepLogger

log = logging.getLogger("vitlab.train")

MAX_CONFUSION_CLASSES = 100
OWN_CHECKPOINT = "latest checkpoint of this run"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss; carries the global step."""


@dataclass
class LoopInputs:
    """What every worker needs beside the JobConfig: facts of the dataset and of this run, no settings."""

    num_classes: int
    train_rows: int
    tracking_uri: str | None  # the MLflow run rank 0 logs step metrics to (None: no step logging)
    run_id: str | None
    resume_from: str | None  # --resume-from, used when the run has no checkpoint of its own
    epoch_clock: Any  # EpochClock actor handle
    init_weights: Any = None  # ObjectRef of model.init_from's adapted state_dict (fresh runs start from it)
    label: str = ""  # before rank 0's lines: "trial <id>: " in a sweep, where several runs print at once


@dataclass
class Watchers:
    """What rank 0 does beside training, each None when off (and on every other rank): live step metrics to
    MLflow, progress lines, the profiler's window."""

    logger: StepLogger | None = None
    progress: TrainProgress | None = None
    profiler: StepProfiler | None = None

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.finish()
        if self.logger is not None:
            self.logger.close()


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model, batches, optimizer, schedule, scaler, loss_fn, augment, ema, cfg: JobConfig, device,
                    step: int, epoch: int, watch: Watchers) -> tuple[dict[str, float], int]:
    """One pass over this worker's shard; ``ema`` (or None) follows every optimizer step. Returns (metrics
    summed over workers, new optimizer step)."""
    model.train()
    logger, progress, profiler = watch.logger, watch.progress, watch.profiler
    epoch_first_step = step
    if progress is not None:
        progress.start_epoch()
    accum = cfg.optim.accum_steps
    loss_sum = correct = seen = 0.0
    wait_s = 0.0
    lr = schedule(step)
    start = tick = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for micro, batch in enumerate(batches):
        now = time.perf_counter()
        waited = now - tick
        wait_s += waited
        if profiler is not None:
            profiler.before_step(step)
        images = normalize_on_device(batch["image"], cfg.data.mean, cfg.data.std, device, cfg.train.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        images, targets = augment(images, labels)  # random erasing, mixup/cutmix
        last_micro = (micro + 1) % accum == 0
        # Under accumulation, skip DDP's gradient all-reduce on all but the last micro-batch.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(cfg.train.precision, device):
                logits = model(images)
                loss = loss_fn(logits, targets)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_value = loss.detach().float().item()
        if last_micro:
            if scaler is not None:
                scaler.unscale_(optimizer)
            # The grad norm is computed on all-reduced gradients, so every worker sees the same value and a
            # NaN from any worker stops all of them at the same step (no worker left waiting in a collective).
            max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if not math.isfinite(loss_value) or not torch.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (epoch {epoch}): loss={loss_value}, grad_norm={grad_norm}"
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(ckpt.unwrap(model), step=step)
            lr = schedule.apply(optimizer, step)
            if logger is not None and step % cfg.train.log_every_steps == 0:
                logger.add({"train_loss_step": loss_value, "lr_step": lr}, step)
            if profiler is not None:
                profiler.after_step(step)
        elif not math.isfinite(loss_value):
            raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}): loss={loss_value}")
        n = labels.shape[0]
        if progress is not None:
            progress.add(n, waited, loss_value)
            line = progress.line(epoch + 1, step - epoch_first_step, lr)
            if line:
                log.info("%s%s", progress.label, line)
        loss_sum += loss_value * n
        seen += n
        correct += (logits.detach().argmax(1) == labels).sum().item()
        tick = time.perf_counter()
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen, wait_s, elapsed_max = _all_reduce_sum([loss_sum, correct, seen, wait_s, elapsed],
                                                                   device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    epoch_s = elapsed_max / world  # mean over workers
    return {
        "train_loss": loss_sum / max(1, seen),
        "train_top1": correct / max(1, seen),  # against hard labels (approximate under mixup)
        "lr": lr,
        "epoch_time_s": epoch_s,
        "images_per_s": seen / max(1e-9, epoch_s),  # global: all workers' images over the epoch time
        "data_wait": wait_s / max(1e-9, elapsed_max),
        "train_images": seen,
    }, step


@torch.no_grad()
def evaluate(models: dict[str, Any], batches, cfg: JobConfig, device, num_classes: int,
             confusion_of: str = "") -> tuple[dict[str, float], Any]:
    """Val loss, top-1 and top-5 of each model on the same batches (decoded once), from counts summed over
    workers: exact whatever the shard sizes. ``models`` maps a metric suffix to a model ("" for the live
    weights, "_ema" for the EMA); the confusion matrix is the one of ``models[confusion_of]``."""
    for m in models.values():
        m.eval()
    k = min(5, num_classes)
    sums = {suffix: [0.0, 0.0, 0.0] for suffix in models}  # loss, top-1, top-5
    seen = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device) \
        if num_classes <= MAX_CONFUSION_CLASSES else None
    for batch in batches:
        images = normalize_on_device(batch["image"], cfg.data.mean, cfg.data.std, device, cfg.train.channels_last)
        labels = batch["label"].to(device)
        seen += labels.shape[0]
        for suffix, m in models.items():
            with _autocast(cfg.train.precision, device):
                logits = m(images)
            logits = logits.float()
            topk = logits.topk(k, dim=1).indices
            sums[suffix][0] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[suffix][1] += (topk[:, 0] == labels).sum().item()
            sums[suffix][2] += (topk == labels[:, None]).any(dim=1).sum().item()
            if confusion is not None and suffix == confusion_of:
                idx = labels * num_classes + topk[:, 0]
                confusion += torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes).double()
    totals = _all_reduce_sum([seen, *(v for suffix in models for v in sums[suffix])], device)
    seen, values = max(1.0, totals[0]), iter(totals[1:])
    if confusion is not None and dist.is_initialized():
        dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
    metrics = {"val_images": totals[0]}
    for suffix in models:
        for name in ("val_loss", "val_top1", "val_top5"):
            metrics[name + suffix] = next(values) / seen
    return metrics, (confusion.cpu().numpy().astype(np.int64) if confusion is not None else None)


def _gather_rng() -> list[dict[str, Any]]:
    states = [ckpt.rng_state()]
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states[0])
        return gathered
    return states


def _build_ema(cfg: JobConfig, model, saved: dict[str, Any] | None, rank: int):
    """timm's ModelEmaV3 of the (DDP-synchronised) weights, or None when train.ema_decay is 0; a restored run
    takes the EMA weights its checkpoint holds."""
    if not cfg.train.ema_decay:
        return None
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    if saved is not None and saved.get("model_ema") is not None:
        ema.module.load_state_dict(saved["model_ema"])
        if rank == 0:
            log.warning("EMA weights restored (epoch %d done)", int(saved["epoch"]))
    elif saved is not None and rank == 0:
        log.warning("the restored checkpoint holds no EMA weights: the EMA starts from the restored weights")
    return ema


def _watchers(cfg: JobConfig, inputs: LoopInputs, rank: int, world: int, steps_per_epoch: int) -> Watchers:
    """Rank 0's step metrics, progress lines and profiler, as the job asks."""
    logger = StepLogger(inputs.tracking_uri, inputs.run_id, cfg.tracking.system_metrics) if inputs.run_id else None
    progress = TrainProgress(cfg.train.epochs, steps_per_epoch, world, cfg.train.log_every_seconds,
                             inputs.label) if cfg.train.log_every_seconds else None
    window = cfg.train.profile_steps
    profiler = StepProfiler(window[0], window[1], inputs.tracking_uri, inputs.run_id) if window else None
    return Watchers(logger, progress, profiler)


ITERATOR_STATS = {"data_blocked_s": "iter_total_blocked_s", "data_user_s": "iter_user_s"}


def _iterator_stats(shard, before: dict[str, float] | None = None) -> dict[str, float]:
    """Ray Data's own iterator counters of this worker's shard, as Ray's image-classification release benchmark
    reads them: seconds blocked waiting for a batch, seconds in the training code between batches, batches.
    Cumulative in the iterator; with ``before``, this epoch's share. Empty when this Ray does not keep them."""
    stats = getattr(shard, "_iter_stats", None)
    if stats is None:
        return {}
    now = {key: float(getattr(stats, attr).get()) for key, attr in ITERATOR_STATS.items()}
    now["data_batches"] = float(stats.iter_batches_total)
    if before is None:
        return now
    return {key: value - before.get(key, 0.0) for key, value in now.items()}


def _restore_point(inputs: LoopInputs):
    """Ray's latest checkpoint of this run (resume, or restart after a failure) wins over --resume-from."""
    found = ray.train.get_checkpoint()
    if found is not None:
        return found, OWN_CHECKPOINT
    if inputs.resume_from:
        return ray.train.Checkpoint(inputs.resume_from), f"--resume-from {inputs.resume_from}"
    return None, ""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: JobConfig = config["job"]
    inputs: LoopInputs = config["inputs"]
    logs.mark_worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed((cfg.train.seed + rank) % 2**32)
    random.seed(cfg.train.seed + rank)  # timm's RandomErasing draws from Python's random

    # -- set up ----------------------------------------------------------------------------------------
    model = models.build(cfg, inputs.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.train.batch_size
    per_worker = global_batch // world
    steps_per_epoch = max(1, (inputs.train_rows // world) // per_worker // cfg.optim.accum_steps)
    base_lr = effective_lr(cfg.optim, global_batch * cfg.optim.accum_steps)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    schedule = build_schedule(cfg.optim, base_lr, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
    mixup = build_mixup(cfg.optim, inputs.num_classes)
    loss_fn = build_loss(cfg.optim, mixup)
    augment = batch_augment(build_eraser(cfg.data, device), mixup)

    # -- restore (or start from model.init_from) ----------------------------------------------------------
    start_epoch, step, saved = 0, 0, None
    checkpoint, origin = _restore_point(inputs)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = ckpt.load_state(d)
        ckpt.restore(saved, model, optimizer, scaler, rank)
        start_epoch, step = int(saved["epoch"]), int(saved["step"])
        if rank == 0:
            log.warning("%srestored from %s: epoch %d done, continuing at epoch %d (step %d)",
                        inputs.label, origin, start_epoch, start_epoch + 1, step)
    elif inputs.init_weights is not None:
        model.load_state_dict(ray.get(inputs.init_weights), strict=True)  # adapted and checked by the driver
    schedule.apply(optimizer, step)

    model = ray.train.torch.prepare_model(model)
    ema = _build_ema(cfg, ckpt.unwrap(model), saved, rank)
    if cfg.train.compile:
        model = torch.compile(model)
    watch = _watchers(cfg, inputs, rank, world, steps_per_epoch) if rank == 0 else Watchers()
    if rank == 0:
        ray.get(inputs.epoch_clock.set.remote(start_epoch))
    if dist.is_initialized():
        dist.barrier()  # every worker starts reading only once the epoch clock is set

    train_shard = ray.train.get_dataset_shard(train_key(cfg.data, rank))
    val_shard = ray.train.get_dataset_shard("val")
    eval_batch = (cfg.train.eval_batch_size or global_batch) // world

    # -- epochs ----------------------------------------------------------------------------------------
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            iter_before = _iterator_stats(train_shard)
            shuffle_seed = (cfg.train.seed * 1_000_003 + epoch * 1009 + rank) % 2**32
            batches = train_shard.iter_torch_batches(
                batch_size=per_worker, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=shuffle_seed if cfg.data.shuffle_buffer else None,
            )
            train_metrics, step = train_one_epoch(model, batches, optimizer, schedule, scaler, loss_fn, augment,
                                                  ema, cfg, device, step, epoch, watch)
            train_metrics.update(_iterator_stats(train_shard, before=iter_before))
            evaluated = {"": ckpt.unwrap(model), **({"_ema": ema.module} if ema is not None else {})}
            val_metrics, confusion = evaluate(
                evaluated, val_shard.iter_torch_batches(batch_size=max(1, eval_batch),
                                                        prefetch_batches=cfg.data.prefetch_batches),
                cfg, device, inputs.num_classes, confusion_of=cfg.run.best_by.removeprefix("val_top1"),
            )
            done = epoch + 1
            metrics = {"epoch": done, "step": step, **train_metrics, **val_metrics}
            rng_states = _gather_rng()  # a collective: every rank calls it
            save = done % cfg.run.checkpoint_every == 0 or done == cfg.train.epochs
            checkpoint, checkpoint_dir = None, None
            if rank == 0:
                ray.get(inputs.epoch_clock.set.remote(done))  # before the report barrier: next epoch's crops
                log.info(
                    "%sepoch %d/%d: train loss %.4f, val loss %.4f, val top-1 %.4f, top-5 %.4f, %.0f img/s, "
                    "data wait %.0f%%", inputs.label, done, cfg.train.epochs, metrics["train_loss"],
                    metrics["val_loss"], metrics["val_top1"], metrics["val_top5"], metrics["images_per_s"],
                    100 * metrics["data_wait"],
                )
                if save:
                    checkpoint_dir = ckpt.write_checkpoint_dir(
                        model=model, ema=ema, optimizer=optimizer, scaler=scaler, epoch=done, step=step,
                        config_yaml=cfg.to_yaml(), metrics=metrics, rng_states=rng_states, confusion=confusion,
                    )
                    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
            ray.train.report(metrics, checkpoint=checkpoint)
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted to run storage by now
            if watch.progress is not None:
                watch.progress.end_epoch()
    finally:
        watch.close()
