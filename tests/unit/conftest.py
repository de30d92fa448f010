"""The unit tier is pure: a test here that starts a process or a Ray runtime fails."""

from __future__ import annotations

import subprocess
import sys

import mlflow  # noqa: F401
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch  # noqa: F401

from tests.support.data import jpeg_bytes

# Importing torch (ldconfig, looking for CUDA) and mlflow (`uname -p`) runs a process once: import them here,
# before the guard below, so that a library's import is not taken for a test starting a process.


@pytest.fixture(autouse=True)
def no_processes_no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the unit tier starts no processes (tried: {args[0] if args else kwargs})")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    # `make test` runs both tiers in one process, so the integration tier's session Ray may already be up:
    # what fails is a unit test that starts one.
    ray_was_up = ray_is_up()
    yield
    assert ray_was_up or not ray_is_up(), "the unit tier starts no Ray (move this test to integration)"


def ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


SHARD_ROWS = [7, 5, 9]  # labelled_shards: 21 train rows in three uneven shards


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory):
    """Shards whose label is the image's index: every decoded row says which image it is a copy of."""
    root = tmp_path_factory.mktemp("shards")
    files, index = [], 0
    for s, rows in enumerate(SHARD_ROWS):
        ids = list(range(index, index + rows))
        index += rows
        table = pa.table({"image": [jpeg_bytes(i % 5, i, (40, 32)) for i in ids], "label": ids,
                          "key": [f"img{i}" for i in ids]})
        files.append(str(root / f"train-{s}.parquet"))
        pq.write_table(table, files[-1])
    return files
