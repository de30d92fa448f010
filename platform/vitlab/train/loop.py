"""worker_loop: the seed's DDP loop, grown up. Reads top to bottom:

set up -> restore (Ray's latest checkpoint, or --resume-from) -> for each epoch: train steps, evaluate,
report metrics + checkpoint through ray.train.report (a barrier every worker reaches). The epoch metrics
reach MLflow from the Train controller (train/callbacks.py); rank 0 logs the per-step curve.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from timm.utils import ModelEmaV3

from vitlab import logs
from vitlab import model as models
from vitlab.config import JobConfig
from vitlab.data.gpu_decode import check_decode_device, encoded_batches
from vitlab.data.pipeline import shared_span, train_key
from vitlab.data.positions import EpochPlan
from vitlab.progress import TrainProgress
from vitlab.train import state as ckpt
from vitlab.train import storage
from vitlab.train.callbacks import PREEMPTION_NOTICE, epoch_row
from vitlab.train.epoch import (
    EpochTally,
    MidEpochCheckpoints,
    PreemptionChecks,
    StepLayout,
    Watchers,
    check_whole_epoch,
    evaluate,
    micro_batches,
    train_one_epoch,
)
from vitlab.train.inputs import LoopInputs
from vitlab.train.optim import (
    batch_augment,
    build_eraser,
    build_loss,
    build_mixup,
    build_optimizer,
    build_schedule,
    effective_lr,
)
from vitlab.train.outbox import Outbox, deliver
from vitlab.train.profile import StepProfiler
from vitlab.train.steplog import StepLogger

log = logging.getLogger("vitlab.train")

OWN_CHECKPOINT = "latest checkpoint of this run"
# A mid-epoch checkpoint's score for keep-best-k: below every accuracy (and finite: Ray keeps the scores as JSON).
MID_EPOCH_SCORE = -1.0
UPLOAD_MODES = {"sync": CheckpointUploadMode.SYNC, "async": CheckpointUploadMode.ASYNC}


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


def _report_checkpoint(metrics: dict[str, Any], cfg: JobConfig, rank: int, write: dict[str, Any] | None,
                       upload: str | None = None, steps: StepLogger | None = None) -> float:
    """ray.train.report on every worker (a barrier), with the checkpoint rank 0 writes from ``write`` (the
    keyword arguments of state.write_checkpoint_dir), or none. Returns the seconds training waited for it.

    run.checkpoint_upload=async: Ray uploads the checkpoint in a thread of the worker and deletes the local copy
    when done, so the step after it does not wait on the storage (S3 on a cluster); the controller hears of the
    report (MLflow's epoch row, keep-best-k) once the upload is through. sync (or ``upload="sync"``, as for a
    just-in-time checkpoint that must be in storage before a deadline): report returns after the upload."""
    start = time.perf_counter()
    checkpoint, checkpoint_dir = None, None
    if rank == 0 and write is not None:
        if steps is not None:
            steps.before_checkpoint()
        checkpoint_dir = ckpt.write_checkpoint_dir(**write)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
    mode = UPLOAD_MODES[upload or cfg.run.checkpoint_upload]
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode)
    if write is not None:
        write["epoch_rows"].clear()  # this checkpoint covers them: the next one's rows start here
    if checkpoint_dir is not None and mode is CheckpointUploadMode.SYNC:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted to run storage by now
    return time.perf_counter() - start


def _save_mid_epoch(steps_done: int, step: int, totals: EpochTally, preempted: str | None = None, *,
                    plan: EpochPlan, done_before: int, cfg: JobConfig, rank: int, label: str,
                    parts: dict[str, Any], steps: StepLogger | None = None) -> None:
    """A mid-epoch checkpoint (``preempted``: a just-in-time one, at a preemption notice or right before its
    deadline): the state, where the epoch stands (the plan of the positions left) and the epoch's sums so far.
    Ranked below every end-of-epoch checkpoint, so keep-best-k keeps it only while it is the latest."""
    rng_states = _gather_rng()  # a collective: every rank calls it
    position = plan.after(steps_done - done_before)
    metrics = {"epoch": plan.epoch, "step": step, "epoch_step": steps_done, "mid_epoch": 1,
               cfg.run.best_by: MID_EPOCH_SCORE, **({PREEMPTION_NOTICE: 1} if preempted == "checkpoint" else {})}
    write = dict(parts, epoch=plan.epoch, step=step, config_yaml=cfg.to_yaml(), metrics=metrics,
                 rng_states=rng_states, confusion=None,
                 position={"plan": position.to_dict(), "epoch_step": steps_done, "tally": totals.as_list(),
                           "tally_world": plan.world, "preempted": bool(preempted)})
    upload = "sync" if preempted else cfg.run.checkpoint_upload  # in storage before the deadline
    paused = _report_checkpoint(metrics, cfg, rank, write, upload, steps)
    if rank == 0:
        log.info("%s%scheckpoint in epoch %d at step %d of %d (training paused %.2f s, upload %s)", label,
                 "just-in-time " if preempted else "", plan.epoch + 1, steps_done, steps_done + position.steps,
                 paused, upload)


def _restored_position(saved: dict[str, Any] | None, cfg: JobConfig, world: int, step_images: int, rank: int,
                       label: str) -> tuple[EpochPlan | None, int, EpochTally | None]:
    """Where a mid-epoch checkpoint left its epoch, laid out over this run's workers: (plan, optimizer steps
    done in the epoch, this worker's share of the epoch's sums); (None, 0, None) to start the epoch afresh."""
    position = (saved or {}).get("position")
    if position is None:
        return None, 0, None
    plan = EpochPlan.from_dict(position["plan"])
    if not cfg.positional_stream or plan.step_images != step_images:
        if rank == 0:
            log.warning("%sthe checkpoint is inside epoch %d, but this run %s: the epoch starts again from its "
                        "first image", label, plan.epoch + 1, "has run.checkpoint_every_steps off"
                        if not cfg.positional_stream else f"trains {step_images} images per optimizer step, "
                        f"not {plan.step_images}")
        return None, 0, None
    tally = EpochTally.resumed(position["tally"], int(position["tally_world"]), rank)
    return plan.on(world), int(position["epoch_step"]), tally


def worker_loop(config: dict[str, Any]) -> None:
    cfg: JobConfig = config["job"]
    inputs: LoopInputs = config["inputs"]
    logs.mark_worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.data.decode == "gpu":
        check_decode_device(device)  # before any work: preflight cannot see a cluster's workers
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed((cfg.train.seed + rank) % 2**32)
    random.seed(cfg.train.seed + rank)  # timm's RandomErasing draws from Python's random

    # -- set up ----------------------------------------------------------------------------------------
    model = models.build(cfg, inputs.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.train.batch_size
    per_worker = global_batch // world
    step_images = global_batch * cfg.optim.accum_steps  # one optimizer step, all workers together
    # A positional stream (mid-epoch checkpoints) trains rows // step_images steps on any worker count.
    steps_per_epoch = max(1, inputs.train_rows // step_images if cfg.positional_stream else
                          (inputs.train_rows // world) // per_worker // cfg.optim.accum_steps)
    base_lr = effective_lr(cfg.optim, step_images)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    schedule = build_schedule(cfg.optim, base_lr, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
    mixup = build_mixup(cfg.optim, inputs.num_classes)
    loss_fn = build_loss(cfg.optim, mixup)
    augment = batch_augment(build_eraser(cfg.data, device), mixup)

    # -- restore (or start from model.init_from) ----------------------------------------------------------
    start_epoch, step, saved, covered = 0, 0, None, []
    checkpoint, origin = _restore_point(inputs)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = ckpt.load_state(d)
            covered = ckpt.load_epoch_rows(d) if origin == OWN_CHECKPOINT else []  # not a donor's epochs
        ckpt.restore(saved, model, optimizer, scaler, rank)
        start_epoch, step = int(saved["epoch"]), int(saved["step"])
    elif inputs.init_weights is not None:
        model.load_state_dict(ray.get(inputs.init_weights), strict=True)  # adapted and checked by the driver
    plan, done_before, tally = _restored_position(saved, cfg, world, step_images, rank, inputs.label)
    if checkpoint is not None and rank == 0:
        where = (f"epoch {start_epoch + 1} at step {done_before} of {done_before + plan.steps}" if plan else
                 f"epoch {start_epoch} done, continuing at epoch {start_epoch + 1}")
        after = "after a preemption " if ((saved or {}).get("position") or {}).get("preempted") else ""
        log.warning("%srestored %sfrom %s: %s (step %d, %d workers)", inputs.label, after, origin, where, step,
                    world)
    if covered and rank == 0 and inputs.run_id:
        # The controller may have gone (a killed sweep driver, a lost head) between registering this checkpoint
        # and logging its epochs: those MLflow lacks are sent now, each once; while it is down they wait in the
        # outbox.
        deliver(inputs.tracking_uri, inputs.run_id, Outbox(storage.run_dir(cfg)), covered)
    schedule.apply(optimizer, step)

    model = ray.train.torch.prepare_model(model)
    ema = _build_ema(cfg, ckpt.unwrap(model), saved, rank)
    if cfg.train.compile:
        model = torch.compile(model)
    watch = _watchers(cfg, inputs, rank, world, steps_per_epoch) if rank == 0 else Watchers()

    train_shard = ray.train.get_dataset_shard(train_key(cfg.data, rank, cfg.positional_stream))
    val_shard = ray.train.get_dataset_shard("val")
    eval_batch = (cfg.train.eval_batch_size or global_batch) // world
    # epoch_rows: the epochs reported since the last checkpoint; the next checkpoint carries them
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "scaler": scaler, "epoch_rows": []}
    every = cfg.run.preemption_check_every_steps
    preemption = PreemptionChecks(every, rank, inputs.label) if every else None
    encoded = encoded_batches() if cfg.data.decode == "gpu" else {}  # JPEG bytes, decoded on the device

    # The shared stream runs span.epochs epochs per Ray Data execution: each epoch takes its steps from it.
    span, span_batches, span_left = shared_span(cfg, inputs.train_rows), None, 0

    # -- epochs ----------------------------------------------------------------------------------------
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            mid_epoch = None
            if cfg.positional_stream:
                if plan is None or plan.epoch != epoch:
                    plan, done_before, tally = EpochPlan.fresh(epoch, inputs.train_rows, world, step_images), 0, None
                mid_epoch = MidEpochCheckpoints(cfg.run.checkpoint_every_steps, done_before + plan.steps, partial(
                    _save_mid_epoch, plan=plan, done_before=done_before, cfg=cfg, rank=rank, label=inputs.label,
                    parts=parts, steps=watch.logger))
            starts_stream = mid_epoch is not None or span_left == 0  # the same on every rank
            if rank == 0 and starts_stream:
                ray.get(inputs.epoch_clock.set.remote(epoch, plan.to_dict() if mid_epoch else None))
            if dist.is_initialized() and starts_stream:
                dist.barrier()  # every worker starts reading only once the epoch clock is set
            iter_before = _iterator_stats(train_shard)
            layout = StepLayout.of(cfg, plan.share(0)) if mid_epoch is not None else None
            if layout is not None:  # whole optimizer steps of this worker's piece, in order
                batches = micro_batches(train_shard.iter_torch_batches(
                    batch_size=plan.share(rank), drop_last=True, prefetch_batches=cfg.data.prefetch_batches, **encoded,
                ), layout.accum)
            else:
                if span_left == 0:
                    shuffle_seed = (cfg.train.seed * 1_000_003 + epoch * 1009 + rank) % 2**32
                    span_batches = iter(train_shard.iter_torch_batches(
                        batch_size=per_worker, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
                        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                        local_shuffle_seed=shuffle_seed if cfg.data.shuffle_buffer else None, **encoded,
                    ))
                    span_left = min(span.epochs, cfg.train.epochs - epoch) if span is not None else 1
                span_left -= 1
                # each worker holds span.images / W rows of every epoch of the span: exactly its steps
                batches = islice(span_batches, steps_per_epoch * cfg.optim.accum_steps) if span else span_batches
            step_before = step
            train_metrics, step = train_one_epoch(model, batches, optimizer, schedule, scaler, loss_fn, augment,
                                                  ema, cfg, device, step, epoch, watch, tally, done_before,
                                                  mid_epoch, preemption, layout)
            if span is not None and span_left == 0 and mid_epoch is None:
                for _ in span_batches:  # the span's end (none left): its execution finishes before the next starts
                    pass
            train_metrics.update(_iterator_stats(train_shard, before=iter_before))
            evaluated = {"": ckpt.unwrap(model), **({"_ema": ema.module} if ema is not None else {})}
            val_metrics, confusion = evaluate(
                evaluated, val_shard.iter_torch_batches(batch_size=max(1, eval_batch),
                                                        prefetch_batches=cfg.data.prefetch_batches),
                cfg, device, inputs.num_classes, confusion_of=cfg.run.best_by.removeprefix("val_top1"),
            )
            done = epoch + 1
            check_whole_epoch(done, step - step_before, plan.steps if mid_epoch is not None else steps_per_epoch,
                              int(val_metrics["val_images"]), inputs.val_rows)
            metrics = {"epoch": done, "step": step, "workers": world, **train_metrics, **val_metrics}
            parts["epoch_rows"].append(epoch_row(metrics))
            rng_states = _gather_rng()  # a collective: every rank calls it
            # a preemption notice at the epoch's last step or since (validation), or a deadline before the next
            # epoch's first check: this checkpoint is the just-in-time one
            answer = preemption.take_epoch_end(step, device) if preemption is not None else None
            save = answer is not None or done % cfg.run.checkpoint_every == 0 or done == cfg.train.epochs
            if rank == 0:
                log.info(
                    "%sepoch %d/%d: train loss %.4f, val loss %.4f, val top-1 %.4f, top-5 %.4f, %.0f img/s, "
                    "data wait %.0f%%%s", inputs.label, done, cfg.train.epochs, metrics["train_loss"],
                    metrics["val_loss"], metrics["val_top1"], metrics["val_top5"], metrics["images_per_s"],
                    100 * metrics["data_wait"], f", {world} workers" if cfg.scaling.elastic else "",
                )
            write = dict(parts, epoch=done, step=step, config_yaml=cfg.to_yaml(), metrics=metrics,
                         rng_states=rng_states, confusion=confusion) if save else None
            reported = {**metrics, PREEMPTION_NOTICE: 1} if answer == "checkpoint" else metrics
            paused = _report_checkpoint(reported, cfg, rank, write, "sync" if answer else None, watch.logger)
            if answer and rank == 0:
                log.warning("%sjust-in-time checkpoint at the end of epoch %d, step %d (training paused %.2f s, "
                            "upload sync)", inputs.label, done, step, paused)
            if answer and preemption.last_taken and done < cfg.train.epochs:  # after the last epoch, none to hold for
                preemption.hold(step)
            if watch.progress is not None:
                watch.progress.end_epoch()
    finally:
        watch.close()
