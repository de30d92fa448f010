"""Decode and crop functions on JPEG bytes, producing uint8 HxWx3 arrays.

Crops are computed on the original image size first, so PIL's ``draft`` can ask libjpeg for a reduced-size
decode (1/2, 1/4, 1/8) whenever the crop region is at least twice the output size: the expensive part of
the pipeline (the IDCT) shrinks with it. Crop and resize then happen in one ``Image.resize(box=...)`` call.
Normalisation is not done here: batches stay uint8 until they reach the training device.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
# The formats vitlab reads (what image datasets hold). PIL would otherwise try each of its ~40 parsers on
# any bytes it is given; every one is attack surface, and none of the others is an image dataset's format.
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # data.interpolation -> PIL


def open_image(data: bytes) -> Image.Image:
    """Image.open limited to READ_FORMATS (header only; pixels decode on first use)."""
    return Image.open(io.BytesIO(data), formats=READ_FORMATS)


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> Box:
    """torchvision's RandomResizedCrop.get_params, on a numpy Generator: (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    # Fallback: a center crop clamped to the allowed aspect ratios (as torchvision does).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, size: int, crop_pct: float) -> Box:
    """The region that Resize(size / crop_pct) on the shorter side + CenterCrop(size) keeps."""
    resized_short = size / crop_pct
    side = min(width, height) * size / resized_short  # crop side in original pixels
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _open_drafted(data: bytes, box: Box, size: int) -> tuple[Image.Image, Box]:
    """Open JPEG bytes with the smallest libjpeg scale that keeps the crop box at least ``size`` px."""
    img = open_image(data)
    width, height = img.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if img.format == "JPEG":
        # draft() picks the largest reduction whose result is still >= the requested size.
        req = (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h))
        img.draft("RGB", req)
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only."""
    return open_image(data).size


def decode_train(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    augment: Callable[[Image.Image], Image.Image] | None = None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip (+ optional PIL augment, e.g. RandAugment)."""
    width, height = image_size_of(data)
    box = random_resized_crop_box(width, height, scale, ratio, rng)
    img, box = _open_drafted(data, box, size)
    img = img.resize((size, size), RESAMPLE[interpolation], box=box)
    if rng.random() < hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if augment is not None:
        img = augment(img)
    return np.asarray(img, dtype=np.uint8)


def decode_val(data: bytes, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to size / crop_pct, center-crop size x size: one resize on the crop box."""
    width, height = image_size_of(data)
    img, box = _open_drafted(data, center_crop_box(width, height, size, crop_pct), size)
    return np.asarray(img.resize((size, size), RESAMPLE[interpolation], box=box), dtype=np.uint8)


def row_rng(seed: int, epoch: int, key: str, repeat: int = 0) -> np.random.Generator:
    """The augmentation RNG of one copy of an image in one epoch: a function of (seed, epoch, key, repeat)
    only, so the same image gets the same crop in two runs whichever task or worker happens to decode it.
    Copy 0 is seeded as without repeated augmentation."""
    words = [seed & 0xFFFFFFFF, epoch, hash_key(key)] + ([repeat] if repeat else [])
    return np.random.default_rng(words)


def hash_key(key: str) -> int:
    """A stable 64-bit hash of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def build_randaugment(config_str: str | None, size: int, mean: tuple[float, ...]):
    """timm's RandAugment on PIL images, e.g. 'rand-m9-mstd0.5-inc1' (DeiT); None when not configured."""
    if not config_str:
        return None
    from timm.data.auto_augment import rand_augment_transform

    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(int(round(255 * m)) for m in mean)}
    return rand_augment_transform(config_str, hparams)
