"""CPU tricks of the model, by name: each computes exactly what the plain PyTorch op computes, and
the model calls it in place of that op.

* :func:`linear`: ``F.linear`` with a multi-threaded path for the single row of decoding on a CPU;
* :class:`GeluLinear`: ``linear(gelu(u), w, b)`` that keeps only ``u`` for backward (memory saving).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with a faster path for a single row on a multi-threaded CPU.

    Decoding one token multiplies one row by every weight matrix. CPU BLAS runs that
    matrix-vector product on one thread, at about half of the machine's memory bandwidth; viewing
    the weight's rows as ``threads`` blocks lets ``bmm`` spread it over every thread (1.7x on a
    2-core EPYC: ``python benchmarks/levers.py gemv``). The result is the same dot products.
    Training, batches and other devices take ``F.linear``. Sampling on a CPU takes only the cores no
    other process is using (``model.generate.decoding_threads``): on a busy machine, one.
    """
    if x.device.type == "cpu" and x.shape[:-1].numel() == 1 and weight.is_contiguous() and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        n, rows = torch.get_num_threads(), weight.shape[0]
        if n > 1 and rows % n == 0 and weight.numel() >= 1 << 16:  # smaller ones: no gain
            k = weight.shape[1]
            out = torch.bmm(x.reshape(1, 1, k).expand(n, 1, k), weight.view(n, rows // n, k).transpose(1, 2))
            out = out.view(*x.shape[:-1], rows)
            return out if bias is None else out + bias.to(out.dtype)
    return F.linear(x, weight, bias)


class GeluLinear(torch.autograd.Function):
    """``linear(gelu(u), weight, bias)`` that keeps only ``u`` for backward and recomputes the GELU
    there, instead of keeping both ``u`` and ``gelu(u)`` (4 x hidden values per token each). The
    gradients are the ones autograd computes for the two ops. ``approximate``: as ``F.gelu``'s."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "tanh") -> torch.Tensor:
        ctx.save_for_backward(u, weight)
        ctx.approximate, ctx.has_bias = approximate, bias is not None
        return F.linear(F.gelu(u, approximate=approximate), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight = ctx.saved_tensors
        grad = grad.to(u.dtype)  # under autocast the forward matmul ran in u's dtype
        grad_u = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            g = F.gelu(u, approximate=ctx.approximate)
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(g.reshape(-1, g.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_u = torch.ops.aten.gelu_backward(grad.matmul(weight.to(u.dtype)), u, approximate=ctx.approximate)
        return grad_u, grad_w, grad_b, None
