"""The optimizer and the learning-rate schedule: AdamW with decay/no-decay groups (or, with
``train.optimizer: muon``, Muon for the matrices the model declares and AdamW for the rest, behind
one state dict), and a schedule that is a pure function of the step (so a resumed run continues
exactly)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sab_byon_omni.config import TrainConfig
from sab_byon_omni.training.muon import Muon, check_schedule


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


class MuonWithAdamW:
    """Muon for the parameter groups marked ``muon=True``, (fused) AdamW for the others: two torch
    optimizers, :attr:`muon` and :attr:`adamw`, behind the optimizer interface the trainer, the
    GradScaler and the guide use (``param_groups``, ``state``, ``step``, ``zero_grad``,
    ``state_dict``, ``load_state_dict``); as torchtitan's ``OptimizersContainer`` or Keller
    Jordan's ``MuonWithAuxAdam``.

    Its state dict is one optimizer's, the one the single ``MuonAdamW`` optimizer of earlier
    versions wrote: ``param_groups`` are Muon's groups then AdamW's, each with its ``muon`` mark
    (Muon's with ``split`` and ``momentum``), and ``state`` is keyed by a parameter's index across
    all of them. So earlier checkpoints load, and so does the guide's
    ``optimizer.load_state_dict(checkpoint['optimizer_state_dict'])``. It does not take a
    GradScaler's scale into its step: the scaler unscales the gradients and skips a non-finite
    step before calling :meth:`step`."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
                 fused: bool | None = None, foreach: bool | None = None, ns_dtype: torch.dtype | None = None,
                 process_group: Any = None) -> None:
        self.muon = Muon([g for g in groups if g.get("muon")], ns_dtype=ns_dtype, process_group=process_group)
        self.adamw = torch.optim.AdamW([{**g, "muon": False} for g in groups if not g.get("muon")], lr=lr,
                                       betas=betas, fused=fused, foreach=foreach)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Muon's groups, then AdamW's (the group dicts themselves: a rate set here is the optimizer's)."""
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Every parameter's state (Muon's ``momentum_buffer``, AdamW's moments and step)."""
        return {**self.muon.state, **self.adamw.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        state: dict[int, Any] = {}
        for opt in (self.muon, self.adamw):
            offset = sum(len(g["params"]) for g in groups)
            saved = opt.state_dict()
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in saved["param_groups"]]
            state.update({i + offset: s for i, s in saved["state"].items()})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`'s form: groups marked ``muon`` are Muon's (keys
        of AdamW's that an earlier version saved in them are dropped), the others AdamW's; a file
        whose groups do not match this optimizer's is refused before either part loads."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        muon = [{k: v for k, v in g.items() if k in ("params", "muon", *self.muon.defaults)}
                for g in groups if g.get("muon")]
        adamw = [g for g in groups if not g.get("muon")]
        for name, opt, saved in (("Muon", self.muon, muon), ("AdamW", self.adamw, adamw)):
            theirs, ours = ([len(g["params"]) for g in gs] for gs in (saved, opt.param_groups))
            if theirs != ours:
                raise ValueError(f"loaded state dict's {name} parameter groups hold {theirs} parameters, this "
                                 f"optimizer's {ours}")
        for g in muon:  # a schedule a file cannot run is refused before either part loads
            check_schedule(g)
        mine = {i for g in muon for i in g["params"]}
        self.muon.load_state_dict({"state": {i: s for i, s in state.items() if i in mine}, "param_groups": muon})
        # state under an index no group lists goes to AdamW, which keeps it aside (check_loaded_state refuses it)
        self.adamw.load_state_dict({"state": {i: s for i, s in state.items() if i not in mine},
                                    "param_groups": adamw})


def muon_groups(model: nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Muon for the matrices ``model.muon_matrices()`` declares (a group per way of splitting their
    rows: a fused qkv's three blocks, or its [q, kv, kv] sizes), at ``muon_learning_rate`` with the Newton-Schulz
    schedule ``muon_ns_steps`` x ``muon_ns_coefficients``; AdamW, at ``learning_rate``, for the rest (the
    embedding, the head and the norms)."""
    if not hasattr(model, "muon_matrices"):
        raise ValueError(f"optimizer muon needs the model to declare its hidden matrices (muon_matrices()); "
                         f"{type(model).__name__} does not: use optimizer adamw")
    matrices = [(p, k if isinstance(k, int) else tuple(k)) for p, k in model.muon_matrices() if p.requires_grad]
    splits = list(dict.fromkeys(k for _, k in matrices))  # in order of first appearance
    muon = dict(muon=True, lr=train.muon_learning_rate, weight_decay=train.weight_decay, ns_steps=train.muon_ns_steps,
                ns_coefficients=train.muon_ns_coefficients)
    groups = [{"params": [p for p, k in matrices if k == split], "split": split if isinstance(split, int) else
               list(split), **muon} for split in splits]
    taken = {id(p) for p, _ in matrices}
    groups += param_groups([p for p in model.parameters() if id(p) not in taken], train.weight_decay)
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, train: TrainConfig | None = None, device: torch.device | str | None = None,
                   process_group: Any = None) -> torch.optim.AdamW | MuonWithAdamW:
    """The optimizer the trainer builds for ``model`` from ``train`` (the defaults if omitted):
    ``torch.optim.AdamW`` with two parameter groups (weight decay on matrices, none on norms), or
    with ``train.optimizer == "muon"`` a :class:`MuonWithAdamW` (Muon for the model's
    :meth:`~sab_byon_omni.model.transformer.CausalTransformer.muon_matrices`). The guide's
    ``optimizer.load_state_dict(checkpoint['optimizer_state_dict'])`` works on either as written.
    ``process_group``: the DDP ranks that split Muon's Newton-Schulz work (:class:`Muon`)."""
    t = train or TrainConfig()
    fused = uses_fused_adamw(device if device is not None else next(model.parameters()).device)
    kw = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=fused or None, foreach=None if fused else True)
    if t.optimizer == "muon":
        return MuonWithAdamW(muon_groups(model, t), **kw, process_group=process_group)
    return torch.optim.AdamW(param_groups(model, t.weight_decay), **kw)


def optimizer_name(optimizer: torch.optim.Optimizer | MuonWithAdamW) -> str:
    """How a report names ``optimizer``: "AdamW fused", "Muon + AdamW foreach"..."""
    adamw = optimizer.adamw if isinstance(optimizer, MuonWithAdamW) else optimizer
    d = adamw.defaults
    name = "AdamW fused" if d.get("fused") else ("AdamW foreach" if d.get("foreach") else "AdamW for-loop")
    return f"Muon + {name}" if isinstance(optimizer, MuonWithAdamW) else name


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
