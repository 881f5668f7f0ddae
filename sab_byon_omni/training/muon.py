"""Muon, an optimizer of its own for the hidden weight matrices (optim.py pairs it with AdamW).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch >= 2.9 ships it as
``torch.optim.Muon``) updates a matrix by the orthogonalised Nesterov momentum of its gradient:
five Newton-Schulz iterations map the momentum to a matrix with its singular vectors and its
singular values pushed towards 1, so each step moves the matrix's directions by similar amounts.
On this project's learning benchmark it is the largest single lever found (docs/RECIPES.md).

Why not ``torch.optim.Muon`` itself: it orthogonalises in bfloat16 always, which CPUs without
native bf16 run some 400x slower than fp32 (a 200-step run of preset small took over 17 minutes
instead of 4), and it does not exist before torch 2.9. The update here is the same algorithm (same
momentum, Nesterov step, Newton-Schulz coefficients, decoupled weight decay and
``sqrt(max(1, rows / cols))`` rate adjustment), with a matrix's rows optionally split into equal
blocks orthogonalised one by one (a fused qkv as its q, k and v).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero
NS_STEPS = 5
MOMENTUM = 0.95


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Newton-Schulz in ``dtype`` on ``update`` (a matrix, or a batch of matrices along the first
    dimension), returned in ``update``'s dtype: the same singular vectors, and every singular value
    at least about 1/600 of the matrix's Frobenius norm mapped into roughly [0.68, 1.2]. The
    iteration multiplies a small singular value by at most 3.4445 per step (the quintic's slope at
    zero), so smaller ones stay small: 1e-4 of the norm ends near 0.05, 1e-3 near 0.47."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(update.dtype)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype Muon runs Newton-Schulz in on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _check_split(group: dict[str, Any]) -> None:
    k = group["split"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Muon's split must be a positive integer, got {k!r}")
    bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2 or p.shape[0] % k]
    if bad:
        raise ValueError(f"Muon updates 2-D matrices whose rows split into {k}; got {bad[0]}")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: Nesterov momentum (``momentum``), orthogonalised by
    :func:`orthogonalize`, applied at ``lr * sqrt(max(1, rows / cols))`` after the decoupled weight
    decay ``p -= lr * weight_decay * p``.

    A group's ``split`` (default 1) says its matrices' rows are that many equal blocks, each
    orthogonalised on its own (3 for a fused qkv). Other keys of a group are kept as they are (the
    ``muon`` mark of :class:`~sab_byon_omni.training.optim.MuonWithAdamW`'s groups). ``ns_dtype``:
    the dtype of the Newton-Schulz iteration (default: :func:`newton_schulz_dtype` of the
    parameter's device). The state of a parameter is its ``momentum_buffer``."""

    def __init__(self, params: Iterable[Any], lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = MOMENTUM, split: int = 1, ns_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, split=split))
        self.ns_dtype = ns_dtype

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_split(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, beta, k = group["lr"], group["weight_decay"], group["momentum"], group["split"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - beta)
                nesterov = p.grad.lerp(buf, beta)
                rows, cols = p.shape[0] // k, p.shape[1]
                dtype = self.ns_dtype or newton_schulz_dtype(p.device)
                direction = orthogonalize(nesterov.view(k, rows, cols), dtype=dtype).view_as(p)
                p.mul_(1 - lr * decay)
                p.add_(direction, alpha=-lr * math.sqrt(max(1.0, rows / cols)))
        return loss
