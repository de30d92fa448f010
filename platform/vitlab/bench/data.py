"""`vitlab bench data`: images/s delivered to a consumer, vitlab's path vs the seed's, in one invocation.

(a) vitlab: the source re-encoded by `vitlab data prepare` with the ImageNet setting of docs/data.md (max side 256,
    quality 90; timed separately as prepare_s, like FFCV's one-off dataset write), read by the Ray Data train
    pipeline (RandomResizedCrop + flip, uint8) and consumed through iter_torch_batches.
(b) the seed: torch DataLoader over torchvision ImageFolder on the original JPEGs, RandomResizedCrop + flip +
    ToTensor + Normalize, one worker process per core.

Both sides run one after the other (never overlapping), each for the same measuring time after a warm-up
batch, and both produce image_size x image_size random crops of every image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from vitlab.cluster import connect
from vitlab.config import DataConfig
from vitlab.data.manifest import load_manifest
from vitlab.data.pipeline import train_dataset
from vitlab.data.prepare import EncodeOptions, prepare
from vitlab.errors import UserError


def _measure(batches, seconds: float) -> dict[str, float]:
    """Consume batches: time to the first one, then images/s over the next ``seconds``."""
    start = time.perf_counter()
    it = iter(batches)
    first = next(it)
    first_s = time.perf_counter() - start
    del first
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


def bench_ray_data(data_dir: str, image_size: int, batch_size: int, seconds: float) -> dict[str, float]:
    manifest = load_manifest(data_dir)
    data = DataConfig(image_size=image_size)

    def one_epoch(epoch: int):
        ds = train_dataset(manifest, data, seed=0, epoch=epoch)
        return ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=4)

    return _measure(_epochs(one_epoch), seconds)


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
    connect()
    out = tempfile.mkdtemp(prefix="vitlab-bench-")
    try:
        t0 = time.perf_counter()
        manifest = prepare(source, out=f"{out}/shards", opts=EncodeOptions(max_side=max_side, quality=quality),
                           overwrite=True, val_fraction=0.0)
        prepare_s = time.perf_counter() - t0
        ray_side = bench_ray_data(f"{out}/shards", image_size, batch_size, seconds)
        torch_side = bench_dataloader(str(train_dir), image_size, batch_size, seconds, workers)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "ray_data_images_per_s": round(ray_side["images_per_s"], 1),
        "torch_dataloader_images_per_s": round(torch_side["images_per_s"], 1),
        "ratio": round(ray_side["images_per_s"] / max(torch_side["images_per_s"], 1e-9), 3),
        "prepare_s": round(prepare_s, 2),
        "ray_data_first_batch_s": round(ray_side["first_batch_s"], 2),
        "torch_dataloader_first_batch_s": round(torch_side["first_batch_s"], 2),
        "settings": {
            "image_size": image_size, "batch_size": batch_size, "max_side": max_side, "quality": quality,
            "measure_s": seconds, "dataloader_workers": workers, "cores": os.cpu_count(),
            "train_images": manifest["splits"]["train"]["rows"], "source_image_size": list(src_size),
            "ray_data": "prepare --max-side/--quality -> train_dataset (fused read+decode+RandomResizedCrop+flip "
                        "tasks) -> iter_torch_batches(prefetch_batches=4), uint8",
            "torch_dataloader": "ImageFolder(original JPEGs) + RandomResizedCrop + flip + ToTensor + Normalize",
        },
    }


def format_report(r: dict[str, Any]) -> str:
    s = r["settings"]
    return "\n".join([
        f"data bench: {s['train_images']} images ({s['source_image_size'][0]}x{s['source_image_size'][1]}), "
        f"crop {s['image_size']}, batch {s['batch_size']}, {s['cores']} cores",
        f"  vitlab Ray Data (max side {s['max_side']}, q{s['quality']}): {r['ray_data_images_per_s']:8.1f} img/s  "
        f"(first batch {r['ray_data_first_batch_s']:.1f}s; prepare {r['prepare_s']:.1f}s, once)",
        f"  seed DataLoader ({s['dataloader_workers']} workers):     {r['torch_dataloader_images_per_s']:8.1f} img/s  "
        f"(first batch {r['torch_dataloader_first_batch_s']:.1f}s)",
        f"  ratio (vitlab / seed): {r['ratio']:.2f}",
    ])
