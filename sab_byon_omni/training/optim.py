"""The optimizer and the learning-rate schedule: AdamW with decay/no-decay groups, and a schedule
that is a pure function of the step (so a resumed run continues exactly)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sab_byon_omni.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and the embedding); never norms or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def uses_fused_adamw(device: torch.device | str) -> bool:
    """Fused AdamW (one kernel per step) where torch has it. On CPU it measured 3.2-5.7x faster than
    foreach for Lightweight (benchmarks/levers.py optimizer, docs/BENCHMARKS.md)."""
    return torch.device(device).type in ("cuda", "cpu")


def make_optimizer(model: nn.Module, train: TrainConfig | None = None, device: torch.device | str | None = None,
                   ) -> torch.optim.AdamW:
    """The AdamW the trainer builds for ``model``: two parameter groups (weight decay on matrices,
    none on norms), ``train``'s rate, betas and decay (the defaults if omitted). The guide's
    ``optimizer.load_state_dict(checkpoint['optimizer_state_dict'])`` works on it as written."""
    t = train or TrainConfig()
    fused = uses_fused_adamw(device if device is not None else next(model.parameters()).device)
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, t: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine
    down to ``min_lr_ratio`` of the peak at ``total_steps``."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.learning_rate
    span = max(total_steps - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    floor = t.learning_rate * t.min_lr_ratio
    return floor + (t.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
