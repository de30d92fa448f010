"""The GPU path end to end: a short `vitlab train` with data.decode=gpu on a CUDA Train worker, and
`vitlab bench train --device cuda --quick`. Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import json
import math

import pytest

from tests.support import JOB, TINY, store_overrides
from tests.support.cli import run_cli


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_with_gpu_decode(digits_shards, tmp_path, precision):
    out = tmp_path / "outcome.json"
    ran = run_cli("train", JOB, *TINY, f"data.path={digits_shards}", *store_overrides(tmp_path, f"gpu_{precision}"),
                  "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
                  "data.decode=gpu", f"train.precision={precision}", "train.epochs=2", "--output-json", out)
    assert ran.returncode == 0, ran.stderr
    outcome = json.loads(out.read_text())
    assert outcome["epochs"] == 2 and math.isfinite(outcome["images_per_s"]) and outcome["images_per_s"] > 0
    assert outcome["val_top1"] > 0.1  # above chance on 10 classes after 2 epochs of the tiny model


def test_bench_train_on_cuda_quick(ray_gpu, tmp_path):
    out = tmp_path / "bench.json"
    ran = run_cli("bench", "train", "--device", "cuda", "--quick", "--output-json", out)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    for side in ("cpu_decode", "gpu_decode"):
        assert report[side]["images_per_s"] > 0 and 0 <= report[side]["data_wait"] <= 1, side
    assert report["settings"]["precision"] == "bf16" and report["settings"]["gpus_used"] == 1
    assert "GPU decode (nvJPEG)" in ran.stdout
