"""ONNX export of a ModelBundle, checked before anything is put in place: fp32 parity with torch on random
inputs, and for a quantized copy (QUANTIZERS) top-1 agreement with torch fp32 on the model's own val images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vitlab import outdir, tracking
from vitlab.data.manifest import load_manifest
from vitlab.deploy import fusion
from vitlab.deploy.bundle import CLASSES_FILE, INPUT_NAME, ONNX_FILE, OUTPUT_NAME, ModelBundle
from vitlab.errors import UserError

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs opset 14
MAX_OPSET = 20  # the TorchScript exporter's newest
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 8)
INT8_MIN_AGREEMENT = 0.99  # int8 top-1 == fp32 top-1 on at least this share of the check images
INT8_CHECK_IMAGES = 1000
# Dynamic int8 quantizes each batch with its own scales: a prediction depends a little on its batch's other images.
INT8_CHECK_BATCH = 64


class ExportCheckError(RuntimeError):
    """The exported model's outputs do not agree with torch's closely enough; nothing was written."""


def ort_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session (of a file, or of the model's bytes): all graph optimisations, intra-op
    threads = the cores given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                providers=["CPUExecutionProvider"])


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset}: expected {MIN_OPSET}-{MAX_OPSET} (the TorchScript ONNX exporter's range)")


def export_onnx_file(model, path: Path, image_size: int, opset: int = DEFAULT_OPSET,
                     optimize: bool = False) -> dict[str, int]:
    """torch -> ONNX with a dynamic batch axis. The TorchScript exporter (dynamo=False) needs no onnxscript
    and traces timm's ViTs (fused attention included) into plain ONNX ops that onnxruntime fuses. ``optimize``:
    attention exported in the form onnxruntime's transformer optimizer fuses, and fused (deploy/fusion.py).
    Returns the fused node counts ({} without ``optimize``)."""
    import torch

    check_opset(opset)
    example = torch.randn(1, 3, image_size, image_size)
    with fusion.fusable_attention(model) if optimize else contextlib.nullcontext() as blocks, \
            warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            model.eval(), (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    if not optimize:
        return {}
    return fusion.fuse_onnx(path, blocks[0].num_heads, blocks[0].attn_dim)


def check_parity(model, onnx_path: Path, image_size: int, batch_sizes=PARITY_BATCH_SIZES, seed: int = 0,
                 threads: int | None = None) -> dict[str, Any]:
    """Max absolute difference of onnxruntime's logits from torch's (fp32) on random inputs per batch size."""
    import torch

    session = ort_session(onnx_path, threads)
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batch_sizes:
        x = torch.randn(b, 3, image_size, image_size, generator=gen)
        with torch.inference_mode():
            ref = model(x).float().numpy()
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if out.shape != ref.shape:
            raise ExportCheckError(f"fp32 parity check failed: batch {b}: onnxruntime output shape {out.shape} "
                                   f"!= torch {ref.shape}")
        diffs[str(b)] = float(np.abs(out - ref).max())
    return {"batch_sizes": list(batch_sizes), "max_abs_diff": diffs, "max": max(diffs.values())}


def quantize_int8(fp32_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantization (onnxruntime): MatMul/Gemm weights int8 per output channel, activations
    quantized on the fly. Most of a ViT's CPU time is those MatMuls; the rest stays fp32. A fused graph's
    Attention nodes become QAttention (their output type, which ONNX shape inference does not know: float)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns "consider pre-processing" on the root logger at every call
    try:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    return out_path


# --quantize's choices: name -> (fp32 model file, output file) -> output file, and the file name it writes.
QUANTIZERS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {"int8": (quantize_int8, INT8_FILE)}


def _val_images(bundle: ModelBundle, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``limit`` val images (decoded, normalised) and labels of the model's dataset, if it is here."""
    try:
        manifest = load_manifest(bundle.data_path) if bundle.data_path else None
    except (UserError, OSError):  # the dataset is not on this machine (or its bucket is not reachable)
        return None
    if manifest is None or manifest.rows("val") == 0:
        return None
    images, labels = [], []
    for f in manifest.files("val"):
        table = pq.read_table(f, columns=["image", "label"]).to_pydict()
        for data, label in zip(table["image"], table["label"], strict=True):
            images.append(bundle.decode(data))
            labels.append(label)
            if len(images) == limit:
                break
        if len(images) == limit:
            break
    return bundle.normalize(np.stack(images)), np.asarray(labels)


def check_quantized(bundle: ModelBundle, path: Path, min_agreement: float, threads: int | None = None,
                    limit: int = INT8_CHECK_IMAGES) -> dict[str, Any]:
    """How often the quantized model's top-1 matches torch fp32's, on the model's own val images when its
    dataset is on this machine (with both val top-1s), else on random inputs."""
    import torch

    val = _val_images(bundle, limit)
    if val is None:
        x = torch.randn(64, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0))
        images, labels, on = x.numpy(), None, "random inputs"
    else:
        (images, labels), on = val, "val images"
    session = ort_session(path, threads)
    ref, out = [], []
    for i in range(0, len(images), INT8_CHECK_BATCH):
        batch = images[i:i + INT8_CHECK_BATCH]
        with torch.inference_mode():
            ref.append(bundle.model(torch.from_numpy(batch)).float().numpy())
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    ref_top1, q_top1 = np.concatenate(ref).argmax(1), np.concatenate(out).argmax(1)
    report: dict[str, Any] = {"on": on, "images": len(images), "min_agreement": min_agreement,
                              "top1_agreement": round(float((ref_top1 == q_top1).mean()), 4)}
    if labels is not None:
        report["fp32_val_top1"] = round(float((ref_top1 == labels).mean()), 4)
        report["int8_val_top1"] = round(float((q_top1 == labels).mean()), 4)
    report["ok"] = report["top1_agreement"] >= min_agreement
    return report


def check_out(out: Path, overwrite: bool) -> None:
    """OUT may be new or empty, or with --overwrite an earlier export (it holds classes.json): nothing else is
    ever replaced."""
    outdir.recover(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out}: already exists (pass --overwrite to replace that export)")
    if not (out / CLASSES_FILE).is_file():
        raise UserError(f"--out {out}: --overwrite refused: not an export vitlab wrote (no {CLASSES_FILE})")


def export(bundle: ModelBundle, out_dir: str | Path, opset: int = DEFAULT_OPSET, atol: float = PARITY_ATOL,
           log_to_mlflow: bool = True, quantize: str | None = None,
           int8_min_agreement: float = INT8_MIN_AGREEMENT, overwrite: bool = False,
           optimize: bool = False) -> dict[str, Any]:
    """Write OUT/model.onnx and OUT/classes.json, check onnxruntime against torch, log to the model's
    MLflow run (when it came from one). Nothing is put in place unless parity holds. ``quantize`` (a
    QUANTIZERS name) also writes the quantized file, put in place only if its top-1 agrees with fp32's often
    enough. An existing OUT is replaced whole, only with ``overwrite``. ``optimize``: model.onnx is the graph
    with onnxruntime's fused Attention nodes (deploy/fusion.py), and the quantized file is made from it."""
    if bundle.model is None:
        raise UserError(f"{bundle.source}: already an ONNX export (give a model file, checkpoint or MLflow URI)")
    check_opset(opset)
    if optimize:
        fusion.check_fusable(bundle.model)
    if quantize is not None and quantize not in QUANTIZERS:
        raise UserError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZERS)}")
    if not 0.0 <= int8_min_agreement <= 1.0:
        raise UserError(f"--int8-min-agreement {int8_min_agreement}: expected a share between 0 and 1")
    out = Path(out_dir).resolve()
    check_out(out, overwrite)
    tmp = outdir.staging(out)
    try:
        fused = export_onnx_file(bundle.model, tmp / ONNX_FILE, bundle.image_size, opset, optimize=optimize)
        meta = {**bundle.classes_json(), "opset": opset, **({"fused": fused} if optimize else {})}
        (tmp / CLASSES_FILE).write_text(json.dumps(meta, indent=2))
        parity = check_parity(bundle.model, tmp / ONNX_FILE, bundle.image_size)
        parity.update(atol=atol, ok=parity["max"] <= atol)
        if not parity["ok"]:
            raise ExportCheckError(
                f"fp32 parity check failed: onnxruntime differs from torch by {parity['max']:.3g} > {atol:g} "
                f"(max |diff| per batch size: {parity['max_abs_diff']}); nothing written to {out}")
        quantized = None
        if quantize is not None:
            quantizer, name = QUANTIZERS[quantize]
            quantizer(tmp / ONNX_FILE, tmp / name)
            quantized = check_quantized(bundle, tmp / name, int8_min_agreement)
            if not quantized["ok"]:
                raise ExportCheckError(
                    f"{quantize} check failed: {quantize} top-1 agrees with fp32 on "
                    f"{quantized['top1_agreement']:.1%} of {quantized['images']} {quantized['on']} < "
                    f"{int8_min_agreement:.1%}; nothing written to {out}")
            quantized.update(onnx=str(out / name), bytes=(tmp / name).stat().st_size)
        outdir.swap(tmp, out)  # the whole directory: no file of an earlier export survives beside these
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report: dict[str, Any] = {
        "onnx": str(out / ONNX_FILE), "classes_json": str(out / CLASSES_FILE), "opset": opset,
        "bytes": (out / ONNX_FILE).stat().st_size, "source": bundle.source, "num_classes": bundle.num_classes,
        "image_size": bundle.image_size, "parity": parity, "mlflow_run_id": bundle.run_id, "mlflow_model_uri": None,
        "optimized": optimize,
    }
    if optimize:
        report["fused"] = fused
    if quantized is not None:
        report[quantize] = quantized
    if bundle.run_id and log_to_mlflow:
        report["mlflow_model_uri"] = tracking.log_onnx_model(bundle.tracking_uri, bundle.run_id, out / ONNX_FILE,
                                                             out / CLASSES_FILE, parity)
    return report


def format_export(report: dict[str, Any]) -> str:
    p = report["parity"]
    per_batch = ", ".join(f"{v:.2e} at batch {k}" for k, v in p["max_abs_diff"].items())
    lines = [
        f"wrote {report['onnx']} ({report['bytes'] / 1e6:.1f} MB, opset {report['opset']}, dynamic batch) "
        f"and {report['classes_json']} ({report['num_classes']} classes, {report['image_size']} px)",
        f"parity onnxruntime vs torch (fp32): max |diff| {per_batch} <= {p['atol']:g}: OK",
    ]
    if report.get("optimized"):
        nodes = ", ".join(f"{n} {op}" for op, n in report["fused"].items())
        lines.insert(1, f"fused for onnxruntime (--optimize): {nodes or 'nothing'} (com.microsoft ops: "
                        "onnxruntime only)")
    for name in QUANTIZERS:
        q = report.get(name)
        if q:
            accuracy = (f"; val top-1 {name} {q['int8_val_top1']:.2%} vs fp32 {q['fp32_val_top1']:.2%}"
                        if "int8_val_top1" in q else "")
            lines.append(f"wrote {q['onnx']} ({q['bytes'] / 1e6:.1f} MB, dynamic {name}): top-1 agrees with fp32 "
                         f"on {q['top1_agreement']:.1%} of {q['images']} {q['on']}{accuracy}: OK")
    if report.get("mlflow_model_uri"):
        lines.append(f"logged to MLflow run {report['mlflow_run_id']}: {report['mlflow_model_uri']}")
    return "\n".join(lines)
