"""Optimizer (with layer-wise lr decay), learning-rate schedule, the batch augmentations on the device (random
erasing, mixup/cutmix) and loss, each built from the JobConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn

from vitlab.config import DataConfig, OptimConfig


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """DeiT's rule when optim.scale_lr: lr x global batch / 512."""
    return optim.lr * global_batch / 512 if optim.scale_lr else optim.lr


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW or LAMB through timm: no weight decay on norms, biases (1-d params) and on what the model
    lists in no_weight_decay() (position embeddings, class/distillation tokens). With optim.layer_decay,
    timm's param_groups_layer_decay gives block i the lr_scale layer_decay ** (depth - i) (the embeddings one
    more power, the head 1), which the schedule applies."""
    return create_optimizer_v2(
        model, opt=optim.name, lr=lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas),
        eps=optim.eps, filter_bias_and_bn=True, layer_decay=optim.layer_decay,
    )


@dataclass(frozen=True)
class WarmupCosine:
    """Per-step schedule: linear warmup from warmup_lr to base_lr, then cosine down to min_lr."""

    base_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def build_schedule(optim: OptimConfig, base_lr: float, steps_per_epoch: int, epochs: int) -> WarmupCosine:
    return WarmupCosine(
        base_lr=base_lr,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=int(round(optim.warmup_epochs * steps_per_epoch)),
        warmup_lr=min(optim.warmup_lr, base_lr),
        min_lr=min(optim.min_lr, base_lr),
    )


def build_mixup(optim: OptimConfig, num_classes: int):
    """timm's Mixup (mixup and/or cutmix, label smoothing folded into its soft targets), or None."""
    if optim.mixup <= 0 and optim.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=optim.mixup, cutmix_alpha=optim.cutmix, prob=optim.mixup_prob,
        switch_prob=optim.mixup_switch_prob, label_smoothing=optim.label_smoothing, num_classes=num_classes,
    )


def build_eraser(data: DataConfig, device: torch.device) -> RandomErasing | None:
    """timm's RandomErasing on normalised NCHW batches (in place, per image), or None when data.reprob is 0."""
    if data.reprob <= 0:
        return None
    return RandomErasing(probability=data.reprob, mode=data.remode, max_count=data.recount, device=str(device))


def batch_augment(eraser: RandomErasing | None, mixup: Mixup | None):
    """(images, labels) -> (images, targets): random erasing, then mixup/cutmix (DeiT's order: erasing is a
    per-image transform, mixup mixes the erased images)."""

    def augment(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if eraser is not None:
            images = eraser(images)
        if mixup is not None:
            return mixup(images, labels)
        return images, labels

    return augment


def build_loss(optim: OptimConfig, mixup) -> nn.Module:
    """Soft-target cross-entropy under mixup/cutmix, else cross-entropy with label smoothing."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
