"""Progress lines for long commands: when one is due, how long is left, and the training line's numbers.

Plain log lines, not bars: they read the same in a terminal, a Ray job's log and CI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class Ticker:
    """Due every ``every_s`` seconds (never when ``every_s`` is 0)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if self.every_s <= 0 or now - self.last < self.every_s:
            return False
        self.last = now
        return True


def duration(seconds: float | None) -> str:
    """``1:02:03``, ``4:05``; ``?`` while unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the rate so far (None before anything is done)."""
    if done <= 0 or elapsed <= 0:
        return None
    return (total - done) * elapsed / done


@dataclass
class TrainProgress:
    """Rank 0's running window of steps between two progress lines, and the wall time of whole epochs (train
    and evaluation) that the run's ETA extrapolates from."""

    epochs: int
    steps_per_epoch: int
    world: int
    every_s: float
    label: str = ""  # what the caller prints before each line ("trial <id>: " in a sweep)
    ticker: Ticker = field(init=False)
    images: int = 0
    wait_s: float = 0.0
    loss_sum: float = 0.0
    micro: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    epoch_start: float = field(default_factory=time.perf_counter)
    epoch_walls: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.ticker = Ticker(self.every_s)

    def start_epoch(self) -> None:
        """A new window (the evaluation between epochs is not training time); the ticker runs on across
        epochs, so short epochs still get a line every ``every_s``."""
        self.epoch_start = self.window_start = time.perf_counter()
        self.images, self.wait_s, self.loss_sum, self.micro = 0, 0.0, 0.0, 0

    def end_epoch(self) -> None:
        self.epoch_walls.append(time.perf_counter() - self.epoch_start)

    def add(self, images: int, wait_s: float, loss: float) -> None:
        self.images += images
        self.wait_s += wait_s
        self.loss_sum += loss
        self.micro += 1

    def line(self, epoch: int, step_in_epoch: int, lr: float) -> str | None:
        """The progress line when one is due (and resets the window), else None. ``epoch`` counts from 1."""
        if not self.ticker.due() or not self.micro:
            return None
        now = time.perf_counter()
        window = max(1e-9, now - self.window_start)
        in_epoch = now - self.epoch_start
        epoch_left = eta(step_in_epoch, self.steps_per_epoch, in_epoch)
        per_epoch = (sum(self.epoch_walls) / len(self.epoch_walls)) if self.epoch_walls else \
            (in_epoch + epoch_left if epoch_left is not None else None)
        run_left = None if epoch_left is None or per_epoch is None else \
            epoch_left + (self.epochs - epoch) * per_epoch
        text = (f"epoch {epoch}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch}: "
                f"{self.images * self.world / window:.0f} img/s, data wait {100 * self.wait_s / window:.0f}%, "
                f"loss {self.loss_sum / self.micro:.4f}, lr {lr:.3g}, "
                f"ETA epoch {duration(epoch_left)}, run {duration(run_left)}")
        self.window_start = now
        self.images, self.wait_s, self.loss_sum, self.micro = 0, 0.0, 0.0, 0
        return text
