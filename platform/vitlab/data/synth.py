"""ImageNet-like synthetic JPEGs: a class-folder tree of textured, photo-like images.

Each class has its own palette and dominant orientation and frequency, so a model can learn the classes;
each image mixes smooth gradients, oriented waves, blobs and sensor-like noise, so JPEG sizes and decode
costs resemble photographs (about 100 KB at 500x375, quality 90) rather than flat colours.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.errors import UserError


def synth_image(label: int, index: int, width: int, height: int, seed: int = 0) -> Image.Image:
    class_rng = np.random.default_rng([seed, label])
    rng = np.random.default_rng([seed, label, index])
    palette = class_rng.uniform(0, 255, size=(3, 3))
    angle = class_rng.uniform(0, np.pi) + rng.normal(0, 0.15)
    freq = class_rng.uniform(0.02, 0.09) * rng.uniform(0.8, 1.25)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * freq * 2 * np.pi + rng.uniform(0, 6.3))
    grad = (x / width) * rng.uniform(-1, 1) + (y / height) * rng.uniform(-1, 1)
    blobs = np.zeros_like(x)
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        blobs += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)) * rng.uniform(-1, 1)
    fields = np.stack([wave, grad, blobs], axis=-1)  # H, W, 3
    img = np.tensordot(fields, palette, axes=([2], [0])) / 3 + 128
    img += rng.normal(0, 18, size=img.shape)  # texture / sensor noise: keeps JPEGs photo-sized
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def synth_tree(out: str, classes: int, per_class: int, size: tuple[int, int] = (500, 375),
               quality: int = 90, val_per_class: int | None = None, seed: int = 0) -> dict[str, int]:
    """Write out/train/<class>/*.JPEG and out/val/<class>/*.JPEG; returns the file counts per split."""
    if classes < 1 or per_class < 1:
        raise UserError(f"--classes {classes} --per-class {per_class}: expected positive counts")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{out}: output already exists and is not empty")
    val_n = val_per_class if val_per_class is not None else max(1, per_class // 5)
    counts = {"train": 0, "val": 0}
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, n, offset in (("train", per_class, 0), ("val", val_n, per_class)):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                buf = io.BytesIO()
                synth_image(c, offset + i, size[0], size[1], seed).save(buf, "JPEG", quality=quality)
                (d / f"{wnid}_{offset + i}.JPEG").write_bytes(buf.getvalue())
                counts[split] += 1
    return counts
