"""One epoch's work on every worker: the train steps (train_one_epoch) and the evaluation (evaluate), with what
they need beside them. train/loop.py calls them in order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitlab.config import JobConfig
from vitlab.data.gpu_decode import batch_images
from vitlab.data.pipeline import normalize_on_device
from vitlab.progress import TrainProgress
from vitlab.train import state as ckpt
from vitlab.train.profile import StepProfiler
from vitlab.train.steplog import StepLogger

log = logging.getLogger("vitlab.train")

MAX_CONFUSION_CLASSES = 100
HOLD_AFTER_DEADLINE_S = 60.0
REGISTER_MARGIN_S = 3.0  # for the controller to register the last checkpoint before a preemption deadline


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss; carries the global step."""


class IncompleteEpochError(RuntimeError):
    """An epoch's data stream ended before its steps or its validation were done."""


def check_whole_epoch(epoch: int, steps: int, expected_steps: int, val_images: int, val_rows: int) -> None:
    """Raise unless the epoch trained all its steps and validated every val image. Ray Data ends a worker's
    iterators when its worker group is stopped (a resize, a lost node): without this check, the dying group
    would report a short epoch, or a validation of no images as val_top1 0. The same on every rank (workers take
    their optimizer steps together; the val images are summed over them), so all raise and none waits in a
    collective."""
    if steps != expected_steps or val_images != val_rows:
        raise IncompleteEpochError(
            f"epoch {epoch}: trained {steps} of its {expected_steps} steps and validated {val_images} of the "
            f"{val_rows} val images: a data stream ended early; the epoch is not reported"
        )


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


@dataclass
class EpochTally:
    """An epoch's running sums on one worker. ``summed`` adds them over the workers: what the epoch's metrics
    are made of, and what a mid-epoch checkpoint keeps so that the metrics still cover the whole epoch."""

    loss_sum: float = 0.0  # loss x images
    correct: float = 0.0  # top-1 hits against the hard labels
    seen: float = 0.0  # images
    wait_s: float = 0.0  # waiting for batches
    elapsed_s: float = 0.0  # in the epoch's steps (not in mid-epoch checkpoints)

    def summed(self, device) -> EpochTally:
        return EpochTally(*_all_reduce_sum(list(astuple(self)), device))

    def as_list(self) -> list[float]:
        return list(astuple(self))

    @classmethod
    def resumed(cls, saved: list[float] | None, saved_world: int, rank: int) -> EpochTally:
        """This worker's share of a checkpoint's sums (over ``saved_world`` workers): the counts on rank 0,
        the per-worker times as their mean on every rank, so that the epoch's totals come out right on any
        number of workers."""
        if not saved:
            return cls()
        loss_sum, correct, seen, wait_s, elapsed_s = saved
        counts = (loss_sum, correct, seen) if rank == 0 else (0.0, 0.0, 0.0)
        return cls(*counts, wait_s / saved_world, elapsed_s / saved_world)


@dataclass
class MidEpochCheckpoints:
    """``run.checkpoint_every_steps``: after every this many optimizer steps of an epoch (counted from the
    epoch's start, also across a restore; 0: only when a preemption notice asks), except its last,
    ``save(steps_in_epoch, step, totals)`` runs on every worker (it reports, a barrier)."""

    every: int
    steps_in_epoch: int  # the epoch's optimizer steps in all
    save: Callable[..., None]  # (steps_in_epoch_done, step, totals, preempted=None | "checkpoint" | "last")

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0 and steps_done < self.steps_in_epoch


@dataclass
class PreemptionChecks:
    """``run.preemption_check_every_steps``: every this many optimizer steps, every worker asks Ray Train whether
    a node of the run is about to be reclaimed (``ray.train.get_preemption_info``, a barrier of all workers).

    ``check`` answers, the same on every worker: "checkpoint" at the first notice of a preemption (a just-in-time
    mid-epoch checkpoint, then training carries on), "last" once the notice's deadline is nearer than two check
    intervals, two checkpoints and REGISTER_MARGIN_S (decided on all workers' clocks at once: an all-reduce),
    after which ``hold`` waits for the node to go instead of training steps that would be trained again; None
    otherwise. Ray Train then restarts the run from the latest checkpoint, charged to
    ``run.max_preemption_failures``, not to ``run.max_failures``. The end-of-epoch checkpoint gives an answer
    from the epoch's last step (``epoch_end``), or that of one more check after validation (``take_epoch_end``).
    Counts its checks and their time."""

    every: int
    rank: int
    label: str = ""
    answered: set[tuple[str, ...]] = field(default_factory=set)  # the notices seen (their nodes)
    deadline_s: float | None = None  # of the notice being answered
    last_taken: bool = False  # the notice's last checkpoint is given: the answer that gives it holds after it
    last_check_at: float = 0.0
    save_s: float = 0.0  # how long the last just-in-time checkpoint paused training
    epoch_end: str | None = None  # "checkpoint" | "last", for the end-of-epoch checkpoint to give
    ended_at: float = 0.0  # when the last epoch's end check ran, until the next epoch's first check
    epoch_start_s: float = 0.0  # from an epoch's end check to the next epoch's first, as last measured
    checks: int = 0
    check_s: float = 0.0

    def check(self, step: int, device) -> str | None:
        return None if step % self.every else self._ask(step, device)

    def preemption_info(self):
        """Ray Train's preemption info, the same on every worker (a barrier); None without a notice."""
        return ray.train.get_preemption_info()

    def _ask(self, step: int, device, at_epoch_end: bool = False) -> str | None:
        start = time.perf_counter()
        interval_s = start - self.last_check_at if self.last_check_at else 0.0
        if self.ended_at:  # an epoch's first check: its start (report, first batches) took this long
            self.epoch_start_s, self.ended_at = start - self.ended_at, 0.0
        # to the check after this one: an interval, or at an epoch's end the next epoch's start, as it last took
        wait_s = max(2 * interval_s, self.epoch_start_s + interval_s) if at_epoch_end else 2 * interval_s
        info = self.preemption_info()
        self.last_check_at = time.perf_counter()
        self.checks += 1
        self.check_s += self.last_check_at - start
        if info is None:
            return None
        if tuple(info.preempted_node_ids) not in self.answered:
            self.answered.add(tuple(info.preempted_node_ids))
            self.deadline_s, self.last_taken = (info.deadline_ms / 1000 if info.deadline_ms else None), False
            if self.rank == 0:
                left = f"in {self.deadline_s - time.time():.0f} s" if self.deadline_s else "without a deadline"
                log.warning("%spreemption notice at step %d: node(s) %s (ranks %s) go %s", self.label, step,
                            ", ".join(n[:12] for n in info.preempted_node_ids), info.preempted_ranks, left)
            self._last_if_near(wait_s, device)  # a deadline near already: this first checkpoint is the last
            return "checkpoint"
        return self._last_if_near(wait_s, device)

    def _last_if_near(self, wait_s: float, device) -> str | None:
        """"last" when the deadline is nearer than the wait to the check after the next one, two checkpoints
        (uploaded before report returns) and the controller's poll. The same on every worker: one all-reduce,
        whatever their clocks; every worker calls it or none (the notice and its answers are the same on all)."""
        if self.deadline_s is None or self.last_taken:
            return None
        near = self.deadline_s - time.time() < wait_s + 2 * self.save_s + REGISTER_MARGIN_S
        if _all_reduce_sum([float(near)], device)[0] > 0:
            self.last_taken = True
            return "last"
        return None

    def take_epoch_end(self, step: int, device) -> str | None:
        """The answer the end-of-epoch checkpoint gives: one from the epoch's last step, or else that of a check
        now, after validation: "checkpoint" for a notice that came during the epoch's tail or validation (on a
        large val split, minutes), "last" if the deadline falls before the next epoch's first check (no check runs
        in the next epoch's start, the report and first batches: as long as it last took, or the tail's time)."""
        answer, self.epoch_end = self.epoch_end or self._ask(step, device, at_epoch_end=True), None
        self.ended_at = time.perf_counter()
        return answer

    def hold(self, step: int) -> None:
        """After the last checkpoint before the deadline: wait for the node to go (Ray Train ends this worker
        group at the deadline); if it is not reclaimed within HOLD_AFTER_DEADLINE_S, training goes on."""
        if self.rank == 0:
            log.warning("%sholding at step %d until the preempted node goes", self.label, step)
        until = (self.deadline_s or time.time()) + HOLD_AFTER_DEADLINE_S
        while time.time() < until:
            time.sleep(0.5)
        self.ended_at = 0.0  # the wait is not an epoch's start
        if self.rank == 0:
            log.warning("%sthe node was not reclaimed: training goes on", self.label)

    def metrics(self) -> dict[str, float]:
        """This worker's mean time per check so far (ms): what the barrier costs."""
        return {"preemption_check_ms": 1000 * self.check_s / self.checks} if self.checks else {}


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


@dataclass(frozen=True)
class StepLayout:
    """A positional stream's optimizer step on this worker: ``step_images`` in all (the same on any worker
    count), this worker's share of them arriving as one batch, cut into ``accum`` micro-batches of at most the
    configured per-worker batch (train.batch_size / the most workers), the same ``accum`` on every worker."""

    step_images: int
    accum: int

    @classmethod
    def of(cls, cfg: JobConfig, largest_share: int) -> StepLayout:
        cap = max(1, cfg.train.batch_size // cfg.scaling.max_workers)
        return cls(cfg.train.batch_size * cfg.optim.accum_steps, -(-largest_share // cap))


def micro_batches(batches, accum: int) -> Iterator[dict[str, Any]]:
    """A positional stream's batches are whole optimizer steps (this worker's share); cut each into ``accum``
    micro-batches for gradient accumulation."""
    for batch in batches:
        if accum == 1:
            yield batch
            continue
        parts = {name: torch.tensor_split(value, accum) for name, value in batch.items()}
        for i in range(accum):
            yield {name: chunks[i] for name, chunks in parts.items()}


def train_one_epoch(model, batches, optimizer, schedule, scaler, loss_fn, augment, ema, cfg: JobConfig, device,
                    step: int, epoch: int, watch: Watchers, tally: EpochTally | None = None, done_before: int = 0,
                    mid_epoch: MidEpochCheckpoints | None = None, preemption: PreemptionChecks | None = None,
                    layout: StepLayout | None = None) -> tuple[dict[str, float], int]:
    """One pass over this worker's shard; ``ema`` (or None) follows every optimizer step. ``tally`` and
    ``done_before`` carry an epoch restored from a mid-epoch checkpoint (its sums, its optimizer steps done);
    ``layout``, a positional stream's optimizer steps. Returns (metrics summed over workers, new step)."""
    model.train()
    logger, progress, profiler = watch.logger, watch.progress, watch.profiler
    epoch_first_step = step - done_before
    if progress is not None:
        progress.start_epoch()
    accum = layout.accum if layout is not None else cfg.optim.accum_steps
    world = dist.get_world_size() if dist.is_initialized() else 1
    tally = tally or EpochTally()
    lr = schedule(step)
    start = tick = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for micro, batch in enumerate(batches):
        now = time.perf_counter()
        waited = now - tick
        tally.wait_s += waited
        if profiler is not None:
            profiler.before_step(step)
        images = normalize_on_device(batch_images(batch, cfg.data, device), cfg.data.mean, cfg.data.std, device,
                                     cfg.train.channels_last)  # data.decode=gpu: decoded here, on the device
        labels = batch["label"].to(device, non_blocking=True)
        images, targets = augment(images, labels)  # random erasing, mixup/cutmix
        last_micro = (micro + 1) % accum == 0
        # Under accumulation, skip DDP's gradient all-reduce on all but the last micro-batch.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(cfg.train.precision, device):
                logits = model(images)
                loss = loss_fn(logits, targets)
            # each image weighs 1 / (the step's images) whatever the worker's share: DDP averages over workers
            scaled = loss * (labels.shape[0] * world / layout.step_images) if layout is not None else loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_value = loss.detach().float().item()
        n = labels.shape[0]
        tally.loss_sum += loss_value * n
        tally.seen += n
        tally.correct += (logits.detach().argmax(1) == labels).sum().item()
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
            done = step - epoch_first_step
            preempted = preemption.check(step, device) if preemption is not None else None
            if mid_epoch is not None and done < mid_epoch.steps_in_epoch and (preempted or mid_epoch.due(done)):
                paused_at = time.perf_counter()
                tally.elapsed_s += paused_at - start
                mid_epoch.save(done, step, tally.summed(device), preempted=preempted)
                if preempted:
                    preemption.save_s = time.perf_counter() - paused_at
                if preempted and preemption.last_taken:
                    preemption.hold(step)
                start = time.perf_counter()  # the checkpoint's time is not the epoch's
            elif preempted and mid_epoch is not None:  # the epoch's last step: its end-of-epoch checkpoint answers
                preemption.epoch_end = preempted
            elif preempted == "checkpoint" and preemption.rank == 0:
                log.warning("%sno just-in-time checkpoint: run.checkpoint_every_steps is 0, so the restart goes "
                            "back to the last end-of-epoch checkpoint", preemption.label)
        elif not math.isfinite(loss_value):
            raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}): loss={loss_value}")
        if progress is not None:
            progress.add(n, waited, loss_value)
            line = progress.line(epoch + 1, step - epoch_first_step, lr)
            if line:
                log.info("%s%s", progress.label, line)
        tick = time.perf_counter()
    tally.elapsed_s += time.perf_counter() - start
    total = tally.summed(device)
    epoch_s = total.elapsed_s / world  # mean over workers
    return {
        "train_loss": total.loss_sum / max(1, total.seen),
        "train_top1": total.correct / max(1, total.seen),  # against hard labels (approximate under mixup)
        "lr": lr,
        "epoch_time_s": epoch_s,
        "images_per_s": total.seen / max(1e-9, epoch_s),  # global: all workers' images over the epoch time
        "data_wait": total.wait_s / max(1e-9, total.elapsed_s),
        "train_images": total.seen,
        **(preemption.metrics() if preemption is not None else {}),
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


