"""From a trained run to a deployed model: load any model form, export to ONNX with a parity check, predict.

Every command starts from a ``ModelBundle``: the model plus what it needs around it (class names in index
order, input size, mean/std, crop_pct, the MLflow run it came from). ``load_bundle`` builds one from any of
the MODEL forms a user has in hand:

* ``runs/<name>/best_model.pt`` (a plain timm state_dict): the config comes from the run directory's
  ``checkpoint_*/config.yaml``, the class names from the dataset's manifest;
* a checkpoint directory ``checkpoint_*/`` (or its ``state.pt``): its own ``config.yaml``;
* an MLflow model URI (``runs:/<id>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``): the
  logged model, with ``config.yaml`` and ``manifest.json`` from the run's artifacts;
* an export directory (``model.onnx`` + ``classes.json``), for prediction with onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.errors import UserError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CLASSES_FILE = "classes.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs opset 14
MAX_OPSET = 20  # the TorchScript exporter's newest
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 8)
INT8_MIN_AGREEMENT = 0.99  # int8 top-1 == fp32 top-1 on at least this share of the check images
INT8_CHECK_IMAGES = 1000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MLFLOW_SCHEMES = ("runs:/", "models:/")


class ParityError(RuntimeError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""


@dataclass
class ModelBundle:
    """A model ready for inference and everything its inputs and outputs need."""

    source: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # a torch module in eval mode on CPU, or None for an ONNX export
    onnx_path: Path | None = None
    wnids: list[str] | None = None
    run_id: str | None = None  # the MLflow run the model came from
    tracking_uri: str | None = None
    data_path: str | None = None  # the dataset it was trained on (its val split checks an int8 export)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def classes_json(self) -> dict[str, Any]:
        """What ``classes.json`` holds: enough to preprocess an image and name the outputs."""
        return {
            "classes": self.classes,
            "wnids": self.wnids,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, self.image_size, self.image_size],
                      "dtype": "float32", "layout": "NCHW, RGB, (x / 255 - mean) / std"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", self.num_classes], "kind": "logits"},
            "preprocess": f"resize shorter side to image_size / crop_pct, center-crop {self.image_size}",
            "model": {"name": self.model_name, "kwargs": self.model_kwargs},
            "source": self.source,
            "mlflow_run_id": self.run_id,
        }

    def runner(self, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """A function from a normalised float32 NCHW batch to logits (torch, or onnxruntime for an export)."""
        if self.model is None:
            session = ort_session(self.onnx_path, threads)
            return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        import torch

        if threads:
            torch.set_num_threads(threads)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).float().numpy()

        return run


# ---------------------------------------------------------------------------------------------------------
# Loading any MODEL form


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(MLFLOW_SCHEMES)


def load_bundle(spec: str, tracking_uri: str | None = None) -> ModelBundle:
    """A ModelBundle from a model file, checkpoint, run directory, export directory or MLflow model URI."""
    from vitlab.train import state
    from vitlab.train.trainer import BEST_MODEL_FILE

    if is_mlflow_uri(spec):
        return _from_mlflow(spec, tracking_uri)
    path = Path(spec)
    if path.is_dir():
        if (path / ONNX_FILE).is_file():
            return _from_export_dir(path)
        if (path / state.STATE_FILE).is_file():
            return _from_torch_file(path / state.STATE_FILE, spec)
        if (path / BEST_MODEL_FILE).is_file():
            return _from_torch_file(path / BEST_MODEL_FILE, spec)
        raise UserError(f"{spec}: a directory without {ONNX_FILE}, {state.STATE_FILE} or {BEST_MODEL_FILE} "
                        "(expected an export directory, a checkpoint or a run directory of 'vitlab train')")
    if path.is_file():
        if path.suffix == ".onnx":
            return _from_export_dir(path.parent, path)
        return _from_torch_file(path, spec)
    raise UserError(f"{spec}: no such file or directory (expected a model file or checkpoint from "
                    "'vitlab train', an export directory, or an MLflow URI runs:/<id>/model, models:/<name>@<alias>)")


def _config_beside(path: Path):
    """The resolved JobConfig saved with the weights: the checkpoint's own config.yaml, else the newest
    sibling checkpoint's (best_model.pt sits in the run directory beside its checkpoints)."""
    import yaml

    from vitlab.config import validate
    from vitlab.train import state

    candidates = [path.parent / state.CONFIG_FILE]
    candidates += sorted(path.parent.glob(f"checkpoint_*/{state.CONFIG_FILE}"), key=lambda p: p.stat().st_mtime,
                         reverse=True)
    for f in candidates:
        if f.is_file():
            return validate(yaml.safe_load(f.read_text()) or {}, str(f))
    raise UserError(f"{path}: no {state.CONFIG_FILE} beside it or in a sibling checkpoint_*/ "
                    "(expected a file written by 'vitlab train')")


def _classes_from_manifest(data_path: str) -> tuple[list[str] | None, list[str] | None]:
    from vitlab.data.manifest import load_manifest

    try:
        manifest = load_manifest(data_path)
    except (UserError, OSError) as e:
        log.warning("class names unavailable (%s); using class indices", e)
        return None, None
    return manifest.classes, manifest.data.get("wnids")


def _head_classes(cfg, state_dict: dict[str, Any]) -> int:
    """The number of classes the weights were trained for, from the classifier's bias or weight."""
    import torch

    from vitlab.model import create_model, timm_kwargs

    with torch.device("meta"):
        probe = create_model(cfg.model.name, 1, timm_kwargs(cfg))
    name = probe.pretrained_cfg.get("classifier", "head")
    for key in (f"{name}.bias", f"{name}.weight", f"{name}.fc.bias"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise UserError(f"cannot tell the number of classes: no '{name}' classifier in the weights")


def _build(cfg, state_dict: dict[str, Any], num_classes: int, source: str):
    from vitlab.model import create_model, timm_kwargs

    model = create_model(cfg.model.name, num_classes, timm_kwargs(cfg))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{source}: the weights do not fit {cfg.model.name} {timm_kwargs(cfg)} "
                        f"with {num_classes} classes ({' '.join(first[:2])[:300]})") from None
    return model.eval()


def _from_config(cfg, state_dict, classes, wnids, source: str, run_id=None, uri=None) -> ModelBundle:
    from vitlab.model import timm_kwargs

    if not classes:
        classes = [str(i) for i in range(_head_classes(cfg, state_dict))]
    model = _build(cfg, state_dict, len(classes), source)
    return ModelBundle(
        source=source, classes=list(classes), wnids=wnids, image_size=cfg.data.image_size,
        mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), crop_pct=cfg.data.crop_pct,
        model_name=cfg.model.name, model_kwargs=timm_kwargs(cfg), model=model, run_id=run_id, tracking_uri=uri,
        data_path=cfg.data.path,
    )


def _from_torch_file(path: Path, source: str) -> ModelBundle:
    import pickle

    import torch

    from vitlab.train import state

    try:
        if path.name == state.STATE_FILE:
            obj = state.load_state(path.parent)  # holds RNG states: not a weights-only file
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{source}: not a PyTorch model file ({str(e).splitlines()[0][:200]})") from None
    weights = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{source}: expected a state_dict (best_model.pt) or a checkpoint (state.pt)")
    cfg = _config_beside(path)
    classes, wnids = _classes_from_manifest(cfg.data.path)
    return _from_config(cfg, weights, classes, wnids, source)


def _from_export_dir(root: Path, onnx_path: Path | None = None) -> ModelBundle:
    meta_file = root / CLASSES_FILE
    if not meta_file.is_file():
        raise UserError(f"{root}: {ONNX_FILE} without {CLASSES_FILE} (expected a directory from 'vitlab export')")
    try:
        meta = json.loads(meta_file.read_text())
        return ModelBundle(
            source=str(root), classes=list(meta["classes"]), wnids=meta.get("wnids"),
            image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
            crop_pct=float(meta["crop_pct"]), model_name=(meta.get("model") or {}).get("name"),
            model_kwargs=(meta.get("model") or {}).get("kwargs") or {}, onnx_path=onnx_path or root / ONNX_FILE,
            run_id=meta.get("mlflow_run_id"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_file}: not a vitlab classes.json ({e})") from None


def _from_mlflow(spec: str, tracking_uri: str | None) -> ModelBundle:
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from vitlab.config import validate
    from vitlab.tracking import quiet_mlflow, resolve_tracking_uri

    quiet_mlflow()
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        info = mlflow.models.get_model_info(spec)
    except (MlflowException, OSError) as e:
        msg = getattr(e, "message", str(e)).strip().splitlines()[0][:300]
        raise UserError(f"{spec}: not found in the MLflow store {uri} ({msg})") from None
    run_id = info.run_id
    if not run_id:
        raise UserError(f"{spec}: the model is not attached to an MLflow run (need its config.yaml)")
    with tempfile.TemporaryDirectory(prefix="vitlab-model-") as tmp:
        files = {}
        for name in ("config.yaml", "manifest.json"):
            try:
                files[name] = Path(mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=uri)).read_text()
            except (MlflowException, OSError):
                files[name] = None
        if "onnx" in info.flavors and "pytorch" not in info.flavors:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=f"{tmp}/model"))
            export_dir = Path(tempfile.mkdtemp(prefix="vitlab-onnx-"))
            for f in local.rglob("*"):
                if f.name in (ONNX_FILE, CLASSES_FILE) or f.suffix == ".data":
                    shutil.copy(f, export_dir / f.name)
            bundle = _from_export_dir(export_dir)
            bundle.source, bundle.run_id, bundle.tracking_uri = spec, run_id, uri
            return bundle
    if files["config.yaml"] is None:
        raise UserError(f"{spec}: run {run_id} has no config.yaml artifact (expected a run of 'vitlab train')")
    cfg = validate(yaml.safe_load(files["config.yaml"]) or {}, f"{spec} config.yaml")
    manifest = json.loads(files["manifest.json"]) if files["manifest.json"] else {}
    # The logged model is a torch.export program (MLflow's pt2 format): its weights go into a fresh timm
    # model built from the run's config, so export and predict work on the same module as for files.
    logged = mlflow.pytorch.load_model(spec, map_location="cpu")
    return _from_config(cfg, dict(logged.state_dict()), manifest.get("classes"), manifest.get("wnids"), spec,
                        run_id, uri)


# ---------------------------------------------------------------------------------------------------------
# ONNX export and parity


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session: all graph optimisations, intra-op threads = the cores given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset}: expected {MIN_OPSET}-{MAX_OPSET} (the TorchScript ONNX exporter's range)")


def export_onnx_file(model, path: Path, image_size: int, opset: int = DEFAULT_OPSET) -> Path:
    """torch -> ONNX with a dynamic batch axis. The TorchScript exporter (dynamo=False) needs no onnxscript
    and traces timm's ViTs (fused attention included) into plain ONNX ops that onnxruntime fuses."""
    import torch

    check_opset(opset)
    example = torch.randn(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            model.eval(), (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


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
            raise ParityError(f"batch {b}: onnxruntime output shape {out.shape} != torch {ref.shape}")
        diffs[str(b)] = float(np.abs(out - ref).max())
    return {"batch_sizes": list(batch_sizes), "max_abs_diff": diffs, "max": max(diffs.values())}


def quantize_int8(fp32_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantization (onnxruntime): MatMul/Gemm weights int8 per output channel, activations
    quantized on the fly. Most of a ViT's CPU time is those MatMuls; the rest stays fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns "consider pre-processing" on the root logger at every call
    try:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    return out_path


def _val_images(bundle: ModelBundle, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``limit`` val images (decoded, normalised) and labels of the model's dataset, if it is here."""
    import pyarrow.parquet as pq

    from vitlab.data.manifest import load_manifest
    from vitlab.data.transforms import decode_val

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
            images.append(decode_val(data, bundle.image_size, bundle.crop_pct))
            labels.append(label)
            if len(images) == limit:
                break
        if len(images) == limit:
            break
    return normalize(np.stack(images), bundle.mean, bundle.std), np.asarray(labels)


def check_int8(bundle: ModelBundle, int8_path: Path, min_agreement: float, threads: int | None = None,
               limit: int = INT8_CHECK_IMAGES) -> dict[str, Any]:
    """How often the int8 model's top-1 matches torch fp32's, on the model's own val images when its dataset
    is on this machine (with both val top-1s), else on random inputs."""
    import torch

    val = _val_images(bundle, limit)
    if val is None:
        x = torch.randn(64, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0))
        images, labels, on = x.numpy(), None, "random inputs"
    else:
        (images, labels), on = val, "val images"
    session = ort_session(int8_path, threads)
    ref, out = [], []
    for i in range(0, len(images), 64):
        batch = images[i:i + 64]
        with torch.inference_mode():
            ref.append(bundle.model(torch.from_numpy(batch)).float().numpy())
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    ref_top1, int8_top1 = np.concatenate(ref).argmax(1), np.concatenate(out).argmax(1)
    report: dict[str, Any] = {"on": on, "images": len(images), "min_agreement": min_agreement,
                              "top1_agreement": round(float((ref_top1 == int8_top1).mean()), 4)}
    if labels is not None:
        report["fp32_val_top1"] = round(float((ref_top1 == labels).mean()), 4)
        report["int8_val_top1"] = round(float((int8_top1 == labels).mean()), 4)
    report["ok"] = report["top1_agreement"] >= min_agreement
    return report


def export(bundle: ModelBundle, out_dir: str | Path, opset: int = DEFAULT_OPSET, atol: float = PARITY_ATOL,
           log_to_mlflow: bool = True, quantize: str | None = None,
           int8_min_agreement: float = INT8_MIN_AGREEMENT) -> dict[str, Any]:
    """Write OUT/model.onnx and OUT/classes.json, check onnxruntime against torch, log to the model's
    MLflow run (when it came from one). Nothing is put in place unless parity holds. ``quantize="int8"`` also
    writes OUT/model.int8.onnx, put in place only if its top-1 agrees with fp32's often enough."""
    if bundle.model is None:
        raise UserError(f"{bundle.source}: already an ONNX export (give a model file, checkpoint or MLflow URI)")
    check_opset(opset)
    if not 0.0 <= int8_min_agreement <= 1.0:
        raise UserError(f"--int8-min-agreement {int8_min_agreement}: expected a share between 0 and 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        export_onnx_file(bundle.model, tmp / ONNX_FILE, bundle.image_size, opset)
        (tmp / CLASSES_FILE).write_text(json.dumps({**bundle.classes_json(), "opset": opset}, indent=2))
        parity = check_parity(bundle.model, tmp / ONNX_FILE, bundle.image_size)
        parity.update(atol=atol, ok=parity["max"] <= atol)
        if not parity["ok"]:
            raise ParityError(
                f"onnxruntime differs from torch by {parity['max']:.3g} > {atol:g} (max |diff| per batch size: "
                f"{parity['max_abs_diff']}); nothing written to {out}")
        files = [ONNX_FILE, CLASSES_FILE]
        int8 = None
        if quantize == "int8":
            quantize_int8(tmp / ONNX_FILE, tmp / INT8_FILE)
            int8 = check_int8(bundle, tmp / INT8_FILE, int8_min_agreement)
            if not int8["ok"]:
                raise ParityError(
                    f"int8 top-1 agrees with fp32 on {int8['top1_agreement']:.1%} of {int8['images']} "
                    f"{int8['on']} < {int8_min_agreement:.1%}; nothing written to {out}")
            int8["bytes"] = (tmp / INT8_FILE).stat().st_size
            files.append(INT8_FILE)
        out.mkdir(exist_ok=True)
        for name in files:  # atomic per file: a crash never leaves a half-written model
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report: dict[str, Any] = {
        "onnx": str(out / ONNX_FILE), "classes_json": str(out / CLASSES_FILE), "opset": opset,
        "bytes": (out / ONNX_FILE).stat().st_size, "source": bundle.source, "num_classes": bundle.num_classes,
        "image_size": bundle.image_size, "parity": parity, "mlflow_run_id": bundle.run_id, "mlflow_model_uri": None,
    }
    if int8 is not None:
        report["int8"] = {"onnx": str(out / INT8_FILE), **int8}
    if bundle.run_id and log_to_mlflow:
        from vitlab.tracking import log_onnx_model

        report["mlflow_model_uri"] = log_onnx_model(bundle.tracking_uri, bundle.run_id, out / ONNX_FILE,
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
    q = report.get("int8")
    if q:
        accuracy = (f"; val top-1 int8 {q['int8_val_top1']:.2%} vs fp32 {q['fp32_val_top1']:.2%}"
                    if "int8_val_top1" in q else "")
        lines.append(f"wrote {q['onnx']} ({q['bytes'] / 1e6:.1f} MB, dynamic int8): top-1 agrees with fp32 on "
                     f"{q['top1_agreement']:.1%} of {q['images']} {q['on']}{accuracy}: OK")
    if report.get("mlflow_model_uri"):
        lines.append(f"logged to MLflow run {report['mlflow_run_id']}: {report['mlflow_model_uri']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Prediction


def list_images(paths: list[str]) -> list[Path]:
    """Files as given (in order) and, for directories, their image files (recursively, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            files.extend(found)
        else:
            files.append(p)  # a missing or unreadable file gets its own error line below
    return files


def _decode(path: Path, size: int, crop_pct: float) -> np.ndarray:
    from vitlab.data.transforms import decode_val

    return decode_val(path.read_bytes(), size, crop_pct)


def _read_error(path: Path, e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError | PermissionError):
        return f"cannot read ({e.strerror})"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"not a readable image ({first})"


def _batches(files: list[Path], bundle: ModelBundle, batch_size: int,
             errors: dict[Path, str]) -> Iterator[tuple[list[Path], np.ndarray]]:
    paths: list[Path] = []
    images: list[np.ndarray] = []
    for f in files:
        try:
            images.append(_decode(f, bundle.image_size, bundle.crop_pct))
            paths.append(f)
        except Exception as e:  # any decoder failure is this file's problem; the rest still run
            errors[f] = _read_error(f, e)
            log.debug("cannot decode %s", f, exc_info=True)
        if len(images) == batch_size:
            yield paths, np.stack(images)
            paths, images = [], []
    if images:
        yield paths, np.stack(images)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, (x / 255 - mean) / std: the training pipeline's normalize_on_device."""
    import torch

    from vitlab.data.pipeline import normalize_on_device

    return normalize_on_device(torch.from_numpy(images), mean, std).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(bundle: ModelBundle, images: list[str], top_k: int = 5, batch_size: int = 32,
            threads: int | None = None) -> dict[str, Any]:
    """Val preprocessing, then the top-k classes per image. A file that cannot be decoded gets an error entry
    and the rest still run; a run where no file could be read at all is a UserError."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: expected at least 1")
    files = list_images(images)
    run = bundle.runner(threads)
    k = min(top_k, bundle.num_classes)
    errors: dict[Path, str] = {}
    by_path: dict[Path, dict[str, Any]] = {}
    for paths, batch in _batches(files, bundle, batch_size, errors):
        probs = softmax(run(normalize(batch, bundle.mean, bundle.std)).astype(np.float64))
        for path, p in zip(paths, probs, strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            by_path[path] = {"path": str(path), "top_k": [
                {"class": bundle.classes[i], "index": int(i), "probability": round(float(p[i]), 6),
                 **({"wnid": bundle.wnids[i]} if bundle.wnids else {})} for i in order]}
    results = [by_path[f] if f in by_path else {"path": str(f), "error": errors[f]} for f in files]
    if not by_path:
        first = results[0]
        raise UserError(f"no image could be read ({len(files)} given; {first['path']}: {first['error']})")
    return {"model": bundle.source, "top_k": k, "images": len(by_path), "errors": len(errors),
            "image_size": bundle.image_size, "results": results}


def format_predictions(report: dict[str, Any]) -> str:
    lines = []
    for r in report["results"]:
        if "error" in r:
            continue  # printed on stderr by the CLI
        best = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
        lines.append(f"{r['path']}: {best}")
    tail = f"{report['images']} images" + (f", {report['errors']} unreadable" if report["errors"] else "")
    lines.append(f"{tail} (top-{report['top_k']}, model {report['model']})")
    return "\n".join(lines)
