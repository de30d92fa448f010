"""The Ray Data input pipeline: shapes, dtypes, value ranges, exact row counts, seeded augmentation."""

import pytest
import torch

from vitlab.config import DataConfig
from vitlab.data.manifest import load_manifest
from vitlab.data.pipeline import Span, train_dataset, val_dataset


@pytest.fixture(scope="module")
def manifest(digits_dir):
    return load_manifest(digits_dir)


def collect(ds, batch_size=64):
    images, labels = [], []
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def test_val_batches_shapes_dtypes_ranges_and_counts(manifest):
    data = DataConfig(image_size=16)
    images, labels = collect(val_dataset(manifest, data))
    assert images.dtype == torch.uint8 and images.shape == (manifest.rows("val"), 16, 16, 3)
    assert labels.dtype == torch.int64 and int(labels.min()) >= 0 and int(labels.max()) < 10
    assert images.float().std() > 20 and int(images.max()) > 200  # real content, not a constant
    again, labels2 = collect(val_dataset(manifest, data))
    assert torch.equal(images, again) and torch.equal(labels, labels2)  # val is deterministic


def test_train_augmentation_seeded_by_seed_and_epoch(manifest):
    data = DataConfig(image_size=16, deterministic=True)
    a0, l0 = collect(train_dataset(manifest, data, seed=7, epoch=0))
    b0, m0 = collect(train_dataset(manifest, data, seed=7, epoch=0))
    a1, l1 = collect(train_dataset(manifest, data, seed=7, epoch=1))
    c0, _ = collect(train_dataset(manifest, data, seed=8, epoch=0))
    assert a0.shape == (manifest.rows("train"), 16, 16, 3)
    assert torch.equal(a0, b0) and torch.equal(l0, m0)  # same seed, same epoch: identical batches
    assert not torch.equal(l0, l1)  # order reshuffled per epoch
    assert sorted(l0.tolist()) == sorted(l1.tolist())  # but every image once
    assert not torch.equal(a0, c0)  # another seed: other crops


def test_gpu_decode_stream_through_ray_data_gives_the_cpu_streams_batches(manifest):
    """data.decode=gpu on the CPU tier: the Ray Data tasks yield JPEG bytes, boxes and flips (a binary column),
    EncodedCollate packs them, and decode_crops (device cpu here) gives the CPU path's images, in its order."""
    from vitlab.data.gpu_decode import batch_images, encoded_batches

    cpu = DataConfig(image_size=16, deterministic=True, block_rows=64)
    gpu = cpu.model_copy(update={"decode": "gpu"})
    images, labels = collect(train_dataset(manifest, cpu, seed=7, epoch=1))
    decoded, decoded_labels = [], []
    for batch in train_dataset(manifest, gpu, seed=7, epoch=1).iter_torch_batches(batch_size=64, **encoded_batches()):
        assert batch["jpeg"].dtype == torch.uint8 and batch["jpeg"].device.type == "cpu"
        decoded.append(batch_images(batch, gpu, "cpu"))
        decoded_labels.append(batch["label"])
    decoded, decoded_labels = torch.cat(decoded), torch.cat(decoded_labels)
    assert torch.equal(decoded_labels, labels) and decoded.shape == images.shape and decoded.dtype == torch.uint8
    assert (decoded.float() - images.float()).abs().mean() < 4  # the same crops; PIL's draft decode differs a little


@pytest.mark.timeout(180)  # without the fix val waits for ever
def test_val_beside_a_span_runs_while_the_span_s_decode_actor_holds_every_cpu(ray_session, manifest):
    """Training validates while its train span (data.back_to_back) is alive: the span's decode actor keeps its
    CPUs. Val tasks that asked for a CPU would wait until the span ends; beside a span they ask for none."""
    data = DataConfig(image_size=16, decode_cpus=2.0)  # the session's 2 CPUs: one actor holds both
    span = Span(epochs=200, images=manifest.rows("train"), last=200)  # minutes of decoding: alive throughout
    stream = iter(train_dataset(manifest, data, span=span).iter_batches(batch_size=64))
    assert len(next(stream)["label"]) == 64
    assert ray_session.available_resources().get("CPU", 0) == 0
    node = ray_session.get_runtime_context().get_node_id()
    _, labels = collect(val_dataset(manifest, data, beside_span=(1, [node])))
    assert len(labels) == manifest.rows("val")
    assert ray_session.available_resources().get("CPU", 0) == 0  # the span's actor held both CPUs all along
    del stream
