"""The gpu tier (`make test-gpu`): everything here is marked ``gpu`` and runs where CUDA is present; elsewhere each
test is skipped with the reason. The CPU tiers test how the decode path is chosen (tests/unit/test_decode_path.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support import prepare_digits

HERE = Path(__file__).parent
NO_CUDA = ("no CUDA device (torch.cuda.is_available() is False): the gpu tier runs on a machine with an NVIDIA "
           "GPU, `make test-gpu`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="session")
def ray_gpu():
    """A local Ray with this machine's CPUs and GPUs (or the session's, when `make test` started one first)."""
    import ray
    from ray.data import DataContext

    from vitlab.cluster import start_local

    started = not ray.is_initialized()
    if started:
        start_local()
    DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(ray_gpu, tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory, "gpu-digits")
