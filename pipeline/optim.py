"""Optimizers and learning-rate schedules from typed config sections (no DeepSpeed here)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from pipeline.lamb import TIMM_MAX_GRAD_NORM, Lamb


def weights_only(name: str, param: torch.Tensor) -> bool:
    """The default exemption from weight decay: norms and biases (any 1-D parameter)."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float,
                 exempt: Callable[[str, torch.Tensor], bool] = weights_only) -> list[dict]:
    """Two groups of the trainable parameters: with weight decay, and without it where `exempt(name, param)`
    (a model family may bring its reference's rule, e.g. pipeline.models.clip.open_clip_train_exempt)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exempt(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], optim_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """fused: one CUDA kernel per step for AdamW (what timm and open_clip_train use on GPUs); the params may
    still be on the CPU here, the kernel is chosen at the first step."""
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps,
                                 fused=True if fused else None)
    if optim_cfg.name == "lamb":
        # Its clip moves to DeepSpeed (grad_clip_norm below): inside the optimizer it would see only the
        # group and partition ZeRO steps at a time, not the global norm.
        return Lamb(groups, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps, max_grad_norm=None)
    raise ValueError(f"optim.name: unknown optimizer {optim_cfg.name!r} (valid: sgd, adamw, lamb)")


def grad_clip_norm(optim_cfg) -> float | None:
    """The global gradient norm clip DeepSpeed applies (its gradient_clipping), or None.

    LAMB as timm trains it also clips at its max_grad_norm (1.0) after any clip of the training script;
    two clips of the global norm in a row are one clip at the smaller bound.
    """
    if optim_cfg.name == "lamb":
        return min(optim_cfg.grad_clip_norm or TIMM_MAX_GRAD_NORM, TIMM_MAX_GRAD_NORM)
    return optim_cfg.grad_clip_norm


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule_cfg, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine or step."""
    if warmup_steps > 0 and step < warmup_steps:
        start = schedule_cfg.warmup_lr_ratio
        return start + (1.0 - start) * step / warmup_steps
    if schedule_cfg.kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        floor = schedule_cfg.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    epoch = step / max(1, steps_per_epoch)
    return schedule_cfg.step_gamma ** sum(epoch >= e for e in schedule_cfg.step_epochs)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, schedule_cfg, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, schedule_cfg, steps_per_epoch)
    )
