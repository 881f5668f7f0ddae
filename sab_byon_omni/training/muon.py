"""Muon for the blocks' weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch >= 2.9 ships it as
``torch.optim.Muon``) updates a matrix by the orthogonalised Nesterov momentum of its gradient:
five Newton-Schulz iterations push every singular value of the update towards 1, so each step
moves all directions of the matrix by a similar amount. On this project's learning benchmark it is
the largest single lever found (docs/RECIPES.md).

Why not ``torch.optim.Muon`` itself: it orthogonalises in bfloat16, which CPUs without native bf16
run some 400x slower than fp32 (a 200-step run of preset small took over 17 minutes instead of 4),
it does not exist before torch 2.9, and a second optimizer object would break the guide's
``optimizer.load_state_dict(checkpoint['optimizer_state_dict'])``. The update here is the same
algorithm (same momentum, Nesterov step, Newton-Schulz coefficients, decoupled weight decay and
``sqrt(max(1, rows / cols))`` rate adjustment), in fp32 on CPU and bf16 on CUDA, with the fused
qkv matrix orthogonalised as its three q, k and v blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero
NS_STEPS = 5
MOMENTUM = 0.95


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with the singular vectors of ``update`` (a matrix, or a
    batch of matrices along the first dimension): singular values land roughly in [0.7, 1.2]."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(torch.bfloat16 if update.is_cuda else torch.float32)
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


class MuonAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups marked ``muon=True`` take Muon's update instead.

    Groups without the mark are plain (fused where available) AdamW; a Muon group holds 2-D
    matrices and may give ``split`` (rows split into that many equal blocks, each orthogonalised on
    its own: 3 for a fused qkv). Its ``lr`` and ``weight_decay`` are Muon's. One ``state_dict``
    holds both (``momentum_buffer`` for Muon parameters, AdamW's moments for the rest)."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float],
                 fused: bool | None = None, foreach: bool | None = None) -> None:
        groups = [dict(g) for g in params]
        for g in groups:
            g.setdefault("muon", False)
            if g["muon"]:
                g.setdefault("momentum", MOMENTUM)
                g.setdefault("split", 1)
                if not isinstance(g["split"], int) or isinstance(g["split"], bool) or g["split"] < 1:
                    raise ValueError(f"Muon's split must be a positive integer, got {g['split']!r}")
                bad = [tuple(p.shape) for p in g["params"] if p.dim() != 2 or p.shape[0] % g["split"]]
                if bad:
                    raise ValueError(f"Muon updates 2-D matrices whose rows split into {g['split']}; got {bad[0]}")
        super().__init__(groups, lr=lr, betas=betas, fused=fused, foreach=foreach)
        # GradScaler: unscale the gradients and skip a non-finite step before calling step() (a fused
        # AdamW would otherwise be handed the scale and skip on its own, which Muon's part would not)
        self._step_supports_amp_scaling = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (load_state_dict, unpickling) AdamW's checks of its per-parameter state, over its groups only
        groups = state["param_groups"]
        state["param_groups"] = [g for g in groups if not g.get("muon")]
        super().__setstate__(state)
        self.param_groups = groups

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        try:  # AdamW's own step, over its groups only
            self.param_groups = [g for g in groups if not g.get("muon")]
            super().step()
        finally:
            self.param_groups = groups
        for g in groups:
            if g.get("muon"):
                self._muon_step(g)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
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
            direction = orthogonalize(nesterov.view(k, rows, cols)).view_as(p)
            p.mul_(1 - lr * decay)
            p.add_(direction, alpha=-lr * math.sqrt(max(1.0, rows / cols)))
