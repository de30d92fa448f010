"""Where a run stands inside its epoch, so that a mid-epoch checkpoint resumes at the exact image.

An epoch's train images form one sequence, a pure function of (seed, epoch): the shards in a shuffled order,
the rows of each shard shuffled (data/pipeline.py). An epoch trains the first ``steps * step_images``
positions of it (``step_images`` = the images of one optimizer step, all workers and micro-batches together);
the last ``rows % step_images`` are left out, a different few each epoch.

An ``EpochPlan`` holds the positions still to train, as ascending intervals, and lays them out over the
workers: worker r takes one contiguous piece, ``share(r)`` images per optimizer step, so it reads only the
shards its piece covers. After k optimizer steps every worker has trained the first ``k * share(r)`` images
of its piece, whatever the worker count, so the rest (``after(k)``) is again a list of intervals, which a
restart lays out over however many workers it has. Every planned position is trained exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

Interval = tuple[int, int]  # [start, end) of positions in the epoch's image sequence


def count(intervals: tuple[Interval, ...] | list[Interval]) -> int:
    return sum(end - start for start, end in intervals)


def cut(intervals: tuple[Interval, ...] | list[Interval], start: int, end: int) -> list[Interval]:
    """Positions number ``start`` .. ``end - 1`` of the intervals taken in order (an offset into their
    concatenation, not a position)."""
    out, seen = [], 0
    for lo, hi in intervals:
        a, b = max(lo, lo + start - seen), min(hi, lo + end - seen)
        if a < b:
            out.append((a, b))
        seen += hi - lo
        if seen >= end:
            break
    return out


def merge(intervals: list[Interval]) -> tuple[Interval, ...]:
    out: list[Interval] = []
    for lo, hi in intervals:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        elif lo < hi:
            out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class EpochPlan:
    epoch: int  # 0-based: the epoch in progress
    remaining: tuple[Interval, ...]  # positions still to train, ascending
    world: int  # workers the remaining positions are laid out over
    step_images: int  # images of one optimizer step, all workers together

    @classmethod
    def fresh(cls, epoch: int, train_rows: int, world: int, step_images: int) -> EpochPlan:
        planned = (train_rows // step_images) * step_images
        return cls(epoch, ((0, planned),) if planned else (), world, step_images)

    @property
    def steps(self) -> int:
        """Optimizer steps left in the epoch (the same on every worker)."""
        return count(self.remaining) // self.step_images

    def share(self, rank: int) -> int:
        """Images worker ``rank`` trains per optimizer step; shares differ by at most one image."""
        base, extra = divmod(self.step_images, self.world)
        return base + (rank < extra)

    def piece(self, rank: int) -> list[Interval]:
        """The positions worker ``rank`` trains in the rest of the epoch, in order."""
        start = self.steps * sum(self.share(r) for r in range(rank))
        return cut(self.remaining, start, start + self.steps * self.share(rank))

    def after(self, steps_done: int) -> EpochPlan:
        """The plan once every worker has trained ``steps_done`` more optimizer steps of its piece."""
        rest: list[Interval] = []
        for rank in range(self.world):
            piece = self.piece(rank)
            rest += cut(piece, steps_done * self.share(rank), count(piece))
        return replace(self, remaining=merge(rest))

    def on(self, world: int) -> EpochPlan:
        """The same positions laid out over another number of workers (a restart with fewer or more)."""
        return replace(self, world=world)

    def to_dict(self) -> dict[str, Any]:
        """Plain ints and lists: what a checkpoint stores and torch's weights-only loader reads back."""
        return {"epoch": self.epoch, "remaining": [list(i) for i in self.remaining], "world": self.world,
                "step_images": self.step_images}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochPlan:
        return cls(int(d["epoch"]), tuple((int(a), int(b)) for a, b in d["remaining"]), int(d["world"]),
                   int(d["step_images"]))
