"""The shared train stream's span: several epochs in one Ray Data execution, each one whole optimizer steps.

The decode function runs here without Ray, on real Parquet shards whose label is the image's index.
"""

import numpy as np

from tests.unit.conftest import SHARD_ROWS
from vitlab.config import DataConfig, JobConfig
from vitlab.data.pipeline import SPAN_IMAGES, Span, _decode_train_shards, shared_span

DATA = DataConfig(image_size=16)


def labels_by_epoch(files, span: Span | None, first_epoch: int, epochs: int = 1) -> dict[int, list[int]]:
    """Decode the items of one execution (a task per item, as Ray Data runs them) and group rows by epoch."""
    n = len(files)
    out: dict[int, list[int]] = {}
    for k in range(epochs):
        for idx in range(n):
            item = {"shard": np.array([idx]), "k": np.array([k])}
            for block in _decode_train_shards(item, files, SHARD_ROWS, DATA, 3, first_epoch, span=span):
                out.setdefault(first_epoch + k, []).extend(block["label"].tolist())
    return out


def test_plan_keeps_whole_steps_of_every_worker_and_spans_enough_images():
    span = Span.plan(rows=1000, batch_size=128, world=2, accum=2, last=300)
    # per worker 500 rows -> 7 micro-batches of 64 -> 3 steps of 2: 3 x 2 x 64 x 2 = 768 images an epoch
    assert span.images == 768 and span.epochs == -(-SPAN_IMAGES // 768) and span.last == 300
    assert Span.plan(rows=1000, batch_size=128, world=2, accum=1, last=5).epochs == 5  # never past the run
    assert Span.plan(rows=100, batch_size=128, world=2, accum=1, last=5) is None  # no whole step: per epoch


def test_a_span_streams_each_epoch_s_first_whole_steps_back_to_back_and_stops_at_the_last(labelled_shards):
    total = sum(SHARD_ROWS)
    span = Span.plan(total, batch_size=8, world=2, accum=1, last=5)  # 21 rows -> 2 steps of 8 = 16 an epoch
    assert span.images == 16
    got = labels_by_epoch(labelled_shards, span, first_epoch=2, epochs=span.epochs)
    assert sorted(got) == [2, 3, 4]  # from the clock's epoch, none at or past the run's last
    for epoch, labels in got.items():
        whole = labels_by_epoch(labelled_shards, None, first_epoch=epoch)[epoch]  # the epoch alone: every row
        assert sorted(whole) == list(range(total))
        assert labels == whole[:16]  # the epoch's first 16 positions, in its order: the rest is not read
    assert got[2] != got[3]  # reshuffled every epoch


def test_shared_span_only_for_the_shared_stream():
    job = JobConfig.model_validate({"train": {"batch_size": 8, "epochs": 4}, "scaling": {"num_workers": 2},
                                    "data": {"back_to_back": True}})
    assert shared_span(job.model_copy(update={"data": job.data.model_copy(update={"back_to_back": False})}), 21) is None
    assert shared_span(job, 21) == Span(epochs=4, images=16, last=4)
    positional = job.model_copy(update={"run": job.run.model_copy(update={"checkpoint_every_steps": 2})})
    assert shared_span(positional, 21) is None
    repeated = job.model_copy(update={"data": job.data.model_copy(update={"repeated_aug": 3})})
    assert shared_span(repeated, 21) is None
