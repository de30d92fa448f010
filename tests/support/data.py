"""Small real datasets: JPEG trees, CIFAR-style pickles, Tiny-ImageNet-style folders."""

from __future__ import annotations

import io
import pickle
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(label: int, index: int, size=(24, 20), mode="RGB", quality=90) -> bytes:
    """A class-dependent pattern (so a model can learn it) with per-image noise."""
    rng = np.random.default_rng([label, index])
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (label + 1) * 9) % 256, (y * (label + 2) * 7) % 256, np.full_like(x, 60 * label % 256)],
                    axis=-1).astype(np.float32)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(img, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A ~70-byte PNG whose header declares width x height pixels (PIL's decompression-bomb limit is ~179M)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR's size ...
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # ... with a valid checksum
    return bytes(data)


def make_class_tree(root: Path, classes: list[str], per_class: int, size=(24, 20), val_per_class: int | None = 2,
                    split_dirs: bool = True) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (or root/<class>/* when not split_dirs)."""
    for c, name in enumerate(classes):
        splits = [("train", per_class, 0)]
        if split_dirs and val_per_class:
            splits.append(("val", val_per_class, per_class))
        for split, n, offset in splits:
            d = root / split / name if split_dirs else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{name}_{offset + i}.JPEG").write_bytes(jpeg_bytes(c, offset + i, size))
    return root


def make_cifar100(root: Path, n_train: int = 20, n_test: int = 10, classes: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [i % classes for i in range(n)]
        batch = {"data": data, "fine_labels": labels, "coarse_labels": [0] * n,
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with (root / name).open("wb") as f:
            pickle.dump(batch, f)
    with (root / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(classes)], "coarse_label_names": ["x"]}, f)
    return root


def make_tiny_imagenet(root: Path, wnids: list[str], per_class: int = 3, val_per_class: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # not sorted, as in the real file
    (root / "words.txt").write_text("".join(f"{w}\tname {w}, other\n" for w in wnids) + "n99999999\tunused\n")
    annotations = []
    (root / "val" / "images").mkdir(parents=True)
    for c, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            (d / f"{w}_{i}.JPEG").write_bytes(jpeg_bytes(c, i, (16, 16)))
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}.JPEG"
            (root / "val" / "images" / name).write_bytes(jpeg_bytes(c, 100 + i, (16, 16)))
            annotations.append(f"{name}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return root
