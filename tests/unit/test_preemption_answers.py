"""Where a preemption notice's answer goes (train/epoch.py): inside an epoch, a just-in-time mid-epoch checkpoint;
at the epoch's last step or during validation, where no mid-epoch checkpoint is taken, the end-of-epoch checkpoint
(``take_epoch_end``), which also answers "last" for a deadline that falls before the next epoch's first check.

train_one_epoch runs here for real on a tiny model, without Ray: ``check`` and ``preemption_info`` answer as they
would from Ray Train's preemption info (the multinode suite drains a real node)."""

from __future__ import annotations

import time

import pytest
import torch
from ray.train import PreemptionInfo
from torch import nn

from vitlab.config import JobConfig
from vitlab.train.epoch import EpochTally, MidEpochCheckpoints, PreemptionChecks, Watchers, train_one_epoch
from vitlab.train.optim import build_schedule

STEPS = 4
CPU = torch.device("cpu")


class Notice(PreemptionChecks):
    """Ray Train's answer is ``info`` (None: no notice)."""

    info: PreemptionInfo | None = None

    def preemption_info(self) -> PreemptionInfo | None:
        return self.info


def notice(deadline_in_s: float) -> PreemptionInfo:
    return PreemptionInfo(deadline_ms=int((time.time() + deadline_in_s) * 1000), preempted_node_to_ranks={"n": [1]})


class AnswersAt(Notice):
    """``check`` gives the answers of ``at`` (step -> "checkpoint" | "last", or "checkpoint, near": a notice whose
    deadline is near already, its first checkpoint the last); ``hold`` records instead of waiting."""

    def __init__(self, at: dict[int, str]):
        super().__init__(every=1, rank=1)
        self.at, self.held = at, []

    def check(self, step: int, device) -> str | None:
        answer = self.at.get(step)
        self.last_taken = answer in ("last", "checkpoint, near")
        return answer.split(",")[0] if answer else None

    def hold(self, step: int) -> None:
        self.held.append(step)


def _epoch(at: dict[int, str]) -> tuple[list[tuple[int, str | None]], AnswersAt]:
    torch.manual_seed(0)
    cfg = JobConfig()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = build_schedule(cfg.optim, 0.1, STEPS, 1)
    batches = [{"image": torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8), "label": torch.tensor([0, 1])}
               for _ in range(STEPS)]
    saved: list[tuple[int, str | None]] = []
    mid_epoch = MidEpochCheckpoints(0, STEPS, lambda done, step, totals, preempted=None: saved.append(
        (done, preempted)))
    preemption = AnswersAt(at)
    _, step = train_one_epoch(model, batches, optimizer, schedule, None, nn.CrossEntropyLoss(),
                              lambda images, labels: (images, labels), None, cfg, torch.device("cpu"), 0, 0,
                              Watchers(), EpochTally(), 0, mid_epoch, preemption)
    assert step == STEPS
    return saved, preemption


def test_a_notice_inside_the_epoch_is_answered_by_a_mid_epoch_checkpoint():
    saved, preemption = _epoch({2: "checkpoint", 3: "last"})
    assert saved == [(2, "checkpoint"), (3, "last")] and preemption.held == [3]
    assert preemption.take_epoch_end(STEPS, CPU) is None


def test_a_notice_with_its_deadline_near_holds_after_its_first_checkpoint():
    saved, preemption = _epoch({2: "checkpoint, near"})
    assert saved == [(2, "checkpoint")] and preemption.held == [2]


@pytest.mark.parametrize("answer", ["checkpoint", "last"])
def test_a_notice_at_the_epoch_s_last_step_is_left_to_the_end_of_epoch_checkpoint(answer):
    saved, preemption = _epoch({STEPS: answer})
    assert saved == [] and preemption.held == []  # the loop holds after the end-of-epoch checkpoint
    assert preemption.take_epoch_end(STEPS, CPU) == answer
    assert preemption.take_epoch_end(STEPS, CPU) is None  # given once


def _pending_notice(deadline_in_s: float, since_last_check_s: float) -> PreemptionChecks:
    """A notice answered with its first checkpoint (0.2 s), its deadline ``deadline_in_s`` away, the epoch's last
    check ``since_last_check_s`` ago (the epoch's tail and validation)."""
    preemption = Notice(every=2, rank=1)
    preemption.answered.add(("n",))
    preemption.deadline_s, preemption.save_s = time.time() + deadline_in_s, 0.2
    preemption.last_check_at = time.perf_counter() - since_last_check_s
    preemption.info = notice(deadline_in_s)
    return preemption


def test_a_deadline_before_the_next_epoch_s_first_check_makes_the_end_of_epoch_checkpoint_the_last():
    # 2 x 0.5 s to the next check + 2 x 0.2 s of checkpoints + the controller's margin: more than the 3 s left
    preemption = _pending_notice(deadline_in_s=3.0, since_last_check_s=0.5)
    assert preemption.take_epoch_end(STEPS, CPU) == "last" and preemption.last_taken
    assert preemption.take_epoch_end(STEPS, CPU) is None  # "last" is given once per notice


def test_a_far_deadline_or_no_notice_leaves_the_end_of_epoch_checkpoint_alone():
    assert _pending_notice(deadline_in_s=60.0, since_last_check_s=0.5).take_epoch_end(STEPS, CPU) is None
    assert Notice(every=2, rank=1).take_epoch_end(STEPS, CPU) is None  # no notice
    no_deadline = _pending_notice(deadline_in_s=0.0, since_last_check_s=0.5)
    no_deadline.deadline_s = None  # a drain without a deadline: nothing to be near
    assert no_deadline.take_epoch_end(STEPS, CPU) is None


@pytest.mark.parametrize("deadline_in_s", [60.0, None])
def test_a_notice_during_validation_is_answered_by_the_end_of_epoch_checkpoint(deadline_in_s):
    # the epoch's last check saw nothing; the notice came after it (the epoch's tail, validation)
    preemption = Notice(every=2, rank=0)
    preemption.last_check_at = time.perf_counter() - 0.5
    preemption.info = notice(deadline_in_s) if deadline_in_s else PreemptionInfo(None, {"n": [1]})
    assert preemption.take_epoch_end(STEPS, CPU) == "checkpoint" and preemption.checks == 1
    assert preemption.take_epoch_end(STEPS, CPU) is None  # answered once; its deadline is far, or none


def test_a_notice_during_validation_with_its_deadline_near_makes_the_end_of_epoch_checkpoint_the_last():
    preemption = Notice(every=2, rank=1)
    preemption.info = notice(2.0)  # nearer than two checkpoints and the controller's margin
    assert preemption.take_epoch_end(STEPS, CPU) == "checkpoint" and preemption.last_taken  # counted, then held
    far = Notice(every=2, rank=1)
    far.info = notice(60.0)
    assert far.take_epoch_end(STEPS, CPU) == "checkpoint" and not far.last_taken


def test_a_slow_epoch_start_makes_the_end_of_epoch_checkpoint_the_last_sooner():
    # the next epoch's start (report, first batches) took 4 s last time: a deadline 6.5 s away falls before the
    # next epoch's first check, though the epoch's checks come every 0.1 s
    preemption = _pending_notice(deadline_in_s=6.5, since_last_check_s=0.1)
    preemption.ended_at = time.perf_counter() - 4.0
    assert preemption.check(2, CPU) is None and preemption.epoch_start_s >= 4.0  # the epoch's first check
    preemption.last_check_at = time.perf_counter() - 0.1
    assert preemption.take_epoch_end(STEPS, CPU) == "last"
    fast_start = _pending_notice(deadline_in_s=6.5, since_last_check_s=0.1)  # no start measured: 2 x 0.1 s
    assert fast_start.take_epoch_end(STEPS, CPU) is None
