"""`vitlab bench infer`: one model, the CPU runtimes of deploy/runtimes.py side by side, in one invocation.

(a) torch eager (``inference_mode``), (b) ``torch.compile`` (inductor; where it works here, else reported as
unavailable with the reason), (c) onnxruntime on the model exported by ``vitlab export``'s code path (graph
optimisation level ALL, intra-op threads = the cores), (d) the same on the graph ``vitlab export --optimize``
writes (attention fused into onnxruntime's Attention op; the JSON gives the fused node counts), (e) onnxruntime
on the plain model quantized as ``vitlab export --quantize int8`` does (dynamic int8 weights).

For each: batch-1 latency (p50, p90 over timed iterations after a warm-up) and batch-N throughput. The
measurements are interleaved in rounds (eager, compile, onnxruntime, eager, ...) so that a change in the
machine's background load touches every runtime alike instead of the one that happened to run then. All
runtimes use the same intra-op thread count and the same random-weight model (nothing is downloaded).
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.bench.common import bench_model, check_positive, cores, load_avg
from vitlab.deploy.onnx import check_opset
from vitlab.deploy.runtimes import RUNTIMES, Runner, RuntimeSetup
from vitlab.errors import UserError
from vitlab.model import create_model

log = logging.getLogger(__name__)

ROUNDS = 3


def _latencies(fn: Callable[[], Any], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def build_runtimes(names: list[str], setup: RuntimeSetup) -> tuple[dict[str, Runner | None], dict[str, Any]]:
    """name -> runner for every runtime that works here (None for the others), and per-runtime notes (setup
    time, or 'unavailable: reason')."""
    runners: dict[str, Runner | None] = {}
    notes: dict[str, Any] = {}
    for name in RUNTIMES:
        if name not in names:
            runners[name], notes[name] = None, {"unavailable": "skipped"}
            continue
        try:
            runners[name], notes[name] = RUNTIMES[name](setup)
        except Exception as e:  # reported beside the others, never fatal: e.g. inductor without a compiler
            log.warning("%s unavailable: %s", name, e)
            runners[name], notes[name] = None, {"unavailable": _first_line(e)}
    return runners, notes


def bench_infer(model_name: str = "vit_small_patch16_224", image_size: int = 224, batch_size: int = 32,
                threads: int | None = None, iters: int | None = None, warmup: int | None = None,
                throughput_iters: int | None = None, compile: bool = True, quick: bool = False,
                opset: int = 17, num_classes: int = 1000, runtimes: list[str] | None = None) -> dict[str, Any]:
    """Run the runtimes (default: all of RUNTIMES; ``compile=False`` leaves out torch_compile) and return the
    report (JSON keys in docs/benchmarks.md)."""
    import torch

    names = list(runtimes or RUNTIMES)
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise UserError(f"--runtime {unknown[0]}: expected one of {', '.join(RUNTIMES)}")
    if "torch_eager" not in names:
        names.insert(0, "torch_eager")  # the others are reported relative to it
    if not compile and "torch_compile" in names:
        names.remove("torch_compile")
    check_positive(image_size=image_size, batch_size=batch_size, threads=threads, iters=iters)
    check_opset(opset)
    model_name, kwargs, image_size, batch_size, num_classes = bench_model(
        model_name, image_size, batch_size, quick, quick_batch=4, num_classes=num_classes)
    iters = iters or (6 if quick else 60)
    warmup = warmup if warmup is not None else (1 if quick else 5)
    throughput_iters = throughput_iters or (2 if quick else 6)
    threads = threads or cores()
    rounds = min(ROUNDS, iters)

    load_before = load_avg()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    try:
        model = create_model(model_name, num_classes, kwargs).eval()
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"--model {model_name}: timm cannot build it with {kwargs}: {e}") from None
    workdir = Path(tempfile.mkdtemp(prefix="vitlab-bench-infer-"))
    try:
        runners, notes = build_runtimes(names, RuntimeSetup(model, image_size, threads, opset, workdir))
        if not compile:
            notes["torch_compile"] = {"unavailable": "skipped (--no-compile)"}
        live = {k: fn for k, fn in runners.items() if fn is not None}
        rng = np.random.default_rng(0)
        x1 = rng.standard_normal((1, 3, image_size, image_size), dtype=np.float32)
        xb = rng.standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
        for fn in live.values():  # warm-up, both shapes (a compiled model recompiles for the batch shape)
            for _ in range(warmup):
                fn(x1)
            fn(xb)
        lat: dict[str, list[float]] = {k: [] for k in live}
        thr: dict[str, list[float]] = {k: [] for k in live}
        for r in range(rounds):
            n = iters // rounds + (r < iters % rounds)
            m = throughput_iters // rounds + (r < throughput_iters % rounds)
            for name, fn in live.items():
                fn(x1)  # untimed: the other runtime's threads may still be spinning down
                lat[name] += _latencies(lambda fn=fn: fn(x1), n)
                thr[name] += _latencies(lambda fn=fn: fn(xb), m)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {}
    for name in runners:
        if name not in live:
            results[name] = notes[name]
            continue
        ms = np.asarray(lat[name]) * 1000
        results[name] = {
            "batch1_p50_ms": round(float(np.percentile(ms, 50)), 2),
            "batch1_p90_ms": round(float(np.percentile(ms, 90)), 2),
            f"batch{batch_size}_images_per_s": round(batch_size * len(thr[name]) / sum(thr[name]), 1),
            **notes[name],
        }
    eager = results["torch_eager"]
    key = f"batch{batch_size}_images_per_s"
    ratios = {}
    for name in RUNTIMES:
        r = results[name]
        if name == "torch_eager":
            continue
        if "batch1_p50_ms" in r:
            ratios[name] = {"batch1_p50_vs_eager": round(r["batch1_p50_ms"] / eager["batch1_p50_ms"], 3),
                            f"{key}_vs_eager": round(r[key] / eager[key], 3)}
    return {
        **results,
        "ratios": ratios,
        "settings": {
            "model": model_name, "model_kwargs": kwargs, "image_size": image_size, "batch_size": batch_size,
            "threads": threads, "iters": iters, "warmup": warmup, "throughput_iters": throughput_iters,
            "rounds": rounds, "opset": opset, "quick": quick, "weights": "random (timm, pretrained=False)",
            "torch": torch.__version__, "onnxruntime": _ort_version(), "cores": cores(),
            "load_avg_1m": [load_before, load_avg()],
        },
    }


def _ort_version() -> str | None:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return None


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    b = s["batch_size"]
    key = f"batch{b}_images_per_s"
    lines = [f"{s['model']} {s['image_size']}px, {s['threads']} threads, {s['iters']} batch-1 iterations "
             f"(p50 / p90), batch {b} throughput",
             f"{'runtime':<18}{'p50 ms':>9}{'p90 ms':>9}{'img/s':>9}{'p50 vs eager':>14}{'img/s vs eager':>16}"]
    for name in RUNTIMES:
        r = report[name]
        if "batch1_p50_ms" not in r:
            lines.append(f"{name:<18}{r.get('unavailable', 'unavailable')}")
            continue
        ratio = report["ratios"].get(name, {})
        lat_r = f"{ratio['batch1_p50_vs_eager']:.2f}x" if ratio else "1.00x"
        thr_r = f"{ratio[f'{key}_vs_eager']:.2f}x" if ratio else "1.00x"
        lines.append(f"{name:<18}{r['batch1_p50_ms']:>9.1f}{r['batch1_p90_ms']:>9.1f}{r[key]:>9.1f}"
                     f"{lat_r:>14}{thr_r:>16}")
    return "\n".join(lines)
