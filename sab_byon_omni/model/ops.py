"""CPU tricks of the model, by name: each computes exactly what the plain PyTorch op computes, and
the model calls it in place of that op.

* :func:`linear`: ``F.linear`` with a multi-threaded path for the single row of decoding on a CPU;
* :class:`GeluLinear`: ``linear(gelu(u), w, b)`` that keeps only ``u`` for backward (memory saving);
* :func:`linear_cross_entropy`: the summed ``cross_entropy(linear(x, w), targets)`` of the output
  head, its softmax taken a few rows at a time and its gradient computed on the way;
* :class:`CausalAttentionCpu`: causal ``scaled_dot_product_attention`` of short bf16/fp16 windows
  on a CPU, its backward run by the fp32 kernel;
* :class:`RMSNormCpu`: ``nn.RMSNorm`` for training on a CPU in a few passes over the rows, its
  output already in the dtype the next matmul runs in.
"""

from __future__ import annotations

import contextlib
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


# Keys up to this length: torch's CPU flash-attention backward is faster in fp32 than in bf16 or
# fp16 (it splits queries 32 at a time below 192 and pays a fixed cost per split in reduced
# precision). Lightweight's 12 heads, batch 4, 1 thread, Sapphire Rapids: 72 keys 3.99x, 128 keys
# 2.28x, 160 keys 1.92x, 192 keys 1.01x, 256 keys 1.08x, 320 keys 0.88x; 2 threads 4.14x at 72 and
# 0.82x at 256, the backward alone; forward + backward: benchmarks/levers.py attention_backward.
FP32_ATTENTION_BACKWARD_MAX_LEN = 191
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def plain_autograd() -> bool:
    """No ``torch.func`` transform and no forward-mode AD level is active: the autograd Functions
    of this module have no vmap or jvp rules, so under those the plain ops run instead."""
    return torch._C._functorch.maybe_current_level() is None and torch.autograd.forward_ad._current_level < 0


def fp32_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the causal attention of these (B, H, T, D) queries and (B, K, T, D) keys and values
    takes :class:`CausalAttentionCpu`: a CPU, bf16 or fp16, a gradient to compute, a window of at
    most ``FP32_ATTENTION_BACKWARD_MAX_LEN`` tokens (queries and keys the same), head dimensions
    contiguous, plain autograd (not compiled, no ``torch.func`` transform)."""
    return (_FLASH_CPU_BACKWARD is not None and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == v.dtype == q.dtype and q.shape[2] == k.shape[2] <= FP32_ATTENTION_BACKWARD_MAX_LEN
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1  # as SDPA requires of its kernels
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not torch.compiler.is_compiling() and plain_autograd())  # compiled: inductor's own attention


class CausalAttentionCpu(torch.autograd.Function):
    """``scaled_dot_product_attention(q, k, v, is_causal=True)`` (grouped-query heads allowed) whose
    forward is torch's CPU flash kernel in the inputs' dtype, as SDPA's, and whose backward runs
    that kernel's fp32 version on the inputs made fp32 (exact), with the forward's log-sum-exp: the
    gradients of the same attention, computed at least as precisely, up to 4x sooner on short
    windows (:data:`FP32_ATTENTION_BACKWARD_MAX_LEN`)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse = _FLASH_CPU(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        with torch.profiler.record_function("scaled_dot_product_attention backward in fp32"):
            dq, dk, dv = _FLASH_CPU_BACKWARD(grad.float(), q.float(), k.float(), v.float(), out.float(), lse,
                                             0.0, True)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


NORM_SCOPE = "rms_norm (model.ops.RMSNormCpu)"  # its products count as a norm's work in bench --breakdown


class RMSNormCpu(torch.autograd.Function):
    """``rms_norm(x, weight, eps)`` (fp32 maths, as ``nn.RMSNorm`` under autocast) returned in
    ``dtype``, keeping only ``x`` and the rows' 1/rms for backward. torch 2.13 has no fused CPU
    kernel for it: its composite makes about twice the passes over the rows, keeps fp32 products
    for backward, and its fp32 output is cast again by the matmul that follows. Here the rows' sums
    are a norm and two matrix-vector products (SmolLM2's 576-wide rows, 4 x 256 tokens, forward +
    backward with that cast: bf16 1.6-2.0x, fp32 2.1-3.1x; ``benchmarks/levers.py rmsnorm``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        with no_autocast(x), torch.profiler.record_function(NORM_SCOPE):
            rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
            xr = torch.mul(x, rstd)
            y = xr.mul_(weight) if dtype == x.dtype else torch.mul(xr, weight, out=torch.empty_like(x, dtype=dtype))
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the plain ops' gradients, themselves differentiable
            y = F.rms_norm(x, (x.shape[-1],), weight, ctx.eps)
            wanted = [t for t, need in zip((x, weight), ctx.needs_input_grad) if need]
            found = iter(torch.autograd.grad(y, wanted, grad.to(y.dtype), create_graph=True))
            return (*(next(found) if need else None for need in ctx.needs_input_grad[:2]), None, None)
        h = x.shape[-1]
        with torch.profiler.record_function(NORM_SCOPE):
            x2, r, g = x.reshape(-1, h), rstd.reshape(-1, 1), grad.reshape(-1, h)
            gx = torch.mul(g, x2)  # fp32
            grad_w = (r.t() @ gx).reshape(h).to(weight.dtype) if ctx.needs_input_grad[1] else None
            c = (gx @ weight).unsqueeze(1).mul_(r.pow(3)).div_(h)  # rstd^3 sum_j(g w x) / h (unsqueeze: vmap)
            grad_x = torch.mul(g, weight).mul_(r).addcmul_(x2, c, value=-1)
            return grad_x.view(x.shape).to(x.dtype), grad_w, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's where it is on for ``x``'s device, else ``x``'s."""
    kind = x.device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    except RuntimeError:  # a device type autocast does not know (meta)
        return x.dtype


# Bytes of fp32 softmax rows the head's loss takes at once, per device type (the estimate counts them)
HEAD_CHUNK_BYTES = {"cpu": 4 << 20, "other": 256 << 20}


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device (nothing to switch off on a device it does not know)."""
    try:
        return torch.autocast(x.device.type, enabled=False)
    except RuntimeError:  # meta
        return contextlib.nullcontext()


def head_chunk_rows(vocab: int, device_type: str) -> int:
    """Rows of logits whose fp32 softmax is taken at once: a few MB on a CPU, where they stay in its
    caches (SmolLM2's 49,152-word head, 4 x 256 tokens, bf16: 16 or 21 rows at a time 1.74x the two
    ops' forward + backward, 256 rows 1.34x; ``benchmarks/levers.py head_loss``), a few hundred MB on
    a GPU (fewer kernel launches; not measured: no GPU was lent)."""
    return max(1, HEAD_CHUNK_BYTES.get(device_type, HEAD_CHUNK_BYTES["other"]) // (4 * vocab))


def _head_softmax(logits: torch.Tensor, targets: torch.Tensor, softcap: float, ignore_index: int,
                  grad: bool) -> torch.Tensor:
    """The summed cross-entropy (fp32) of ``logits`` (N, V) against ``targets`` (N,), rows whose
    target is ``ignore_index`` left out; ``softcap``: the logits are ``softcap * tanh(logits / softcap)``
    first. With ``grad``, ``logits`` is overwritten with the loss's gradient with respect to them
    (softmax - one-hot, zero on ignored rows), in their dtype."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    rows = head_chunk_rows(logits.shape[1], logits.device.type)
    for start in range(0, logits.shape[0], rows):
        z, t, keep = logits[start:start + rows], safe[start:start + rows, None], valid[start:start + rows, None]
        f = z.float()  # fp32 rows: z itself (the rows are overwritten either way)
        squash = None
        if softcap:
            squash = (f / softcap).tanh_()
            f = squash * softcap
        picked = f.gather(1, t)
        top = f.amax(1, keepdim=True)
        f.sub_(top).exp_()
        norm = f.sum(1, keepdim=True)
        total += torch.where(keep, top + norm.log() - picked, 0.0).sum()  # an ignored row's inf or NaN stays out
        if grad:
            f.div_(norm).scatter_add_(1, t, torch.full_like(picked, -1.0))
            if squash is not None:
                f.mul_(1 - squash.square_())
            f.masked_fill_(~keep, 0.0)
            if f is not z:
                z.copy_(f)
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(linear(x, weight), targets, reduction="sum")`` whose forward turns the logits
    into their gradient in place, a few rows at a time: no fp32 copy of the logits, no log-softmax
    kept for backward, no separate gradient pass (about 0.6x the time and a fifth of the memory of
    the two ops at a 49,152-word head). Backward is the two matmuls of the head's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                ignore_index: int) -> torch.Tensor:
        dtype = compute_dtype(x)
        with no_autocast(x):
            xc, wc = x.to(dtype), weight.to(dtype)
            grad_logits = xc @ wc.t()
            total = _head_softmax(grad_logits, targets, softcap, ignore_index, grad=True)
        ctx.save_for_backward(xc, wc, grad_logits)
        ctx.dtypes = x.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError("the head's loss (model.ops.linear_cross_entropy) computes its gradient in its forward "
                               "and cannot be differentiated twice: take causal_lm_loss(model(ids), labels) instead")
        xc, wc, grad_logits = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        grad = grad.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_logits @ wc).float().mul_(grad).to(x_dtype)
        if ctx.needs_input_grad[1]:  # scaled in fp32 after the matmul: no rounding of a scaled input
            grad_w = (grad_logits.t() @ xc).float().mul_(grad).to(w_dtype)
        return grad_x, grad_w, None, None, None


def _check_targets(targets: torch.Tensor, rows: int, vocab: int, ignore_index: int) -> None:
    """``F.cross_entropy``'s checks: one target per row, each a class index or ``ignore_index``. The
    range is asserted on the device (``_assert_async``): no host synchronisation inside the
    trainer's accumulation window, an error as soon as the value is known."""
    if targets.numel() != rows:
        raise ValueError(f"Expected input batch_size ({rows}) to match target batch_size ({targets.numel()}).")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    torch._assert_async(~bad.any(), f"a target is out of bounds: not a class index in [0, {vocab}) "
                                    f"nor the ignored index {ignore_index}")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                         ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(linear(x, weight) [soft-capped], targets, ignore_index=..., reduction="sum")``
    for ``x`` (..., hidden) and ``targets`` (...), in fp32, without materialising fp32 logits: under
    autocast the matmul runs in its dtype and the softmax in fp32, as ``F.cross_entropy`` does."""
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    _check_targets(t, x2.shape[0], weight.shape[0], ignore_index)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if not plain_autograd():  # torch.func: the two ops themselves (the Function has no vmap/jvp rule)
            logits = F.linear(x2, weight)
            logits = softcap * torch.tanh(logits / softcap) if softcap else logits
            return F.cross_entropy(logits.float(), t, ignore_index=ignore_index, reduction="sum")
        return LinearCrossEntropy.apply(x2, weight, t, softcap, ignore_index)
    dtype = compute_dtype(x)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    rows = head_chunk_rows(weight.shape[0], x.device.type)
    with no_autocast(x):
        w = weight.to(dtype)
        for start in range(0, x2.shape[0], rows):  # no gradient: the logits a chunk at a time
            logits = x2[start:start + rows].to(dtype) @ w.t()
            total += _head_softmax(logits, t[start:start + rows], softcap, ignore_index, grad=False)
    return total
