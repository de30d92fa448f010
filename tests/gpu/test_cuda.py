"""CUDA itself: bf16 and fp16 autocast (fp16 with GradScaler) as the training loop runs them, NCCL DDP,
torch.compile, and the GPU decode against the same decode on the CPU. Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist

from vitlab.data.gpu_decode import EncodedCollate, decode_crops
from vitlab.data.synth import synth_image
from vitlab.data.transforms import decode_train, image_size_of, random_resized_crop_box, row_rng
from vitlab.model import create_model

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_vit(device="cuda"):
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", 10, dict(TINY_VIT)).to(device)


def batch(device="cuda", n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def test_bf16_autocast_trains_in_bf16_and_keeps_fp32_weights():
    model, (x, y) = tiny_vit(), batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fp16_autocast_with_grad_scaler_steps_and_skips_an_overflow():
    model, (x, y) = tiny_vit(), batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")  # what train/loop.py builds for train.precision=fp16
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(8):  # the first steps may overflow at the initial scale (2**16): skipped, the scale halves
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
        assert logits.dtype == torch.float16 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # as train/epoch.py does before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    scale = scaler.get_scale()
    assert scale > 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))  # steps were taken
    # an overflowing step: the scaler skips it (weights unchanged) and halves its scale
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_torch_compile_on_cuda_matches_eager():
    model, (x, y) = tiny_vit(), batch()
    compiled = torch.compile(model)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        eager_logits = model(x)
        compiled_logits = compiled(x)
    torch.testing.assert_close(compiled_logits.float(), eager_logits.float(), atol=0.1, rtol=0.05)  # bf16 rounding
    loss = torch.nn.functional.cross_entropy(compiled_logits.float(), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t = torch.full((4,), float(rank + 1), device="cuda")
        dist.all_reduce(t)
        model = DistributedDataParallel(tiny_vit(f"cuda:{rank}"), device_ids=[rank])
        x, y = batch(f"cuda:{rank}", 8)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x + rank), y)  # another batch on each rank
        loss.backward()
        grad = model.module.head.weight.grad.detach().clone()
        grads = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(grads, grad)
        torch.save({"sum": t.cpu(), "grads": [g.cpu() for g in grads], "backend": dist.get_backend()},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nccl_ddp_all_reduces_and_synchronises_gradients(tmp_path):
    """Two processes on two GPUs where there are two, else a one-process NCCL group on the one GPU."""
    import torch.multiprocessing as mp

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    world = min(2, torch.cuda.device_count())
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["backend"] == "nccl"
        assert torch.equal(got["sum"], torch.full((4,), float(sum(range(1, world + 1)))))
        assert all(torch.equal(g, got["grads"][0]) for g in got["grads"])  # DDP averaged them: equal on all ranks


def test_gpu_decode_matches_the_same_decode_on_cpu_and_the_pil_path():
    jpegs, boxes, flips, reference = [], [], [], []
    for i in range(24):
        buf = io.BytesIO()
        synth_image(i % 4, i, 320, 240).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
        reference.append(decode_train(jpegs[-1], 224, row_rng(0, 0, f"k{i}")))
        rng = row_rng(0, 0, f"k{i}")
        boxes.append(random_resized_crop_box(*image_size_of(jpegs[-1]), (0.08, 1.0), (3 / 4, 4 / 3), rng))
        flips.append(rng.random() < 0.5)
    packed = EncodedCollate()({"jpeg": np.array(jpegs, dtype=object), "box": np.array(boxes, dtype=np.int32),
                               "flip": np.array(flips), "label": np.arange(24)})
    args = (packed["jpeg"], packed["jpeg_len"], packed["box"], packed["flip"], 224)
    on_gpu = decode_crops(*args, device="cuda")
    on_cpu = decode_crops(*args, device="cpu")
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (24, 224, 224, 3) and on_gpu.dtype == torch.uint8
    # nvJPEG's IDCT and upsampling are not libjpeg's: close, not equal
    assert (on_gpu.cpu().float() - on_cpu.float()).abs().mean() < 2.0
    assert (on_gpu.cpu().float() - torch.from_numpy(np.stack(reference)).float()).abs().mean() < 3.0
