"""Decode and crop on JPEG bytes, seeded per image; normalisation on the device (no Ray needed)."""

import numpy as np
import torch

from tests.support.data import jpeg_bytes
from vitlab.data.pipeline import normalize_on_device
from vitlab.data.transforms import decode_train, decode_val, row_rng


def test_each_image_crop_depends_on_seed_epoch_and_key():
    jpeg = jpeg_bytes(3, 1, (40, 30))

    def crop(seed, epoch, key):
        return decode_train(jpeg, 16, row_rng(seed, epoch, key), scale=(0.08, 1.0))

    assert crop(1, 0, "k").shape == (16, 16, 3) and crop(1, 0, "k").dtype == np.uint8
    assert np.array_equal(crop(1, 0, "k"), crop(1, 0, "k"))
    assert not np.array_equal(crop(1, 0, "k"), crop(1, 1, "k"))
    assert not np.array_equal(crop(1, 0, "k"), crop(1, 0, "other"))


def test_val_decode_is_a_fixed_center_crop():
    jpeg = jpeg_bytes(2, 0, (40, 30))
    a, b = decode_val(jpeg, 16), decode_val(jpeg, 16)
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and a.std() > 5


def test_normalize_on_device():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    y = normalize_on_device(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), torch.device("cpu"))
    assert y.shape == (2, 3, 4, 4) and y.dtype == torch.float32
    assert torch.allclose(y[:, 0], torch.tensor(2.0)) and torch.allclose(y[:, 2], torch.tensor(0.5))
    z = normalize_on_device(x, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), channels_last=True)
    assert z.is_contiguous(memory_format=torch.channels_last)


def test_bicubic_val_crops_match_pils_bicubic_resize():
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")  # lossless, no JPEG draft: the decode is the resize alone
    bicubic = decode_val(buf.getvalue(), 16, crop_pct=1.0, interpolation="bicubic")
    assert np.array_equal(bicubic, np.asarray(img.resize((16, 16), Image.BICUBIC)))
    assert not np.array_equal(bicubic, decode_val(buf.getvalue(), 16, crop_pct=1.0, interpolation="bilinear"))
