"""``data.decode: gpu``: the train images' JPEG bytes travel to the training device and are decoded there.

For nodes with few CPUs per GPU (the README's cluster table says when that pays). The Ray Data train tasks
(data/pipeline.py, ``train_dataset``) then skip the pixel work: they read the shard and, per image, draw the crop
box (from the header's size) and the flip with the same seeded RNG as the CPU path's ``decode_train``, so each
image gets the crop and flip it would get on the CPU. A block holds the JPEG bytes, the boxes, the flips and the
labels. On the Train worker:

* ``EncodedCollate`` (the ``collate_fn`` of ``iter_torch_batches``, kept on the CPU) packs a batch into tensors:
  the bytes padded to the batch's longest, their lengths, boxes, flips, labels; batches stay plain dicts of
  tensors, which ``micro_batches`` splits as any other;
* ``decode_crops`` decodes the batch with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG, batched, on
  CUDA), crops and resizes each image (antialiased, as PIL does) and flips on the device, returning the uint8
  NHWC batch the CPU path delivers; ``normalize_on_device`` takes it from there.

It runs on any device: the CPU tiers run it with ``device="cpu"`` against the PIL path. The pixels differ a
little from PIL's (another IDCT, and PIL's draft decode at 1/2 to 1/8 scale when a crop is at least twice the
output size); the crops, flips, labels and order are the same. RandAugment (timm's, on PIL images) is not run
on this path: preflight refuses ``data.randaugment`` with ``data.decode: gpu``. Val is decoded on the CPU.
torchvision 0.29 deprecates its image decoders in favour of TorchCodec; ``decode_jpeg`` is the one call to replace.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vitlab.config import DataConfig
from vitlab.errors import UserError

ENCODED_KEYS = ("jpeg", "jpeg_len", "box", "flip", "label")  # what an encoded batch holds


class EncodedCollate(NumpyBatchCollateFn):
    """A Ray Data numpy batch of encoded rows -> CPU tensors: ``jpeg`` (n, longest) uint8, zero-padded,
    ``jpeg_len`` (n,), ``box`` (n, 4) int32 (left, top, right, bottom), ``flip`` (n,) bool, ``label`` (n,)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return pack_encoded(batch)


def pack_encoded(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    encoded = list(batch["jpeg"])
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    packed = np.zeros((len(encoded), int(lengths.max(initial=1))), dtype=np.uint8)
    for i, b in enumerate(encoded):
        packed[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return {"jpeg": torch.from_numpy(packed), "jpeg_len": torch.from_numpy(lengths),
            "box": torch.as_tensor(np.asarray(batch["box"], dtype=np.int32)),
            "flip": torch.as_tensor(np.asarray(batch["flip"], dtype=bool)),
            "label": torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))}


def encoded_batches() -> dict[str, Any]:
    """The ``iter_torch_batches`` arguments of an encoded stream: the collate above, and the batch left on the
    CPU (decode_jpeg reads its input from host memory and copies it to the GPU itself)."""
    return {"collate_fn": EncodedCollate(), "device": "cpu"}


def decode_crops(jpeg: torch.Tensor, lengths: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                 interpolation: str = "bilinear", device: Any = "cpu") -> torch.Tensor:
    """A packed batch -> uint8 (n, size, size, 3) on ``device``: decode (batched), crop each box and resize it to
    size x size (antialiased), flip where ``flips`` says."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    jpeg = jpeg.cpu()
    data = [jpeg[i, :n] for i, n in enumerate(lengths.tolist())]
    device = torch.device(device)
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, (image, (left, top, right, bottom)) in enumerate(zip(images, boxes.tolist(), strict=True)):
        out[i] = F.resized_crop(image, top, left, bottom - top, right - left, [size, size], interpolation=mode,
                                antialias=True)
    flip = flips.to(device=device, dtype=torch.bool).view(-1, 1, 1, 1)
    out = torch.where(flip, out.flip(-1), out)
    return out.permute(0, 2, 3, 1)  # NHWC, as the CPU path's batches


def batch_images(batch: dict[str, torch.Tensor], data: DataConfig, device: Any) -> torch.Tensor:
    """A train batch's uint8 NHWC images: as the CPU path delivered them, or decoded here from an encoded
    batch (``data.decode: gpu``)."""
    if "jpeg" not in batch:
        return batch["image"]
    return decode_crops(batch["jpeg"], batch["jpeg_len"], batch["box"], batch["flip"], data.image_size,
                        data.interpolation, device)


def check_decode_device(device: Any) -> None:
    """On a Train worker: ``data.decode: gpu`` needs a CUDA device (preflight checks what it can on the driver)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"data.decode: gpu, but this Train worker's device is {device.type} (no CUDA device); "
                        "expected a CUDA GPU per worker (scaling.use_gpu=true on GPU nodes), or data.decode=cpu")
