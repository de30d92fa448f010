"""How the train decode path is chosen (data.decode: cpu | gpu) and what the gpu path does, without a GPU: the
config key, preflight's one-line errors, the encoded stream of the Ray Data task (run here without Ray), and the
device-side decode run with device="cpu" against the PIL path. The CUDA side is tests/gpu/."""

import io
import json

import numpy as np
import pytest
import torch

from tests.support import JOB
from tests.support.cli import assert_one_line_error, run_cli
from tests.unit.conftest import SHARD_ROWS
from vitlab.config import DataConfig, load_job
from vitlab.data.gpu_decode import (
    EncodedCollate,
    batch_images,
    check_decode_device,
    decode_crops,
    encoded_batches,
    pack_encoded,
)
from vitlab.data.manifest import Manifest
from vitlab.data.pipeline import _decode_train_shards, _encoded_train_shards
from vitlab.data.positions import EpochPlan
from vitlab.data.synth import synth_image
from vitlab.data.transforms import decode_train, image_size_of, random_resized_crop_box, row_rng
from vitlab.errors import ConfigError, UserError
from vitlab.train.epoch import micro_batches
from vitlab.train.preflight import check_job

GPU_JOB = ["data.decode=gpu", "scaling.use_gpu=true"]


def digits_manifest() -> Manifest:
    data = {"classes": [str(i) for i in range(10)], "splits": {"train": {"rows": 1437, "shards": []},
                                                               "val": {"rows": 360, "shards": []}}}
    return Manifest("/nowhere", data, "0" * 64)


def test_decode_key_defaults_to_cpu_and_takes_cpu_or_gpu():
    assert load_job(JOB).data.decode == "cpu"
    assert load_job(JOB, ["data.decode=gpu"]).data.decode == "gpu"
    with pytest.raises(ConfigError, match=r"data\.decode: Input should be 'cpu' or 'gpu', got 'tpu'"):
        load_job(JOB, ["data.decode=tpu"])


@pytest.mark.parametrize("overrides, message", [
    (["data.decode=gpu"], "data.decode: gpu decodes on the training device, which is the CPU here "
                          "(scaling.use_gpu=false); expected scaling.use_gpu=true"),
    ([*GPU_JOB, "data.randaugment=rand-m9-mstd0.5-inc1"], "data.decode: gpu does not run data.randaugment="),
    (GPU_JOB, "data.decode: gpu needs a CUDA device, and this machine has none (no CUDA device"),
])
@pytest.mark.parametrize("address", [None, "local"])  # either way the local Ray would train on this machine
def test_preflight_refuses_gpu_decode_where_it_cannot_run(monkeypatch, overrides, message, address):
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        check_job(load_job(JOB, overrides), digits_manifest())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpu_decode_passes_preflight_with_cuda_here_or_on_a_cluster(monkeypatch):
    cfg = load_job(JOB, GPU_JOB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_job(cfg, digits_manifest())  # a CUDA device on this machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    check_job(cfg, digits_manifest())  # a cluster: its workers check their device when they start
    check_job(load_job(JOB), digits_manifest())  # data.decode=cpu: no such checks


def test_train_with_gpu_decode_without_cuda_is_one_line_before_ray(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "manifest.json").write_text(json.dumps(digits_manifest().data))
    ran = run_cli("train", JOB, *GPU_JOB, f"data.path={tmp_path}", f"run.storage_path={tmp_path}/runs")
    assert_one_line_error(ran, "data.decode: gpu needs a CUDA device, and this machine has none")
    assert not (tmp_path / "runs").exists()


def test_worker_device_check_names_the_key_and_what_it_found():
    with pytest.raises(UserError, match=r"^data\.decode: gpu, but this Train worker's device is cpu \(no CUDA device"):
        check_decode_device(torch.device("cpu"))
    check_decode_device(torch.device("cuda", 0))  # only the type is checked; no CUDA call is made


def test_bench_train_on_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(run_cli("bench", "train", "--device", "cuda", "--quick"),
                          "--device cuda: no CUDA device on this machine (torch.cuda.is_available() is False)")
    assert_one_line_error(run_cli("bench", "train", "--device", "cuda", "--windows", "2"), "--windows: a flag of "
                          "the CPU benchmark")


# ---------------------------------------------------------------------------------------------------------
# The encoded stream: what the Ray Data task yields with data.decode=gpu


def streams(files, data: DataConfig, epoch, rank=None, world=1, positional=False):
    args = ({"shard": np.arange(len(files))}, files, SHARD_ROWS, data, 3, epoch, rank, world, positional)
    return list(_decode_train_shards(*args)), list(_encoded_train_shards(*args))


@pytest.mark.parametrize("case", ["shared", "repeated_aug", "positional"])
def test_encoded_stream_has_the_cpu_streams_rows_crops_and_flips(labelled_shards, case):
    import pyarrow.parquet as pq

    data = DataConfig(image_size=16, scale=(0.2, 1.0), block_rows=4, repeated_aug=3 if case == "repeated_aug" else 1)
    if case == "positional":
        plan = EpochPlan.fresh(epoch=1, train_rows=sum(SHARD_ROWS), world=2, step_images=4)
        decoded, encoded = streams(labelled_shards, data, plan, 1, 2, positional=True)
    else:
        decoded, encoded = streams(labelled_shards, data, 1, *((1, 2) if case == "repeated_aug" else ()))
    assert all(len(b["label"]) <= data.block_rows for b in encoded + decoded)
    labels = np.concatenate([b["label"] for b in encoded])
    assert np.array_equal(labels, np.concatenate([b["label"] for b in decoded]))  # the same rows, same order
    by_label = {}
    for f in labelled_shards:
        t = pq.read_table(f)
        by_label.update(zip(t.column("label").to_pylist(), t.column("image").to_pylist(), strict=True))
    for block in encoded:
        assert set(block) == {"jpeg", "box", "flip", "label"}
        assert block["box"].dtype == np.int32 and block["flip"].dtype == bool and block["label"].dtype == np.int64
        for jpeg, label in zip(block["jpeg"], block["label"], strict=True):
            assert jpeg == by_label[int(label)]  # the shard's bytes as they are
    # the crops: decoding the encoded rows on the CPU with decode_crops gives the PIL path's images
    images = np.concatenate([decode_crops(**unpacked(pack_encoded(b)), size=16).numpy() for b in encoded])
    reference = np.concatenate([b["image"] for b in decoded])
    assert images.shape == reference.shape and np.abs(images.astype(int) - reference).mean() < 4


def unpacked(packed):
    return {"jpeg": packed["jpeg"], "lengths": packed["jpeg_len"], "boxes": packed["box"], "flips": packed["flip"]}


def test_encoded_stream_draws_each_box_and_flip_from_the_images_rng(labelled_shards):
    import pyarrow.parquet as pq

    data = DataConfig(image_size=16, scale=(0.2, 1.0), hflip=0.5)
    _, encoded = streams(labelled_shards, data, 2)
    keys = {}
    for f in labelled_shards:
        t = pq.read_table(f)
        keys.update(zip(t.column("label").to_pylist(), t.column("key").to_pylist(), strict=True))
    flips = []
    for block in encoded:
        for jpeg, box, flip, label in zip(block["jpeg"], block["box"], block["flip"], block["label"], strict=True):
            rng = row_rng(3, 2, keys[int(label)])
            assert tuple(box) == random_resized_crop_box(*image_size_of(jpeg), data.scale, data.ratio, rng)
            assert flip == (rng.random() < data.hflip)
            flips.append(bool(flip))
    assert 0 < sum(flips) < len(flips)


# ---------------------------------------------------------------------------------------------------------
# The device side, on device="cpu"


def synth_jpegs(n: int, size=(96, 72)) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synth_image(i % 3, i, *size).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def encoded_rows(jpegs, size, scale, hflip=0.5, interpolation="bilinear"):
    """What the Ray Data task yields for these images (keys k0, k1, ...), and the PIL path's crops of them."""
    boxes, flips, reference = [], [], []
    for i, b in enumerate(jpegs):
        reference.append(decode_train(b, size, row_rng(0, 0, f"k{i}"), scale, (3 / 4, 4 / 3), hflip,
                                      interpolation=interpolation))
        rng = row_rng(0, 0, f"k{i}")
        boxes.append(random_resized_crop_box(*image_size_of(b), scale, (3 / 4, 4 / 3), rng))
        flips.append(rng.random() < hflip)
    rows = {"jpeg": np.array(jpegs, dtype=object), "box": np.array(boxes, dtype=np.int32),
            "flip": np.array(flips), "label": np.arange(len(jpegs))}
    return rows, np.stack(reference)


@pytest.mark.parametrize("scale, size, interpolation, tolerance", [
    ((0.25, 1.0), 64, "bilinear", 0.5),  # crops under 2x the output: no draft decode, nearly PIL's pixels
    ((0.25, 1.0), 64, "bicubic", 0.5),
    ((0.08, 1.0), 32, "bilinear", 2.0),  # PIL decodes large crops at 1/2 scale (draft): close, not equal
])
def test_decode_on_cpu_matches_the_pil_path(scale, size, interpolation, tolerance):
    rows, reference = encoded_rows(synth_jpegs(12), size, scale, interpolation=interpolation)
    batch = EncodedCollate()(rows)
    images = decode_crops(batch["jpeg"], batch["jpeg_len"], batch["box"], batch["flip"], size, interpolation)
    assert images.shape == (12, size, size, 3) and images.dtype == torch.uint8
    diff = np.abs(images.numpy().astype(int) - reference.astype(int))
    assert diff.mean() < tolerance, diff.mean()
    assert abs(images.float().mean().item() - reference.mean()) < 1.0
    assert abs(images.float().std().item() - reference.std()) < 1.0
    no_flip = decode_crops(batch["jpeg"], batch["jpeg_len"], batch["box"], torch.zeros(12, dtype=torch.bool), size,
                           interpolation)
    flipped = batch["flip"].numpy()
    assert torch.equal(images[flipped], no_flip[flipped].flip(2)) and torch.equal(images[~flipped],
                                                                                   no_flip[~flipped])


def test_collate_packs_a_batch_that_splits_like_any_other():
    jpegs = synth_jpegs(6, (40, 30))
    rows, _ = encoded_rows(jpegs, 16, (0.5, 1.0))
    batch = EncodedCollate()(rows)
    assert batch["jpeg"].dtype == torch.uint8 and batch["jpeg"].shape == (6, max(map(len, jpegs)))
    for i, b in enumerate(jpegs):
        assert bytes(batch["jpeg"][i, : batch["jpeg_len"][i]].numpy()) == b
        assert not batch["jpeg"][i, batch["jpeg_len"][i]:].any()  # zero padding
    parts = list(micro_batches([batch], 3))  # a positional stream's gradient accumulation
    assert [len(p["label"]) for p in parts] == [2, 2, 2]
    whole = batch_images(batch, DataConfig(image_size=16), "cpu")
    pieces = torch.cat([batch_images(p, DataConfig(image_size=16), "cpu") for p in parts])
    assert torch.equal(whole, pieces)
    assert encoded_batches()["device"] == "cpu" and isinstance(encoded_batches()["collate_fn"], EncodedCollate)


def test_batch_images_chooses_the_path_by_the_batch():
    cpu_batch = {"image": torch.zeros(2, 16, 16, 3, dtype=torch.uint8), "label": torch.tensor([0, 1])}
    assert batch_images(cpu_batch, DataConfig(image_size=16), "cpu") is cpu_batch["image"]
    rows, reference = encoded_rows(synth_jpegs(2), 16, (0.25, 1.0))
    decoded = batch_images(EncodedCollate()(rows), DataConfig(image_size=16), "cpu")
    assert decoded.shape == (2, 16, 16, 3) and np.abs(decoded.numpy().astype(int) - reference).mean() < 2
