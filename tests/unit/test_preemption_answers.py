"""Where a preemption notice's answer goes (train/epoch.py): inside an epoch, a just-in-time mid-epoch checkpoint;
at the epoch's last step, where no mid-epoch checkpoint is taken, the end-of-epoch checkpoint (``epoch_end``).

train_one_epoch runs here for real on a tiny model, without Ray: ``check`` answers as it would from Ray Train's
preemption info (the multinode suite drains a real node)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitlab.config import JobConfig
from vitlab.train.epoch import EpochTally, MidEpochCheckpoints, PreemptionChecks, Watchers, train_one_epoch
from vitlab.train.optim import build_schedule

STEPS = 4


class AnswersAt(PreemptionChecks):
    """``check`` gives the answers of ``at`` (step -> "checkpoint" | "last"); ``hold`` records instead of waiting."""

    def __init__(self, at: dict[int, str]):
        super().__init__(every=1, rank=1)
        self.at, self.held = at, []

    def check(self, step: int, device) -> str | None:
        return self.at.get(step)

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
    assert preemption.take_epoch_end() is None


@pytest.mark.parametrize("answer", ["checkpoint", "last"])
def test_a_notice_at_the_epoch_s_last_step_is_left_to_the_end_of_epoch_checkpoint(answer):
    saved, preemption = _epoch({STEPS: answer})
    assert saved == [] and preemption.held == []  # the loop holds after the end-of-epoch checkpoint
    assert preemption.take_epoch_end() == answer
    assert preemption.take_epoch_end() is None  # given once
