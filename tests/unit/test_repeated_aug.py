"""Repeated augmentation (data.repeated_aug): which copies of which images each worker decodes in an epoch.

The decode function of the train pipeline runs here without Ray, one call per worker, on real Parquet shards.
"""

from collections import Counter, defaultdict

import numpy as np
import pytest

from tests.unit.conftest import SHARD_ROWS
from vitlab.config import DataConfig
from vitlab.data.pipeline import _decode_train_shards, epoch_positions
from vitlab.errors import UserError


@pytest.fixture(scope="module")
def shards(labelled_shards):
    return labelled_shards


def decode(files, repeats: int, rank: int | None, world: int, epoch: int = 0, rows=SHARD_ROWS):
    data = DataConfig(image_size=16, repeated_aug=repeats, scale=(0.2, 1.0))
    out = list(_decode_train_shards({"shard": np.arange(len(files))}, files, rows, data, 3, epoch, rank, world))
    if not out:
        return np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([b["image"] for b in out]), np.concatenate([b["label"] for b in out])


def test_k_copies_per_image_each_on_another_worker_each_augmented_differently(shards):
    k, world, total = 3, 3, sum(SHARD_ROWS)
    copies: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for rank in range(world):
        images, labels = decode(shards, k, rank, world)
        assert len(labels) == total // world  # an epoch is still train rows / workers per worker
        for image, label in zip(images, labels, strict=True):
            copies[int(label)].append((rank, image))
    assert len(copies) == total // k  # 7 distinct images this epoch, each exactly k times
    for label, held in copies.items():
        assert len(held) == k and len({rank for rank, _ in held}) == k, label  # on k different workers
        for i in range(k):
            for j in range(i + 1, k):
                assert not np.array_equal(held[i][1], held[j][1]), f"image {label}: copies {i} and {j} equal"


def test_other_images_next_epoch_and_the_same_ones_again_for_the_same_seed(shards):
    first = {int(x) for r in range(3) for x in decode(shards, 3, r, 3, epoch=0)[1]}
    again = {int(x) for r in range(3) for x in decode(shards, 3, r, 3, epoch=0)[1]}
    second = {int(x) for r in range(3) for x in decode(shards, 3, r, 3, epoch=1)[1]}
    assert first == again and first != second


def test_uneven_counts_keep_equal_steps_per_worker():
    """21 rows, k=2, 4 workers: each worker gets 21 // 4 = 5 positions; the first 10 images twice."""
    per_image = Counter()
    for rank in range(4):
        starts = np.concatenate([[0], np.cumsum(SHARD_ROWS)])
        got = 0
        for start, rows in zip(starts, SHARD_ROWS, strict=False):
            offsets, repeats = epoch_positions(int(start), rows, 2, rank, 4, 21)
            got += len(offsets)
            per_image.update(int(start + o) for o in offsets)
        assert got == 5
    assert sorted(per_image.values()) == [2] * 10 and max(per_image) == 9


def test_without_repeats_every_row_once(shards):
    images, labels = decode(shards, 1, None, 1)
    assert sorted(labels.tolist()) == list(range(sum(SHARD_ROWS))) and images.shape[1:] == (16, 16, 3)


def test_a_shard_shorter_than_its_manifest_entry_is_named(shards):
    with pytest.raises(UserError, match=r"train-1\.parquet: 5 rows, the manifest says 6"):
        decode(shards, 1, None, 1, rows=[7, 6, 9])
