"""One real local Ray for the whole session, and the digits shards prepared once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from vitlab.cluster import start_local

    if not ray.is_initialized():
        start_local(num_cpus=2)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(ray_session, tmp_path_factory) -> str:
    from vitlab.data.prepare import prepare

    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare("digits", str(out))
    return str(out)
