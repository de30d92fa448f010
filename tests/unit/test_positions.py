"""Mid-epoch positions (data/positions.py): an epoch interrupted any number of times, restarted on any number
of workers, trains every planned image exactly once, and a worker's stream is its piece, in order.

The plan is checked on its own (random restarts) and through the train pipeline's decode function, run here
without Ray, one call per worker, on real Parquet shards.
"""


import numpy as np
import pytest

from tests.unit.conftest import SHARD_ROWS
from vitlab.config import DataConfig
from vitlab.data.pipeline import _decode_train_shards
from vitlab.data.positions import EpochPlan, count, cut


def test_plan_layout_and_rest_after_steps():
    plan = EpochPlan.fresh(epoch=0, train_rows=21, world=2, step_images=4)
    assert plan.remaining == ((0, 20),) and plan.steps == 5  # the last 21 % 4 images are left out
    assert [plan.piece(r) for r in range(2)] == [[(0, 10)], [(10, 20)]]  # one contiguous piece each
    rest = plan.after(2)  # each worker trained 2 steps x 2 images of its piece
    assert rest.remaining == ((4, 10), (14, 20)) and rest.steps == 3
    three = rest.on(3)  # a restart on 3 workers: shares 2, 1, 1 per step
    assert [three.share(r) for r in range(3)] == [2, 1, 1]
    assert [three.piece(r) for r in range(3)] == [[(4, 10)], [(14, 17)], [(17, 20)]]
    assert EpochPlan.from_dict(three.to_dict()) == three
    assert cut([(0, 3), (10, 12)], 2, 4) == [(2, 3), (10, 11)]


@pytest.mark.parametrize("seed", range(20))
def test_random_restarts_on_random_worker_counts_train_every_position_once(seed):
    rng = np.random.default_rng(seed)
    step_images = int(rng.integers(1, 13))
    plan = EpochPlan.fresh(0, int(rng.integers(step_images, 200)), int(rng.integers(1, 6)), step_images)
    planned = [p for lo, hi in plan.remaining for p in range(lo, hi)]
    trained: list[int] = []
    steps = 0
    while plan.steps:
        plan = plan.on(int(rng.integers(1, 9)))  # the restart's worker count
        k = int(rng.integers(0, plan.steps + 1))  # steps trained before the next interruption
        for rank in range(plan.world):
            piece = plan.piece(rank)
            assert count(piece) == plan.steps * plan.share(rank)
            trained += [p for lo, hi in cut(piece, 0, k * plan.share(rank)) for p in range(lo, hi)]
        steps += k
        plan = plan.after(k)
    assert sorted(trained) == planned  # each planned position once: none repeated, none skipped
    assert steps * step_images == len(planned)  # and the optimizer steps of an uninterrupted epoch


def decode(files, plan: EpochPlan, rank: int, repeats: int = 1):
    data = DataConfig(image_size=16, scale=(0.2, 1.0), repeated_aug=repeats)
    out = list(_decode_train_shards({"shard": np.arange(len(files))}, files, SHARD_ROWS, data, 3, plan, rank,
                                    plan.world, positional=True))
    return np.concatenate([b["image"] for b in out]), np.concatenate([b["label"] for b in out])


def test_stream_resumes_at_the_exact_image_on_another_worker_count(labelled_shards):
    rows, step_images = sum(SHARD_ROWS), 4
    whole = EpochPlan.fresh(epoch=1, train_rows=rows, world=1, step_images=step_images)
    images, labels = decode(labelled_shards, whole, 0)  # one worker, uninterrupted: the reference
    assert len(labels) == 20 and len(set(labels.tolist())) == 20
    by_label = dict(zip(labels.tolist(), images, strict=True))

    two = whole.on(2)
    trained: list[int] = []
    for rank in range(2):  # 2 workers train 3 steps, then a failure
        images, labels = decode(labelled_shards, two, rank)
        assert len(labels) == two.steps * two.share(rank)  # the worker's whole piece, no more
        trained += labels[: 3 * two.share(rank)].tolist()
    three = two.after(3).on(3)  # the restart has 3 workers
    for rank in range(3):
        images, labels = decode(labelled_shards, three, rank)
        trained += labels.tolist()
        for image, label in zip(images, labels, strict=True):
            assert np.array_equal(image, by_label[int(label)])  # the same crop as without the restart
    assert sorted(trained) == sorted(by_label)  # every planned image exactly once


def test_repeated_augmentation_resumes_with_each_copy_once(labelled_shards):
    """k = 3: an epoch of 21 positions holds the first 7 images of the epoch's order 3 times each; interrupted
    after 2 steps on 2 workers and finished on 3, every copy is trained once, each with its own crop."""
    plan = EpochPlan.fresh(epoch=0, train_rows=sum(SHARD_ROWS), world=2, step_images=3)
    copies: dict[int, list[np.ndarray]] = {}
    for rank in range(2):
        images, labels = decode(labelled_shards, plan, rank, repeats=3)
        for image, label in zip(images[: 2 * plan.share(rank)], labels, strict=False):
            copies.setdefault(int(label), []).append(image)
    rest = plan.after(2).on(3)
    for rank in range(3):
        for image, label in zip(*decode(labelled_shards, rest, rank, repeats=3), strict=True):
            copies.setdefault(int(label), []).append(image)
    assert len(copies) == 7 and all(len(held) == 3 for held in copies.values()), {k: len(v) for k, v in copies.items()}
    for label, held in copies.items():
        assert not np.array_equal(held[0], held[1]) and not np.array_equal(held[1], held[2]), label

