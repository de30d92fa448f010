"""Optimizer groups, the warmup + cosine schedule, mixup and RandAugment wiring (no Ray needed)."""

import numpy as np
import pytest
import torch

from tests.support.data import jpeg_bytes
from vitlab.config import OptimConfig
from vitlab.data.transforms import build_randaugment, decode_train, row_rng
from vitlab.model import create_model
from vitlab.train.optim import build_loss, build_mixup, build_optimizer, build_schedule, effective_lr

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_no_weight_decay_on_norms_biases_pos_embed_and_tokens(name):
    model = create_model("vit_tiny_patch16_224", 10, TINY)
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.05), 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.weight"} <= no_decay
    assert {"head.weight", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decay
    assert len(no_decay) + len(decay) == len(names)


def test_warmup_then_cosine_per_step():
    optim = OptimConfig(lr=1e-3, warmup_epochs=2, warmup_lr=0.0, min_lr=1e-5)
    s = build_schedule(optim, optim.lr, steps_per_epoch=10, epochs=10)
    assert s(0) == 0.0 and s(10) == pytest.approx(5e-4) and s(20) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # halfway through the cosine
    assert s(100) == pytest.approx(1e-5)
    assert all(s(i) >= s(i + 1) for i in range(20, 100))


def test_lr_scaling_by_global_batch():
    assert effective_lr(OptimConfig(lr=5e-4, scale_lr=True), 1024) == pytest.approx(1e-3)
    assert effective_lr(OptimConfig(lr=5e-4), 1024) == pytest.approx(5e-4)


def test_mixup_gives_soft_targets_and_soft_loss():
    optim = OptimConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mixup = build_mixup(optim, 10)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    mx, target = mixup(x, y)
    assert target.shape == (4, 10) and torch.allclose(target.sum(1), torch.ones(4))
    assert build_loss(optim, mixup)(torch.randn(4, 10), target) > 0
    assert build_mixup(OptimConfig(), 10) is None


def test_randaugment_runs_in_the_decode():
    aug = build_randaugment("rand-m9-mstd0.5-inc1", 16, (0.5, 0.5, 0.5))
    data = jpeg_bytes(1, 2, (40, 30))
    plain = decode_train(data, 16, row_rng(0, 0, "k"))
    out = decode_train(data, 16, row_rng(0, 0, "k"), augment=aug)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and plain.shape == out.shape


def test_layer_decay_scales_the_lr_of_each_block():
    model = create_model("vit_tiny_patch16_224", 10, {**TINY, "depth": 4})
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5), 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["blocks.0.attn.qkv.weight"] / scale["blocks.3.attn.qkv.weight"] == pytest.approx(0.5 ** 3)
    assert scale["head.weight"] == 1.0 and scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** 5)
    schedule = build_schedule(OptimConfig(warmup_epochs=0), 1e-3, steps_per_epoch=10, epochs=1)
    schedule.apply(opt, 0)  # the schedule honours lr_scale
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs["blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5 ** 4)


def test_random_erasing_changes_only_the_erased_rectangles_in_the_configured_share():
    import random

    from vitlab.config import DataConfig
    from vitlab.train.optim import batch_augment, build_eraser

    random.seed(0)
    torch.manual_seed(0)
    images = torch.randn(2000, 3, 16, 16)
    labels = torch.zeros(2000, dtype=torch.long)
    augment = batch_augment(build_eraser(DataConfig(reprob=0.25, remode="pixel"), torch.device("cpu")), None)
    out, targets = augment(images.clone(), labels)
    assert targets is labels
    changed = (out != images).any(dim=1)  # N x H x W: pixels that differ in any channel
    share = changed.flatten(1).any(dim=1).float().mean().item()
    assert 0.21 <= share <= 0.29, share
    for mask in changed[changed.flatten(1).any(dim=1)][:200]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and mask.sum() == box.numel()  # one filled rectangle, nothing outside it
    assert build_eraser(DataConfig(), torch.device("cpu")) is None


def test_ema_follows_the_live_weights_and_survives_a_checkpoint_bit_for_bit():
    from timm.utils import ModelEmaV3

    from vitlab.config import JobConfig
    from vitlab.train import state
    from vitlab.train.loop import _build_ema

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 10, TINY)
    cfg = JobConfig.model_validate({"train": {"ema_decay": 0.9}})
    ema = _build_ema(cfg, model, None, 0)
    assert isinstance(ema, ModelEmaV3) and ema.decay == 0.9
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 4):
        model(torch.randn(4, 3, 16, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, step=step)
    live, averaged = model.state_dict(), ema.module.state_dict()
    assert not torch.equal(live["blocks.0.attn.qkv.weight"], averaged["blocks.0.attn.qkv.weight"])
    # after step 1 (decay 0) the EMA is the weights; then it moves 10% of the way each step
    out = state.write_checkpoint_dir(model=model, ema=ema, optimizer=opt, scaler=None, epoch=1, step=3,
                                     config_yaml=cfg.to_yaml(), metrics={}, rng_states=[], confusion=None)
    saved = state.load_state(out)
    restored = _build_ema(cfg, create_model("vit_tiny_patch16_224", 10, TINY), saved, 0)
    for key, value in averaged.items():
        assert torch.equal(restored.module.state_dict()[key], value), key
    assert _build_ema(JobConfig(), model, saved, 0) is None  # ema_decay 0: off


def test_best_by_ema_needs_ema():
    from vitlab.config import JobConfig
    from vitlab.errors import ConfigError

    with pytest.raises(ConfigError, match="run.best_by=val_top1_ema needs model EMA"):
        JobConfig.from_raw({"run": {"best_by": "val_top1_ema"}}, "job.yaml")
