"""`vitlab bench data`: images/s delivered to a consumer, vitlab's input path vs the seed's, in one invocation.

(a) vitlab: the source re-encoded by `vitlab data prepare` (``--max-side 256 --quality 90`` by default, the
    README's ImageNet setting; timed separately as ``prepare_s``, a one-off cost like FFCV's dataset write), read
    by the Ray Data train pipeline (fused read + decode + RandomResizedCrop + flip tasks, uint8 NHWC) and
    consumed in this process through ``iter_torch_batches(prefetch_batches=4)``, one dataset execution per
    epoch (epoch 0, 1, 2, ...: new crops and a new order each time, nothing cached between epochs).
(b) the seed: torch DataLoader over torchvision ImageFolder on the original JPEGs, RandomResizedCrop + flip +
    ToTensor + Normalize, ``shuffle=True``, one persistent worker process per core by default.

Both produce image_size x image_size random crops of every image. The sides never overlap in time, and the
DataLoader's measuring time is split in two halves around the Ray side (B, A, B), with Ray shut down again
before the second half: slow drifts in the machine's load (other processes) then weigh on both sides alike,
and the DataLoader never shares the cores with Ray's idle daemons. Each side counts the images of every batch
after its first one, over ``seconds`` (the DataLoader: two halves of seconds/2) of wall time; the time to the
first batch (worker start-up, the first dataset execution) is reported on its own.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vitlab.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _measure(make_epoch: Callable[[int], Iterable], seconds: float, count: Callable[[Any], int]) -> dict[str, Any]:
    """Iterate epochs 0, 1, 2, ... of batches until ``seconds`` have passed since the first batch.

    Images are counted from the second batch on, up to the batch that ends the window, so the rate is
    steady-state delivery including every epoch boundary crossed; the first batch's latency is returned apart.
    """
    start = time.perf_counter()
    first_at = last_at = None
    first_s, images, batches, epochs = 0.0, 0, 0, 0
    for epoch in itertools.count():
        it = iter(make_epoch(epoch))
        try:
            for batch in it:
                now = time.perf_counter()
                if first_at is None:
                    first_at, first_s = now, now - start
                else:
                    images += count(batch)
                    batches += 1
                    last_at = now
                del batch
                if now - first_at >= seconds:
                    break
            else:
                epochs += 1
                continue
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        break
    elapsed = (last_at - first_at) if last_at is not None and first_at is not None else 0.0
    return {
        "images_per_s": images / elapsed if elapsed > 0 else 0.0,
        "first_batch_s": first_s,
        "images": images,
        "batches": batches,
        "seconds": elapsed,
        "epochs_completed": epochs,
    }


# ---------------------------------------------------------------------------------------------------------
# (b) the seed's DataLoader


def _dataloader(train_dir: str, image_size: int, batch_size: int, workers: int):
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    ds = datasets.ImageFolder(train_dir, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, drop_last=False)


def _stop_loader(loader) -> None:
    """Stop a persistent DataLoader's worker processes now (they would otherwise keep prefetching)."""
    it = getattr(loader, "_iterator", None)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def bench_dataloader(train_dir: str, image_size: int, batch_size: int, seconds: float,
                     workers: int) -> dict[str, Any]:
    """(b): a fresh DataLoader (its workers start inside the first-batch time), stopped after the window."""
    loader = _dataloader(train_dir, image_size, batch_size, workers)
    try:
        return _measure(lambda epoch: loader, seconds, lambda batch: len(batch[1]))
    finally:
        _stop_loader(loader)


# ---------------------------------------------------------------------------------------------------------
# (a) vitlab's Ray Data path


def quiet_ray_data() -> None:
    """No progress bars, start/finish banners or per-execution stats from Ray Data in this process: the
    bench builds one dataset execution per epoch, and each would print a dozen lines (and spend driver CPU
    rendering them)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)


def bench_ray_data(data_dir: str, image_size: int, batch_size: int, seconds: float) -> dict[str, Any]:
    """(a): one train_dataset execution per epoch, consumed here through iter_torch_batches."""
    from vitlab.config import DataConfig
    from vitlab.data.manifest import load_manifest
    from vitlab.data.pipeline import train_dataset

    manifest = load_manifest(data_dir)
    data = DataConfig(image_size=image_size)

    def epoch_batches(epoch: int):
        ds = train_dataset(manifest, data, seed=0, epoch=epoch)
        return ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=4, drop_last=False)

    return _measure(epoch_batches, seconds, lambda batch: len(batch["label"]))


# ---------------------------------------------------------------------------------------------------------


def _source_info(train_dir: Path) -> tuple[int, tuple[int, int]]:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = sorted(p for p in train_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise UserError(f"{train_dir}: no images (expected train/<class>/*.JPEG)")
    with Image.open(files[0]) as im:
        return len(files), im.size


def bench_data(source: str, image_size: int = 224, batch_size: int = 128, max_side: int | None = 256,
               quality: int | None = 90, seconds: float = 30.0, workers: int | None = None) -> dict[str, Any]:
    """Run both sides on the same source images and return the report (see the module docstring)."""
    import ray

    from vitlab.cluster import connect
    from vitlab.data.prepare import EncodeOptions, prepare

    train_dir = Path(source) / "train"
    if not train_dir.is_dir():
        raise UserError(f"{source}: expected a class-folder tree with train/<class>/*.JPEG "
                        "(make one with 'vitlab data synth')")
    if seconds <= 0:
        raise UserError(f"--seconds {seconds}: expected a positive number")
    if image_size < 8 or batch_size < 1:
        raise UserError("--image-size must be at least 8 and --batch-size at least 1")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    n_source, src_size = _source_info(train_dir)
    half = seconds / 2

    log.info("bench (b) DataLoader, first half: %.1fs", half)
    torch_1 = bench_dataloader(str(train_dir), image_size, batch_size, half, workers)

    started_ray = not ray.is_initialized()
    connect()
    quiet_ray_data()
    out = tempfile.mkdtemp(prefix="vitlab-bench-")
    try:
        log.info("bench (a) prepare --max-side %s --quality %s", max_side, quality)
        t0 = time.perf_counter()
        manifest = prepare(source, out=f"{out}/shards", opts=EncodeOptions(max_side=max_side, quality=quality),
                           val_fraction=0.0)
        prepare_s = time.perf_counter() - t0
        log.info("bench (a) Ray Data: %.1fs", seconds)
        ray_side = bench_ray_data(f"{out}/shards", image_size, batch_size, seconds)
    finally:
        if started_ray:
            ray.shutdown()  # the second DataLoader half runs without Ray's processes, like the first
        shutil.rmtree(out, ignore_errors=True)

    log.info("bench (b) DataLoader, second half: %.1fs", half)
    torch_2 = bench_dataloader(str(train_dir), image_size, batch_size, half, workers)

    torch_images = torch_1["images"] + torch_2["images"]
    torch_seconds = torch_1["seconds"] + torch_2["seconds"]
    ray_rate = ray_side["images_per_s"]
    torch_rate = torch_images / torch_seconds if torch_seconds > 0 else 0.0
    return {
        "ray_data_images_per_s": round(ray_rate, 1),
        "torch_dataloader_images_per_s": round(torch_rate, 1),
        "ratio": round(ray_rate / torch_rate, 3) if torch_rate > 0 else None,
        "prepare_s": round(prepare_s, 2),
        "ray_data_first_batch_s": round(ray_side["first_batch_s"], 2),
        "torch_dataloader_first_batch_s": round(torch_1["first_batch_s"], 2),
        "ray_data": {k: round(v, 2) if isinstance(v, float) else v for k, v in ray_side.items()},
        "torch_dataloader": {
            "images": torch_images, "seconds": round(torch_seconds, 2),
            "halves_images_per_s": [round(torch_1["images_per_s"], 1), round(torch_2["images_per_s"], 1)],
            "first_batch_s": [round(torch_1["first_batch_s"], 2), round(torch_2["first_batch_s"], 2)],
            "epochs_completed": torch_1["epochs_completed"] + torch_2["epochs_completed"],
        },
        "settings": {
            "image_size": image_size,
            "batch_size": batch_size,
            "max_side": max_side,
            "quality": quality,
            "seconds": seconds,
            "workers": workers,
            "cores": os.cpu_count(),
            "train_images": manifest["splits"]["train"]["rows"],
            "source_images": n_source,
            "source_image_size": list(src_size),
            "order": "DataLoader seconds/2, Ray start + prepare, Ray Data seconds, Ray shutdown, DataLoader seconds/2",
            "ray_data": "prepare (max_side, quality) -> train_dataset: fused read + decode + RandomResizedCrop + "
                        "flip tasks -> iter_torch_batches(prefetch_batches=4), uint8 NHWC, one execution per epoch",
            "torch_dataloader": "ImageFolder(original JPEGs) + RandomResizedCrop + RandomHorizontalFlip + ToTensor "
                                "+ Normalize, shuffle, persistent workers, float32 NCHW",
        },
    }


def format_report(r: dict[str, Any]) -> str:
    s = r["settings"]
    src = f"{s['source_image_size'][0]}x{s['source_image_size'][1]}"
    ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "n/a"
    rows = [
        ("vitlab Ray Data", f"prepare --max-side {s['max_side']} --quality {s['quality']}",
         r["ray_data_images_per_s"], r["ray_data_first_batch_s"]),
        ("seed DataLoader", f"ImageFolder, {s['workers']} workers",
         r["torch_dataloader_images_per_s"], r["torch_dataloader_first_batch_s"]),
    ]
    lines = [
        f"data bench: {s['train_images']} images ({src} JPEG), crop {s['image_size']}, batch {s['batch_size']}, "
        f"{s['cores']} cores, {s['seconds']:g}s per side",
        f"  {'side':<17}{'input':<36}{'images/s':>10}{'first batch':>13}",
    ]
    for name, what, rate, first in rows:
        lines.append(f"  {name:<17}{what:<36}{rate:>10.1f}{first:>12.2f}s")
    lines.append(f"  prepare (once, not in the rate): {r['prepare_s']:.1f}s")
    lines.append(f"  ratio (vitlab / seed): {ratio}")
    return "\n".join(lines)

