"""The optimizer and the learning-rate schedule: AdamW with decay/no-decay groups (or Muon for the
blocks' matrices, ``train.optimizer: muon``), and a schedule that is a pure function of the step
(so a resumed run continues exactly)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sab_byon_omni.config import TrainConfig
from sab_byon_omni.training.muon import MuonAdamW


def param_groups(params: nn.Module | list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups for a model's (or a list's) trainable parameters: decay on matrices (and
    the embedding); never on norms or biases."""
    ps = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def uses_fused_adamw(device: torch.device | str) -> bool:
    """Fused AdamW (one kernel per step) where torch has it. On CPU it measured 3.2-5.7x faster than
    foreach for Lightweight (benchmarks/levers.py optimizer, docs/BENCHMARKS.md)."""
    return torch.device(device).type in ("cuda", "cpu")


def muon_groups(model: nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Muon for the blocks' 2-D matrices (a fused qkv as its three blocks); AdamW, at
    ``learning_rate``, for the embedding, the head and the norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_blocks = lambda n, p: p.dim() == 2 and (n.startswith("blocks.") or ".blocks." in n)  # noqa: E731
    qkv = [p for n, p in named if in_blocks(n, p) and n.endswith("attn.qkv.weight")]
    rest = [p for n, p in named if in_blocks(n, p) and not n.endswith("attn.qkv.weight")]
    muon = dict(muon=True, lr=train.muon_learning_rate, weight_decay=train.weight_decay)
    groups = [{"params": qkv, "split": 3, **muon}, {"params": rest, **muon}]
    groups += param_groups([p for n, p in named if not in_blocks(n, p)], train.weight_decay)
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, train: TrainConfig | None = None, device: torch.device | str | None = None,
                   ) -> torch.optim.AdamW:
    """The optimizer the trainer builds for ``model`` from ``train`` (the defaults if omitted):
    AdamW with two parameter groups (weight decay on matrices, none on norms), or with
    ``train.optimizer == "muon"`` a :class:`~sab_byon_omni.training.muon.MuonAdamW` (Muon for the
    blocks' matrices). The guide's ``optimizer.load_state_dict(checkpoint['optimizer_state_dict'])``
    works on it as written."""
    t = train or TrainConfig()
    fused = uses_fused_adamw(device if device is not None else next(model.parameters()).device)
    kw = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=fused or None, foreach=None if fused else True)
    if t.optimizer == "muon":
        return MuonAdamW(muon_groups(model, t), **kw)
    return torch.optim.AdamW(param_groups(model, t.weight_decay), **kw)


def lr_at(step: int, t: TrainConfig, total_steps: int, muon: bool = False) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine
    down to ``min_lr_ratio`` of the peak at ``total_steps``. ``muon``: the rate of the Muon
    groups (peak ``muon_learning_rate``, warmup ``muon_warmup_steps``)."""
    peak, warmup = (t.muon_learning_rate, t.muon_warmup_steps) if muon else (t.learning_rate, t.warmup_steps)
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if t.lr_schedule == "constant":
        return peak
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = peak * t.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, t: TrainConfig, total_steps: int) -> None:
    """Every parameter group's rate for optimizer step ``step`` (Muon groups follow their own peak and warmup)."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, t, total_steps, muon=g.get("muon", False))


def lr_names(t: TrainConfig) -> str:
    """The setting(s) to lower when a run diverges, for messages."""
    return "train.learning_rate or train.muon_learning_rate" if t.optimizer == "muon" else "train.learning_rate"


ADAMW_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
MUON_STATE = frozenset({"momentum_buffer"})


def check_loaded_state(optimizer: torch.optim.Optimizer, built: list[dict[str, Any]]) -> None:
    """After ``optimizer.load_state_dict(saved)``: put back the group settings this run built
    (``built``: its param groups' settings before loading; which groups are Muon, their split and
    momentum are the code's, never a file's), and check every state tensor fits its parameter (shape
    and dtype) and belongs to one, so a damaged or hostile file stops here with a ValueError instead
    of crashing or silently changing the step (fused AdamW reads and writes out of bounds on a moment
    of the wrong size; state under an index no group lists is kept aside and the moments dropped).
    A moment saved in another dtype is cast by ``load_state_dict`` before this runs: the file's own
    dtypes are checked when it is read (:func:`sab_byon_omni.files.checkpoint.check_format`)."""
    for group, mine in zip(optimizer.param_groups, built):
        params = group["params"]
        group.clear()
        group.update({**{k: v for k, v in mine.items() if k != "params"}, "params": params})
    with_state = 0
    muon_ids = {id(p) for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for key in optimizer.state:  # load_state_dict keeps state it cannot place under the file's own key
        if not isinstance(key, torch.Tensor) or id(key) not in params:
            shown = "a tensor" if isinstance(key, torch.Tensor) else repr(key)[:40]
            raise ValueError(f"optimizer state for {shown}, which is not a parameter of this optimizer (its "
                             "moments would be dropped silently)")
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        state = optimizer.state.get(p, {})
        if not state:
            continue
        with_state += 1
        muon = id(p) in muon_ids
        need, allowed = (MUON_STATE, MUON_STATE) if muon else (ADAMW_STATE - {"max_exp_avg_sq"}, ADAMW_STATE)
        if not need <= set(state) <= allowed:
            raise ValueError(f"parameter {i}: optimizer state {sorted(map(str, state))[:5]} is not "
                             f"{'Muon' if muon else 'AdamW'}'s ({', '.join(sorted(allowed))})")
        for key, value in state.items():
            if key == "step":
                ok = isinstance(value, torch.Tensor) and value.numel() == 1 and bool(torch.isfinite(value).all()) \
                    and float(value) >= 0
            else:
                ok = isinstance(value, torch.Tensor) and value.dtype == p.dtype and value.shape == p.shape \
                    and value.is_contiguous()
            if not ok:
                what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                if isinstance(value, torch.Tensor) and value.dtype != p.dtype and key != "step":
                    what = f"{what} of {str(value.dtype).removeprefix('torch.')}"
                raise ValueError(f"parameter {i}: optimizer state {key} {what} does not fit the parameter "
                                 f"{tuple(p.shape)} of {str(p.dtype).removeprefix('torch.')}")
    total = sum(len(g["params"]) for g in optimizer.param_groups)
    if 0 < with_state < total:
        raise ValueError(f"optimizer state for only {with_state} of {total} parameters")
