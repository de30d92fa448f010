"""`vitlab bench data`: images/s delivered to a consumer, four ways, in one invocation.

The source is re-encoded by `vitlab data prepare` with the ImageNet setting of docs/data.md (max side 256,
quality 90; timed separately as prepare_s, like FFCV's one-off dataset write). Then, one after the other (never
overlapping), each for the same measuring time after a warm-up (the first batch, then a fifth of that time),
every side producing image_size x image_size random crops:

(a) the ceiling: vitlab's decode_train over the shards' own JPEG bytes in one tight loop, one process on one
    core, times the cores used: what the decode alone allows;
(b) the seed: torch DataLoader over torchvision ImageFolder on the original JPEGs, RandomResizedCrop + flip +
    ToTensor + Normalize, one worker process per core;
(c) the same DataLoader on the same bytes as the shards: an ImageFolder written from the shards;
(d) vitlab: the Ray Data train pipeline (RandomResizedCrop + flip, uint8) through iter_torch_batches.

The headline is (d)/(c), the pipeline against the seed's loader on equal bytes, and (d)/(a), its share of the
decode ceiling; (d)/(b) is what re-encoding buys on top.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from vitlab.bench.common import cores, load_avg
from vitlab.cluster import connect
from vitlab.config import DataConfig
from vitlab.data.manifest import load_manifest
from vitlab.data.pipeline import Span, train_dataset
from vitlab.data.prepare import EncodeOptions, prepare
from vitlab.data.transforms import decode_train
from vitlab.errors import UserError


def _measure(batches, seconds: float) -> dict[str, float]:
    """Consume batches: time to the first one, a warm-up of a fifth of ``seconds`` (worker processes starting and
    importing, the first tasks), then images/s over the next ``seconds``."""
    start = time.perf_counter()
    it = iter(batches)
    first = next(it)
    first_s = time.perf_counter() - start
    del first
    warm_until = time.perf_counter() + seconds / 5
    for _ in it:
        if time.perf_counter() >= warm_until:
            break
    images, t0 = 0, time.perf_counter()
    for batch in it:
        images += len(batch[1] if isinstance(batch, (list, tuple)) else batch["label"])
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return {"images_per_s": images / max(elapsed, 1e-9), "first_batch_s": first_s, "images": images,
            "seconds": elapsed}


def _epochs(make_iter):
    """Yield batches over as many epochs as the consumer asks for."""
    epoch = 0
    while True:
        yield from make_iter(epoch)
        epoch += 1
        if epoch > 10_000:
            return


def bench_ray_data(data_dir: str, image_size: int, batch_size: int, seconds: float,
                   back_to_back: bool = True) -> dict[str, float]:
    """(d): as training streams it by default (data.back_to_back), span.epochs epochs per Ray Data execution
    (data/pipeline.py); ``back_to_back=False``: one execution per epoch."""
    manifest = load_manifest(data_dir)
    data = DataConfig(image_size=image_size, back_to_back=back_to_back)
    span = Span.plan(manifest.rows("train"), batch_size, 1, 1, last=10**9) if back_to_back else None

    def one_span(n: int):
        ds = train_dataset(manifest, data, seed=0, epoch=n * (span.epochs if span else 1), span=span)
        return ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=data.prefetch_batches)

    return _measure(_epochs(one_span), seconds)


def _shard_images(data_dir: str) -> tuple[list[bytes], list[int], list[str]]:
    """The train split's JPEG bytes and labels, as the shards hold them, and the class names."""
    manifest = load_manifest(data_dir)
    images, labels = [], []
    for path in manifest.files("train"):
        table = pq.read_table(path, columns=["image", "label"])
        images += table.column("image").to_pylist()
        labels += table.column("label").to_pylist()
    return images, labels, manifest.classes


def bench_ceiling(images: list[bytes], image_size: int, seconds: float, cores_used: int) -> dict[str, float]:
    """(a): decode_train over every image in turn, in this process (one core: PIL decodes on one thread)."""
    rng = np.random.default_rng(0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in images:
            decode_train(data, image_size, rng)
            done += 1
            if done % 16 == 0 and time.perf_counter() - start >= seconds:
                break
    per_core = done / (time.perf_counter() - start)
    return {"images_per_s": per_core * cores_used, "per_core_images_per_s": per_core}


def write_image_folder(images: list[bytes], labels: list[int], classes: list[str], out: Path) -> Path:
    """(c)'s input: the shards' bytes as an ImageFolder tree, out/<class>/<i>.jpg."""
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(data)
    return out


def bench_dataloader(train_dir: str, image_size: int, batch_size: int, seconds: float,
                     workers: int) -> dict[str, float]:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    ds = datasets.ImageFolder(train_dir, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=False)

    return _measure(_epochs(lambda epoch: iter(loader)), seconds)


def bench_data(source: str, image_size: int = 224, batch_size: int = 128, max_side: int | None = 256,
               quality: int | None = 90, seconds: float = 30.0, workers: int | None = None) -> dict[str, Any]:
    """Run both sides and return the report (JSON keys in docs/benchmarks.md)."""
    train_dir = Path(source) / "train"
    if not train_dir.is_dir():
        raise UserError(f"{source}: expected a class-folder tree with train/<class>/*.JPEG "
                        "(make one with 'vitlab data synth')")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    files = sorted(p for p in train_dir.rglob("*") if p.is_file())
    with Image.open(files[0]) as im:
        src_size = im.size
    used = min(workers, cores()) or 1
    connect()
    load_before = load_avg()
    out = tempfile.mkdtemp(prefix="vitlab-bench-")
    try:
        t0 = time.perf_counter()
        manifest = prepare(source, out=f"{out}/shards", opts=EncodeOptions(max_side=max_side, quality=quality),
                           overwrite=True, val_fraction=0.0)
        prepare_s = time.perf_counter() - t0
        images, labels, classes = _shard_images(f"{out}/shards")
        same_bytes = write_image_folder(images, labels, classes, Path(out) / "same_bytes")
        ceiling = bench_ceiling(images, image_size, seconds, used)
        del images
        ray_side = bench_ray_data(f"{out}/shards", image_size, batch_size, seconds)
        ray_per_epoch = bench_ray_data(f"{out}/shards", image_size, batch_size, seconds, back_to_back=False)
        torch_side = bench_dataloader(str(train_dir), image_size, batch_size, seconds, workers)
        torch_same = bench_dataloader(str(same_bytes), image_size, batch_size, seconds, workers)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ray_rate = ray_side["images_per_s"]
    return {
        "ray_data_images_per_s": round(ray_rate, 1),
        "torch_dataloader_images_per_s": round(torch_side["images_per_s"], 1),
        "torch_dataloader_same_bytes_images_per_s": round(torch_same["images_per_s"], 1),
        "ceiling_images_per_s": round(ceiling["images_per_s"], 1),
        "ceiling_per_core_images_per_s": round(ceiling["per_core_images_per_s"], 1),
        "ratio": round(ray_rate / max(torch_side["images_per_s"], 1e-9), 3),  # (d)/(b)
        "ratio_same_bytes": round(ray_rate / max(torch_same["images_per_s"], 1e-9), 3),  # (d)/(c)
        "share_of_ceiling": round(ray_rate / max(ceiling["images_per_s"], 1e-9), 3),  # (d)/(a)
        # (d) with data.back_to_back: false (one execution per epoch, a pool of tasks)
        "ray_data_per_epoch_images_per_s": round(ray_per_epoch["images_per_s"], 1),
        "per_epoch_ratio_same_bytes": round(ray_per_epoch["images_per_s"] / max(torch_same["images_per_s"], 1e-9), 3),
        "per_epoch_share_of_ceiling": round(ray_per_epoch["images_per_s"] / max(ceiling["images_per_s"], 1e-9), 3),
        "prepare_s": round(prepare_s, 2),
        "ray_data_first_batch_s": round(ray_side["first_batch_s"], 2),
        "torch_dataloader_first_batch_s": round(torch_side["first_batch_s"], 2),
        "settings": {
            "image_size": image_size, "batch_size": batch_size, "max_side": max_side, "quality": quality,
            "measure_s": seconds, "dataloader_workers": workers, "cores": cores(), "ceiling_cores": used,
            "load_avg_1m": [load_before, load_avg()],
            "train_images": manifest["splits"]["train"]["rows"], "source_image_size": list(src_size),
            "ceiling": "decode_train (draft decode + RandomResizedCrop + flip) over the shards' bytes, one process "
                       "on one core, x ceiling_cores",
            "ray_data": "prepare --max-side/--quality -> train_dataset as training streams it by default "
                        "(data.back_to_back: epochs back to back, >= 100,000 images an execution; fused "
                        "read+decode+RandomResizedCrop+flip in a pool of actors) -> iter_torch_batches, uint8",
            "ray_data_per_epoch": "the same with data.back_to_back: false: an execution per epoch, a pool of "
                                  "tasks",
            "torch_dataloader": "ImageFolder(original JPEGs) + RandomResizedCrop + flip + ToTensor + Normalize",
            "torch_dataloader_same_bytes": "the same DataLoader on an ImageFolder written from the shards' bytes",
        },
    }


def format_report(r: dict[str, Any]) -> str:
    s = r["settings"]
    return "\n".join([
        f"data bench: {s['train_images']} images ({s['source_image_size'][0]}x{s['source_image_size'][1]}), "
        f"crop {s['image_size']}, batch {s['batch_size']}, {s['cores']} cores, load {s['load_avg_1m']}",
        f"  (a) ceiling, decode_train x {s['ceiling_cores']} cores:        {r['ceiling_images_per_s']:8.1f} img/s  "
        f"({r['ceiling_per_core_images_per_s']:.1f} per core)",
        f"  (b) seed DataLoader, original files ({s['dataloader_workers']} workers): "
        f"{r['torch_dataloader_images_per_s']:8.1f} img/s  (first batch {r['torch_dataloader_first_batch_s']:.1f}s)",
        f"  (c) seed DataLoader, the shards' bytes:     {r['torch_dataloader_same_bytes_images_per_s']:8.1f} img/s",
        f"  (d) vitlab Ray Data (max side {s['max_side']}, q{s['quality']}): {r['ray_data_images_per_s']:8.1f} img/s  "
        f"(first batch {r['ray_data_first_batch_s']:.1f}s; prepare {r['prepare_s']:.1f}s, once)",
        f"  (d)/(c) same bytes: {r['ratio_same_bytes']:.2f}   (d)/(a) share of the ceiling: "
        f"{r['share_of_ceiling']:.0%}   (d)/(b) ratio (vitlab / seed): {r['ratio']:.2f}",
        f"  (d) with data.back_to_back: false (an execution per epoch, tasks): "
        f"{r['ray_data_per_epoch_images_per_s']:.1f} img/s, (d)/(c) {r['per_epoch_ratio_same_bytes']:.2f}, "
        f"(d)/(a) {r['per_epoch_share_of_ceiling']:.0%}",
    ])
