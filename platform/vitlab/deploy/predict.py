"""`vitlab predict`: the val preprocessing of training, then the top-k classes of every image, on torch for a
model and on onnxruntime for an export directory. A file that cannot be read gets its own error entry; the
rest still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.deploy.bundle import INPUT_NAME, OUTPUT_NAME, ModelBundle
from vitlab.deploy.onnx import ort_session
from vitlab.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def runner(bundle: ModelBundle, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a normalised float32 NCHW batch to logits: torch for a model, onnxruntime for an
    export."""
    if bundle.model is None:
        session = ort_session(bundle.onnx_path, threads)
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    import torch

    if threads:
        torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return bundle.model(torch.from_numpy(x)).float().numpy()

    return run


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


def read_error(e: Exception) -> str:
    """Why a file could not be predicted, in a few words."""
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
            images.append(bundle.decode(f.read_bytes()))
            paths.append(f)
        except Exception as e:  # any decoder failure is this file's problem; the rest still run
            errors[f] = read_error(e)
            log.debug("cannot decode %s", f, exc_info=True)
        if len(images) == batch_size:
            yield paths, np.stack(images)
            paths, images = [], []
    if images:
        yield paths, np.stack(images)


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
    run = runner(bundle, threads)
    k = min(top_k, bundle.num_classes)
    errors: dict[Path, str] = {}
    by_path: dict[Path, dict[str, Any]] = {}
    for paths, batch in _batches(files, bundle, batch_size, errors):
        probs = softmax(run(bundle.normalize(batch)).astype(np.float64))
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
