"""`vitlab bench train --device cuda`: training steps on one GPU fed by the real input pipeline, with
``data.decode: cpu`` and with ``data.decode: gpu``: images/s per GPU and the share of time spent waiting for data.

One invocation synthesizes a class-folder tree (`vitlab data synth`'s images) and prepares it as the ImageNet
setting does (max side 256, quality 90) into a temporary directory, then runs the same model twice, one side
after the other: ViT-S/16 at 224 px by default, bf16 autocast, AdamW, cross-entropy, on ``cuda:0`` in this
process, each batch from the Ray Data train pipeline (``train_dataset``: RandomResizedCrop + flip) on this
machine's CPUs:

* ``cpu_decode``: the Ray Data tasks decode and crop (PIL), uint8 batches go to the GPU;
* ``gpu_decode``: the tasks only read and draw the crops; the GPU decodes the JPEG bytes (nvJPEG) and crops.

Each side times ``steps`` steps after ``warmup`` untimed ones, within one pass over the data (the set holds
(warmup + steps) x batch images, so no epoch restarts inside the timing). ``data_wait`` is the share of the
timed wall time spent waiting for the next batch, as the training loop measures it; a step ends with
``loss.item()``, as in the loop. The CPU count matters as much as the GPU: the report records both.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import torch

from vitlab.bench.common import bench_model, check_positive, cores, load_avg
from vitlab.errors import UserError

SIDES = {"cpu_decode": "cpu", "gpu_decode": "gpu"}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device on this machine (torch.cuda.is_available() is False); "
                        "expected a machine with an NVIDIA GPU, or --device cpu")


def prepare_shards(root: str, images: int, quick: bool) -> str:
    """A synthetic class-folder tree of about ``images`` train images, prepared into shards; the shard dir."""
    from vitlab.data.prepare import EncodeOptions, prepare
    from vitlab.data.synth import synth_tree

    classes = 4 if quick else 20
    per_class = -(-images // classes)
    size = (64, 48) if quick else (320, 240)  # prepare brings them to 256 px on the long side (ImageNet's setting)
    synth_tree(f"{root}/source", classes, per_class, size=size, val_per_class=1)
    prepare(f"{root}/source", out=f"{root}/shards", opts=EncodeOptions(max_side=256, quality=90),
            shard_rows=max(8, per_class * classes // 16))
    return f"{root}/shards"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_side(shards: str, decode: str, model_name: str, kwargs: dict[str, Any], num_classes: int, image_size: int,
               batch_size: int, steps: int, warmup: int, device: Any = "cuda:0") -> dict[str, Any]:
    """One side: a fresh model, ``warmup`` + ``steps`` bf16 training steps on batches of the train pipeline
    (``device`` cpu runs the same code on the CPU: the CPU tier's check of this function)."""
    from vitlab.config import DataConfig
    from vitlab.data.gpu_decode import batch_images, encoded_batches
    from vitlab.data.manifest import load_manifest
    from vitlab.data.pipeline import normalize_on_device, train_dataset
    from vitlab.model import create_model

    device = torch.device(device)
    torch.manual_seed(0)
    data = DataConfig(path=shards, image_size=image_size, decode=decode)
    model = create_model(model_name, num_classes, kwargs).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    stream = train_dataset(load_manifest(shards), data, seed=0, epoch=0)
    options = encoded_batches() if decode == "gpu" else {"device": device}
    batches = iter(stream.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                             prefetch_batches=data.prefetch_batches, **options))
    waited = 0.0
    first_batch_s = None
    start = tick = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _synchronize(device)
            waited, start, tick = 0.0, time.perf_counter(), time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(f"the {decode}-decode stream ended after {i} batches") from None
        now = time.perf_counter()
        waited += now - tick
        if first_batch_s is None:
            first_batch_s = now - tick
        images = normalize_on_device(batch_images(batch, data, device), data.mean, data.std, device)
        labels = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        loss.item()
        tick = time.perf_counter()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": round(steps * batch_size / elapsed, 1), "data_wait": round(waited / elapsed, 3),
            "step_ms": round(1000 * elapsed / steps, 1), "first_batch_s": round(first_batch_s or 0.0, 2),
            "seconds": round(elapsed, 2)}


def bench_train_gpu(model_name: str | None = None, image_size: int | None = None, batch_size: int | None = None,
                    steps: int | None = None, warmup: int | None = None, quick: bool = False) -> dict[str, Any]:
    """Both sides on ``cuda:0``; the report's JSON keys are in docs/benchmarks.md."""
    require_cuda()
    check_positive(image_size=image_size, batch_size=batch_size, steps=steps)
    if warmup is not None and warmup < 0:
        raise UserError(f"--warmup {warmup}: expected 0 or more")
    name, kwargs, size, batch, num_classes = bench_model(
        model_name or "vit_small_patch16_224", image_size or 224, batch_size or 128, quick, quick_batch=8)
    steps = steps or (4 if quick else 30)
    warmup = warmup if warmup is not None else (1 if quick else 5)
    import ray

    from vitlab.cluster import connect

    connect()
    load_before = load_avg()
    root = tempfile.mkdtemp(prefix="vitlab-bench-train-gpu-")
    try:
        t0 = time.perf_counter()
        shards = prepare_shards(root, (warmup + steps) * batch, quick)
        prepare_s = time.perf_counter() - t0
        sides = {key: bench_side(shards, decode, name, kwargs, num_classes, size, batch, steps, warmup)
                 for key, decode in SIDES.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu, gpu = sides["cpu_decode"], sides["gpu_decode"]
    return {
        **sides,
        "gpu_vs_cpu_decode": round(gpu["images_per_s"] / max(cpu["images_per_s"], 1e-9), 3),
        "prepare_s": round(prepare_s, 1),
        "settings": {
            "model": name, "model_kwargs": kwargs, "num_classes": num_classes, "image_size": size,
            "batch_size_per_gpu": batch, "timed_steps": steps, "warmup": warmup, "precision": "bf16",
            "optimizer": "AdamW", "gpu": torch.cuda.get_device_name(0), "gpus_used": 1,
            "ray_cpus": ray.cluster_resources().get("CPU", 0), "cores": cores(), "quick": quick,
            "data": "vitlab data synth images prepared at --max-side 256 --quality 90; RandomResizedCrop + flip",
            "load_avg_1m": [load_before, load_avg()], "torch": torch.__version__,
        },
    }


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"{s['model']} {s['image_size']}px, batch {s['batch_size_per_gpu']} on 1 GPU ({s['gpu']}), bf16 "
             f"AdamW, {s['timed_steps']} timed steps after {s['warmup']} warm-up; decode on {s['ray_cpus']:g} "
             "Ray CPUs or on the GPU"]
    for key, label in (("cpu_decode", "CPU decode (Ray Data, PIL)"), ("gpu_decode", "GPU decode (nvJPEG)")):
        r = report[key]
        lines.append(f"{label:28s} {r['images_per_s']:8.1f} images/s per GPU, data wait {100 * r['data_wait']:.0f}%")
    lines.append(f"GPU decode / CPU decode: {report['gpu_vs_cpu_decode']:.3f}")
    return "\n".join(lines)
