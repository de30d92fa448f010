"""Any MODEL form a user has in hand -> a ``ModelBundle``: the model plus what its inputs and outputs need
(class names in index order, input size, mean/std, crop_pct, the MLflow run it came from).

* ``runs/<name>/best_model.pt`` (a plain timm state_dict): the config comes from the run directory's
  ``checkpoint_*/config.yaml``, the class names from the dataset's manifest;
* a checkpoint directory ``checkpoint_*/`` (or its ``state.pt``), or a run directory: the config saved there;
* an MLflow model URI (``runs:/<id>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``): the
  logged model, with ``config.yaml`` and ``manifest.json`` from the run's artifacts;
* an export directory (``model.onnx`` + ``classes.json``, or a ``.onnx`` file in one), for onnxruntime.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from vitlab import model as models
from vitlab import tracking
from vitlab.config import JobConfig
from vitlab.data.manifest import load_manifest
from vitlab.data.transforms import RESAMPLE, decode_val
from vitlab.errors import UserError
from vitlab.train import state, storage
from vitlab.train.storage import BEST_MODEL_FILE

log = logging.getLogger(__name__)

# An export directory: what `vitlab export` writes and what onnxruntime-side prediction reads.
ONNX_FILE = "model.onnx"
CLASSES_FILE = "classes.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class ModelBundle:
    """A model ready for inference and everything its inputs and outputs need."""

    source: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str = "bilinear"  # of the val resize: data.interpolation of the training
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

    def decode(self, data: bytes) -> np.ndarray:
        """JPEG/PNG/... bytes -> uint8 HWC: the val preprocessing of training (the val pipeline's decode_val)."""
        return decode_val(data, self.image_size, self.crop_pct, self.interpolation)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, (x / 255 - mean) / std: the training pipeline's normalize_on_device, in
        numpy (the same float32 operations in the same order, so the same bits; no torch import, which an
        onnxruntime-only process such as a batch-predict actor would otherwise pay seconds for)."""
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        x /= np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return x

    def classes_json(self) -> dict[str, Any]:
        """What ``classes.json`` holds: enough to preprocess an image and name the outputs."""
        return {
            "classes": self.classes,
            "wnids": self.wnids,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, self.image_size, self.image_size],
                      "dtype": "float32", "layout": "NCHW, RGB, (x / 255 - mean) / std"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", self.num_classes], "kind": "logits"},
            "preprocess": f"resize ({self.interpolation}) shorter side to image_size / crop_pct, center-crop "
                          f"{self.image_size}",
            "model": {"name": self.model_name, "kwargs": self.model_kwargs},
            "source": self.source,
            "mlflow_run_id": self.run_id,
        }


def load_bundle(spec: str, tracking_uri: str | None = None) -> ModelBundle:
    """A ModelBundle from a model file, checkpoint, run directory, export directory or MLflow model URI."""
    if tracking.is_mlflow_uri(spec):
        return _from_mlflow(spec, tracking_uri)
    if storage.is_uri(spec):
        with tempfile.TemporaryDirectory(prefix="vitlab-model-") as tmp:
            bundle = load_bundle(_fetch(spec, Path(tmp)))  # the weights are in memory once loaded
        bundle.source = spec
        return bundle
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


def _fetch(spec: str, tmp: Path) -> str:
    """What ``vitlab train`` printed, in object storage (best_model.pt, a run directory, a checkpoint_*
    directory): the files a bundle reads, copied under ``tmp`` in the same layout; returns the local path."""
    fs, path = storage.filesystem(spec)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise UserError(f"{spec}: no such object (expected best_model.pt, a run directory or a checkpoint_* "
                        "directory that 'vitlab train' printed)")
    parent, name = spec.rstrip("/").rsplit("/", 1)
    if kind == pafs.FileType.File:
        folder = storage.join(str(tmp), "run")
        _copy(spec, storage.join(folder, name))
        checkpoint_dir = parent if name == state.STATE_FILE else _newest_checkpoint(parent)
        if checkpoint_dir:  # the config.yaml the weights were trained with
            into = folder if name == state.STATE_FILE else storage.join(folder, checkpoint_dir.rsplit("/", 1)[1])
            _copy(storage.join(checkpoint_dir, state.CONFIG_FILE), storage.join(into, state.CONFIG_FILE))
        return storage.join(folder, name)
    names = storage.list_names(spec)
    local = storage.join(str(tmp), name)
    if state.STATE_FILE in names:
        for f in (state.STATE_FILE, state.CONFIG_FILE):
            _copy(storage.join(spec, f), storage.join(local, f))
        return local
    if BEST_MODEL_FILE in names:
        _fetch(storage.join(spec, BEST_MODEL_FILE), tmp)
        return storage.join(str(tmp), "run")
    raise UserError(f"{spec}: neither {state.STATE_FILE} nor {BEST_MODEL_FILE} under it (expected a run or "
                    "checkpoint_* directory of 'vitlab train')")


def _newest_checkpoint(run: str) -> str | None:
    names = storage.checkpoint_names(run)
    return storage.join(run, names[-1]) if names else None


def _copy(source: str, target: str) -> None:
    storage.write_bytes(target, storage.read_bytes(source))


def _config_beside(path: Path) -> JobConfig:
    """The resolved JobConfig saved with the weights: the checkpoint's own config.yaml, else the newest
    sibling checkpoint's (best_model.pt sits in the run directory beside its checkpoints)."""
    candidates = [path.parent / state.CONFIG_FILE]
    candidates += sorted(path.parent.glob(f"checkpoint_*/{state.CONFIG_FILE}"), key=lambda p: p.stat().st_mtime,
                         reverse=True)
    for f in candidates:
        if f.is_file():
            return JobConfig.from_yaml(f.read_text(), str(f))
    raise UserError(f"{path}: no {state.CONFIG_FILE} beside it or in a sibling checkpoint_*/ "
                    "(expected a file written by 'vitlab train')")


def _classes_from_manifest(data_path: str) -> tuple[list[str] | None, list[str] | None]:
    try:
        manifest = load_manifest(data_path)
    except (UserError, OSError) as e:
        log.warning("class names unavailable (%s); using class indices", e)
        return None, None
    return manifest.classes, manifest.data.get("wnids")


def _from_config(cfg: JobConfig, state_dict, classes, wnids, source: str, run_id=None, uri=None) -> ModelBundle:
    if not classes:
        classes = [str(i) for i in range(models.head_classes(cfg, state_dict))]
    return ModelBundle(
        source=source, classes=list(classes), wnids=wnids, image_size=cfg.data.image_size,
        mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), crop_pct=cfg.data.crop_pct,
        interpolation=cfg.data.interpolation, model_name=cfg.model.name, model_kwargs=models.timm_kwargs(cfg),
        model=models.with_weights(cfg, len(classes), state_dict, source), run_id=run_id, tracking_uri=uri,
        data_path=cfg.data.path,
    )


def _from_torch_file(path: Path, source: str) -> ModelBundle:
    import torch

    try:
        if path.name == state.STATE_FILE:
            obj = state.load_state(path.parent)  # weights-only, with numpy allowed for the RNG states
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{source}: not a PyTorch model file ({str(e).splitlines()[0][:200]})") from None
    cfg = _config_beside(path)
    # a checkpoint's weights as best_model.pt would take them: the EMA's under run.best_by=val_top1_ema
    key = "model_ema" if cfg.run.best_by == "val_top1_ema" and isinstance(obj, dict) and obj.get("model_ema") \
        else "model"
    weights = obj.get(key) if isinstance(obj, dict) and isinstance(obj.get(key), dict) else obj
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{source}: expected a state_dict (best_model.pt) or a checkpoint (state.pt)")
    classes, wnids = _classes_from_manifest(cfg.data.path)
    return _from_config(cfg, weights, classes, wnids, source)


def _from_export_dir(root: Path, onnx_path: Path | None = None) -> ModelBundle:
    meta_file = root / CLASSES_FILE
    if not meta_file.is_file():
        raise UserError(f"{root}: {ONNX_FILE} without {CLASSES_FILE} (expected a directory from 'vitlab export')")
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("interpolation", "bilinear") not in RESAMPLE:
            raise ValueError(f"interpolation {meta['interpolation']!r}, expected one of {', '.join(RESAMPLE)}")
        return ModelBundle(
            source=str(root), classes=list(meta["classes"]), wnids=meta.get("wnids"),
            image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
            crop_pct=float(meta["crop_pct"]), interpolation=meta.get("interpolation", "bilinear"),
            model_name=(meta.get("model") or {}).get("name"),
            model_kwargs=(meta.get("model") or {}).get("kwargs") or {}, onnx_path=onnx_path or root / ONNX_FILE,
            run_id=meta.get("mlflow_run_id"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_file}: not a vitlab classes.json ({e})") from None


def _from_mlflow(spec: str, tracking_uri: str | None) -> ModelBundle:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.quiet_mlflow()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking(uri)  # unreachable or refused: one line, not a "not found"
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
            # an ONNX model logged by `vitlab export`: its files outlive this function (the bundle reads them)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=f"{tmp}/model"))
            export_dir = Path(tempfile.mkdtemp(prefix="vitlab-onnx-"))
            for f in local.rglob("*"):
                if f.name in (ONNX_FILE, CLASSES_FILE) or f.suffix == ".data":
                    shutil.copy(f, export_dir / f.name)
            bundle = _from_export_dir(export_dir)
            bundle.source, bundle.run_id, bundle.tracking_uri = spec, run_id, uri
            weakref.finalize(bundle, shutil.rmtree, export_dir, True)  # removed with the bundle
            return bundle
    if files["config.yaml"] is None:
        raise UserError(f"{spec}: run {run_id} has no config.yaml artifact (expected a run of 'vitlab train')")
    cfg = JobConfig.from_yaml(files["config.yaml"], f"{spec} config.yaml")
    manifest = json.loads(files["manifest.json"]) if files["manifest.json"] else {}
    # The logged model is a torch.export program (MLflow's pt2 format): its weights go into a fresh timm
    # model built from the run's config, so export and predict work on the same module as for files.
    logged = mlflow.pytorch.load_model(spec, map_location="cpu")
    return _from_config(cfg, dict(logged.state_dict()), manifest.get("classes"), manifest.get("wnids"), spec,
                        run_id, uri)
