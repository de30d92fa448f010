"""The CPU runtimes a trained model can be served with, each built from the same torch model (RUNTIMES).

A builder returns a runner (a float32 NCHW batch -> logits) and notes on how it was set up (compile or export
time, its difference from eager). Builders that write files write them in ``setup.workdir``. `vitlab bench
infer` times every runtime side by side; adding one is one builder and one entry here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.deploy.bundle import INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from vitlab.deploy.onnx import INT8_FILE, export_onnx_file, ort_session, quantize_int8

Runner = Callable[[np.ndarray], Any]


@dataclass
class RuntimeSetup:
    model: Any  # a timm model in eval mode, on CPU
    image_size: int
    threads: int
    opset: int
    workdir: Path


def _eager_logits(setup: RuntimeSetup, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return setup.model(torch.from_numpy(x)).float().numpy()


def _inputs(seed: int, batch: int, setup: RuntimeSetup) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, setup.image_size, setup.image_size),
                                                       dtype=np.float32)


def torch_eager(setup: RuntimeSetup) -> tuple[Runner, dict[str, Any]]:
    return (lambda x: _eager_logits(setup, x)), {}


def torch_compile(setup: RuntimeSetup) -> tuple[Runner, dict[str, Any]]:
    """Inductor; it needs a working C++ toolchain, which many CPU builds lack (then: unavailable)."""
    import torch

    compiled = torch.compile(setup.model)

    def run(x: np.ndarray):
        with torch.inference_mode():
            return compiled(torch.from_numpy(x))

    t0 = time.perf_counter()
    run(_inputs(0, 1, setup))
    return run, {"compile_s": round(time.perf_counter() - t0, 1)}


FUSED_FILE = "model.fused.onnx"


def _onnx_file(setup: RuntimeSetup, optimize: bool = False) -> tuple[Path, float, dict[str, int]]:
    """The model as `vitlab export` (``optimize``: `--optimize`) writes it; returns (path, seconds taken, fused
    node counts). The plain file is exported once per workdir: the int8 runtime quantizes it."""
    path = setup.workdir / (FUSED_FILE if optimize else ONNX_FILE)
    if path.is_file() and not optimize:
        return path, 0.0, {}
    t0 = time.perf_counter()
    fused = export_onnx_file(setup.model, path, setup.image_size, setup.opset, optimize=optimize)
    return path, time.perf_counter() - t0, fused


def _session_runner(path: Path, setup: RuntimeSetup) -> Runner:
    session = ort_session(path, setup.threads)
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def onnxruntime_fp32(setup: RuntimeSetup, optimize: bool = False) -> tuple[Runner, dict[str, Any]]:
    path, export_s, fused = _onnx_file(setup, optimize)
    run = _session_runner(path, setup)
    x = _inputs(1, 2, setup)
    diff = float(np.abs(run(x) - _eager_logits(setup, x)).max())
    notes = {"export_s": round(export_s, 1), "max_abs_diff_vs_eager": diff, "graph_optimization": "ORT_ENABLE_ALL",
             "intra_op_threads": setup.threads}
    return run, {**notes, "fused": fused} if optimize else notes


def onnxruntime_fused(setup: RuntimeSetup) -> tuple[Runner, dict[str, Any]]:
    """What `vitlab export --optimize` writes: each attention block one onnxruntime Attention node."""
    return onnxruntime_fp32(setup, optimize=True)


def onnxruntime_int8(setup: RuntimeSetup) -> tuple[Runner, dict[str, Any]]:
    """What `vitlab export --quantize int8` writes, from the same (plain) fp32 file."""
    path, _, _ = _onnx_file(setup)
    t0 = time.perf_counter()
    run = _session_runner(quantize_int8(path, setup.workdir / INT8_FILE), setup)
    quantize_s = time.perf_counter() - t0
    x = _inputs(2, 8, setup)
    out, ref = run(x), _eager_logits(setup, x)
    return run, {
        "quantize_s": round(quantize_s, 1), "max_abs_diff_vs_eager": float(np.abs(out - ref).max()),
        # random weights and inputs: a numerics check only; `vitlab export --quantize int8` measures a trained
        # model's agreement on its val images
        "top1_agreement_vs_eager": float((out.argmax(1) == ref.argmax(1)).mean()),
        "quantization": "dynamic, int8 weights per channel", "intra_op_threads": setup.threads}


# Built and reported in this order; eager first: the others are compared with it.
RUNTIMES: dict[str, Callable[[RuntimeSetup], tuple[Runner, dict[str, Any]]]] = {
    "torch_eager": torch_eager,
    "torch_compile": torch_compile,
    "onnxruntime": onnxruntime_fp32,
    "onnxruntime_fused": onnxruntime_fused,
    "onnxruntime_int8": onnxruntime_int8,
}
