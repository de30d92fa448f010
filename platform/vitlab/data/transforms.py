"""Decode and crop functions on JPEG bytes, producing uint8 HxWx3 arrays.

Crops are computed on the original image size first (read from the JPEG header), so PIL's ``draft`` can ask
libjpeg for a reduced-size decode (1/2, 1/4, 1/8) whenever the crop region is at least twice the output size:
the expensive part of the pipeline (the IDCT) shrinks with it. JPEGs that cannot be shrunk (the usual case
for shards prepared with ``--max-side`` near the training size) take a faster path: torchvision's
libjpeg-turbo decoder writes HWC straight into a tensor, and torch's vectorised uint8 bilinear kernel does crop
+ resize (+ flip) in about a quarter of the time ``Image.resize(box=...)`` takes; values match PIL's inside the
crop (PIL's box resize also reads a pixel beyond the box edges; torchvision's RandomResizedCrop does not).
Normalisation is not done here: batches stay uint8 until the training device.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


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


def _draft(img: Image.Image, box: Box, size: int) -> tuple[Image.Image, Box]:
    width, height = img.size
    if img.format == "JPEG":
        # draft() picks the largest reduction whose result is still >= the requested size.
        img.draft("RGB", _draft_request(width, height, box, size))
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _draft_request(width: int, height: int, box: Box, size: int) -> tuple[int, int]:
    """The decoded image size at which the crop box is still ``size`` px (draft() rounds it to 1/2^k)."""
    return math.ceil(width * size / (box[2] - box[0])), math.ceil(height * size / (box[3] - box[1]))


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a baseline or progressive JPEG's SOF segment; None when ``data`` is not a JPEG this
    simple scan understands (the caller then asks PIL). Much cheaper than ``Image.open`` for every image."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width and height else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _crop_resize(data: bytes, wh: tuple[int, int], img: Image.Image | None, box: Box, size: int,
                 flip: bool) -> np.ndarray:
    """Crop ``box`` out of the image in ``data`` (``wh`` its size), mirror it if ``flip``, resize to size x size
    (bilinear): uint8 HxWx3.

    Fast path (a JPEG that draft() could not shrink, a whole-pixel box): torchvision's libjpeg-turbo decoder
    writes HWC straight into a tensor, and torch's vectorised uint8 kernel does the resize (antialiased when
    shrinking, as PIL's is; about 4x faster than ``Image.resize`` on one core). Otherwise PIL: draft() for
    a reduced-size decode, then one ``Image.resize(box=...)``, which handles fractional boxes.
    """
    if img is None and _whole_pixels(box) and not _draft_reduces(wh, box, size):
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pixels = None  # a JPEG variant torchvision's decoder rejects: PIL below
        if pixels is not None and tuple(pixels.shape) == (3, wh[1], wh[0]):
            left, top, right, bottom = (int(round(v)) for v in box)
            # 1x3xhxw in channels_last layout (HWC in memory): what the uint8 resize kernel is fast on.
            x = pixels[:, top:bottom, left:right].unsqueeze(0).contiguous(memory_format=torch.channels_last)
            if flip:  # on the crop, before the resize; torch.flip is ~10x faster than numpy's [:, ::-1] copy
                x = torch.flip(x, [3])
            if (bottom - top, right - left) != (size, size):
                with torch.inference_mode():
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return x[0].permute(1, 2, 0).numpy()
    if img is None:
        img = Image.open(io.BytesIO(data))
    img, box = _draft(img, box, size)
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def _whole_pixels(box: Box) -> bool:
    return all(abs(v - round(v)) < 1e-6 for v in box)


def _draft_reduces(wh: tuple[int, int], box: Box, size: int) -> bool:
    req_w, req_h = _draft_request(wh[0], wh[1], box, size)
    return 2 * req_w <= wh[0] and 2 * req_h <= wh[1]


def _open_size(data: bytes) -> tuple[tuple[int, int], Image.Image | None]:
    """The image size, from the JPEG header when it is a plain JPEG (no PIL object needed), else from PIL."""
    wh = _jpeg_size(data)
    if wh is not None:
        return wh, None
    img = Image.open(io.BytesIO(data))
    return img.size, img


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only."""
    return _open_size(data)[0]


def decode_train(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    augment: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip (+ optional PIL augment, e.g. RandAugment)."""
    wh, img = _open_size(data)
    box = random_resized_crop_box(wh[0], wh[1], scale, ratio, rng)
    out = _crop_resize(data, wh, img, box, size, flip=rng.random() < hflip)
    if augment is not None:
        out = np.asarray(augment(Image.fromarray(out)), dtype=np.uint8)
    return out


def decode_val(data: bytes, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """Resize the shorter side to size / crop_pct, center-crop size x size: one resize on the crop box."""
    wh, img = _open_size(data)
    return _crop_resize(data, wh, img, center_crop_box(wh[0], wh[1], size, crop_pct), size, flip=False)


def row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The augmentation RNG of one image in one epoch: a function of (seed, epoch, key) only, so the same
    image gets the same crop in two runs whichever task or worker happens to decode it."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, hash_key(key)])


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
