"""`vitlab bench infer`: one model, four CPU runtimes side by side, in one invocation.

(a) torch eager (``inference_mode``), (b) ``torch.compile`` (inductor; where it works here, else reported as
unavailable with the reason), (c) onnxruntime on the model exported by ``vitlab export``'s code path (graph
optimisation level ALL, intra-op threads = the cores), (d) onnxruntime on that model quantized as
``vitlab export --quantize int8`` does (dynamic int8 weights).

For each: batch-1 latency (p50, p90 over timed iterations after a warm-up) and batch-N throughput. The
measurements are interleaved in rounds (eager, compile, onnxruntime, eager, ...) so that a change in the
machine's background load touches every runtime alike instead of the one that happened to run then. All
runtimes use the same intra-op thread count and the same random-weight model (nothing is downloaded).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.bench.common import bench_model, check_positive, cores, load_avg
from vitlab.errors import UserError

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


def build_runtimes(model, image_size: int, threads: int, compile: bool, opset: int,
                   workdir: Path) -> tuple[dict[str, Callable[[np.ndarray], Any] | None], dict[str, Any]]:
    """name -> callable(input batch) for every runtime that works here, and per-runtime notes (setup time,
    or 'unavailable: reason')."""
    import torch

    from vitlab.export import INPUT_NAME, INT8_FILE, OUTPUT_NAME, export_onnx_file, ort_session, quantize_int8

    notes: dict[str, Any] = {}
    runtimes: dict[str, Callable[[np.ndarray], Any] | None] = {}

    def eager(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    runtimes["torch_eager"] = eager
    notes["torch_eager"] = {}

    if compile:
        try:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            x1 = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
            with torch.inference_mode():
                compiled(torch.from_numpy(x1))
            notes["torch_compile"] = {"compile_s": round(time.perf_counter() - t0, 1)}

            def run_compiled(x: np.ndarray):
                with torch.inference_mode():
                    return compiled(torch.from_numpy(x))

            runtimes["torch_compile"] = run_compiled
        except Exception as e:  # inductor needs a working C++ toolchain; many CPU builds lack one
            log.warning("torch.compile unavailable: %s", e)
            notes["torch_compile"] = {"unavailable": _first_line(e)}
            runtimes["torch_compile"] = None
    else:
        notes["torch_compile"] = {"unavailable": "skipped (--no-compile)"}
        runtimes["torch_compile"] = None

    try:
        t0 = time.perf_counter()
        path = export_onnx_file(model, workdir / "model.onnx", image_size, opset)
        export_s = time.perf_counter() - t0
        session = ort_session(path, threads)
        runtimes["onnxruntime"] = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})
        x1 = np.random.default_rng(1).standard_normal((2, 3, image_size, image_size), dtype=np.float32)
        with torch.inference_mode():
            diff = float(np.abs(session.run([OUTPUT_NAME], {INPUT_NAME: x1})[0]
                                - model(torch.from_numpy(x1)).numpy()).max())
        notes["onnxruntime"] = {"export_s": round(export_s, 1), "max_abs_diff_vs_eager": diff,
                                "graph_optimization": "ORT_ENABLE_ALL", "intra_op_threads": threads}
    except Exception as e:
        log.warning("onnxruntime unavailable: %s", e)
        notes["onnxruntime"] = {"unavailable": _first_line(e)}
        runtimes["onnxruntime"] = None
    if runtimes["onnxruntime"] is None:
        notes["onnxruntime_int8"] = {"unavailable": "no fp32 ONNX model"}
        runtimes["onnxruntime_int8"] = None
        return runtimes, notes
    try:  # what `vitlab export --quantize int8` writes, from the same fp32 file
        t0 = time.perf_counter()
        int8_session = ort_session(quantize_int8(path, workdir / INT8_FILE), threads)
        quantize_s = time.perf_counter() - t0
        runtimes["onnxruntime_int8"] = lambda x: int8_session.run([OUTPUT_NAME], {INPUT_NAME: x})
        x8 = np.random.default_rng(2).standard_normal((8, 3, image_size, image_size), dtype=np.float32)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x8)).numpy()
        out = int8_session.run([OUTPUT_NAME], {INPUT_NAME: x8})[0]
        notes["onnxruntime_int8"] = {
            "quantize_s": round(quantize_s, 1), "max_abs_diff_vs_eager": float(np.abs(out - ref).max()),
            # random weights and inputs: a numerics check only; `vitlab export --quantize int8` measures a
            # trained model's agreement on its val images
            "top1_agreement_vs_eager": float((out.argmax(1) == ref.argmax(1)).mean()),
            "quantization": "dynamic, int8 weights per channel", "intra_op_threads": threads}
    except Exception as e:
        log.warning("onnxruntime int8 unavailable: %s", e)
        notes["onnxruntime_int8"] = {"unavailable": _first_line(e)}
        runtimes["onnxruntime_int8"] = None
    return runtimes, notes


def bench_infer(model_name: str = "vit_small_patch16_224", image_size: int = 224, batch_size: int = 32,
                threads: int | None = None, iters: int | None = None, warmup: int | None = None,
                throughput_iters: int | None = None, compile: bool = True, quick: bool = False,
                opset: int = 17, num_classes: int = 1000) -> dict[str, Any]:
    """Run every runtime and return the report (JSON keys documented in the README)."""
    import torch

    from vitlab.export import check_opset
    from vitlab.model import create_model

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
        runtimes, notes = build_runtimes(model, image_size, threads, compile, opset, workdir)
        live = {k: fn for k, fn in runtimes.items() if fn is not None}
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
    for name in runtimes:
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
    for name in ("torch_compile", "onnxruntime", "onnxruntime_int8"):
        r = results[name]
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
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    b = s["batch_size"]
    key = f"batch{b}_images_per_s"
    lines = [f"{s['model']} {s['image_size']}px, {s['threads']} threads, {s['iters']} batch-1 iterations "
             f"(p50 / p90), batch {b} throughput",
             f"{'runtime':<18}{'p50 ms':>9}{'p90 ms':>9}{'img/s':>9}{'p50 vs eager':>14}{'img/s vs eager':>16}"]
    for name in ("torch_eager", "torch_compile", "onnxruntime", "onnxruntime_int8"):
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
