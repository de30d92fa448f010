"""`vitlab bench infer` and `vitlab bench train` in their quick modes (tiny model, a few iterations)."""

import json

import pytest

from tests.support.cli import run_cli
from vitlab.bench.infer import bench_infer
from vitlab.bench.train import bench_train, format_report
from vitlab.bench.train_gpu import bench_side
from vitlab.errors import UserError


def test_bench_infer_quick_runtimes_side_by_side(tmp_path):
    out = tmp_path / "infer.json"
    proc = run_cli("bench", "infer", "--quick", "--output-json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    key = f"batch{report['settings']['batch_size']}_images_per_s"
    for name in ("torch_eager", "onnxruntime", "onnxruntime_fused", "onnxruntime_int8"):
        r = report[name]
        assert 0 < r["batch1_p50_ms"] <= r["batch1_p90_ms"] and r[key] > 0, name
        assert name in proc.stdout
    assert report["onnxruntime"]["max_abs_diff_vs_eager"] < 1e-4
    fused = report["onnxruntime_fused"]  # `vitlab export --optimize`'s graph: the quick model's one block fused
    assert fused["max_abs_diff_vs_eager"] < 1e-4 and fused["fused"]["Attention"] == 1
    assert "onnxruntime_fused" in report["ratios"] and "fused" not in report["onnxruntime"]
    int8 = report["onnxruntime_int8"]
    assert 0 < int8["max_abs_diff_vs_eager"] < 1.0  # quantized: close to fp32, not equal
    assert "onnxruntime_int8" in report["ratios"]
    ratios = report["ratios"]["onnxruntime"]
    assert ratios["batch1_p50_vs_eager"] == pytest.approx(  # the report rounds ratios to 3 decimals
        report["onnxruntime"]["batch1_p50_ms"] / report["torch_eager"]["batch1_p50_ms"], rel=0.01, abs=5e-4)
    compiled = report["torch_compile"]
    if "unavailable" in compiled:  # reported, not raised, where inductor does not work
        assert compiled["unavailable"] and "torch_compile" not in report["ratios"]
    else:
        assert compiled["batch1_p50_ms"] > 0 and compiled["compile_s"] >= 0 and "torch_compile" in report["ratios"]
    assert report["settings"]["quick"] and report["settings"]["threads"] >= 1


def test_bench_infer_no_compile_and_chosen_runtimes():
    report = bench_infer(quick=True, compile=False, iters=3)
    assert report["torch_compile"] == {"unavailable": "skipped (--no-compile)"}
    assert set(report["ratios"]) == {"onnxruntime", "onnxruntime_fused", "onnxruntime_int8"}
    only = bench_infer(quick=True, iters=3, runtimes=["onnxruntime"])  # eager always runs: the reference
    assert set(only["ratios"]) == {"onnxruntime"} and only["onnxruntime_int8"] == {"unavailable": "skipped"}


def test_bench_train_quick_ray_vs_plain(ray_session):
    report = bench_train(quick=True)
    threads = report["settings"]["threads"]
    half = max(1, threads // 2)
    ray_one, plain, ray_two = report[f"ray_1x{threads}"], report[f"plain_1x{threads}"], report[f"ray_2x{half}"]
    windows = report["settings"]["windows"]
    for side, workers, per_worker in ((ray_one, 1, threads), (plain, 1, threads), (ray_two, 2, half)):
        assert side["images_per_s"] > 0 and side["workers"] == workers and side["threads_per_worker"] == per_worker
        assert len(side["window_images_per_s"]) == windows  # timed in alternating windows
    assert report["ratio"] == pytest.approx(ray_one["images_per_s"] / plain["images_per_s"], rel=0.01)
    assert report["window_ratio_median"] > 0
    assert report[f"ratio_2x{half}_vs_1x{threads}"] > 0
    assert "ratio (a)/(b)" in format_report(report)


def test_bench_train_rejects_more_threads_than_cpus(ray_session):
    with pytest.raises(UserError, match="--threads 64"):
        bench_train(quick=True, threads=64)
    with pytest.raises(UserError, match="--batch-size 7"):
        bench_train(quick=True, batch_size=7)


def test_bench_train_gpu_sides_run_on_the_cpu(ray_session, tmp_path):
    """`bench train --device cuda`'s two sides (CPU decode, GPU decode) on real shards, here with device cpu: the
    same code a GPU runs, minus CUDA (tests/gpu/ runs the command itself)."""
    from vitlab.bench.common import bench_model
    from vitlab.bench.train_gpu import prepare_shards

    name, kwargs, size, batch, classes = bench_model("vit_small_patch16_224", 224, 128, True, quick_batch=8)
    shards = prepare_shards(str(tmp_path), 3 * batch, quick=True)
    for decode in ("cpu", "gpu"):
        side = bench_side(shards, decode, name, kwargs, classes, size, batch, steps=2, warmup=1, device="cpu")
        assert side["images_per_s"] > 0 and 0 <= side["data_wait"] <= 1 and side["step_ms"] > 0, decode
