"""Sampling with a KV cache: temperature, top-k, top-p, a seed, streaming, an end token."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sab_byon_omni.machine import idle_cpus
from sab_byon_omni.model.transformer import CausalTransformer, KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set whose probability exceeds top-p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses the threshold
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids; temperature 0 is greedy (and so is the limit of a temperature
    too small to divide by). Non-finite logits mean damaged weights: a ValueError."""
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model produced non-finite logits (NaN or infinite weights?)")
    if temperature > 0:
        scaled = logits / temperature
        if bool(torch.isfinite(scaled).all()):
            probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
            return torch.multinomial(probs, 1, generator=generator)
    return logits.argmax(-1, keepdim=True)


def decoding_threads(device: torch.device, threads: int | None = None, use_cache: bool = True,
                     idle: int | None = None) -> int | None:
    """Torch intra-op threads to sample one sequence with: ``threads`` if given; on a CPU with the
    KV cache, as many as no other process is using when sampling starts (``idle``, default
    :func:`~sab_byon_omni.machine.idle_cpus`), at most torch's setting, at least 1; else None
    (torch's setting: GPUs, and recomputing the whole context each step).

    Each cached step multiplies one row by every weight. On free cores a second thread gains up to
    1.8x (Lightweight); while another process keeps a core busy, every op on two threads waits for
    the one that is not running: 2-40x slower than one thread, measured (``sab-omni generate --help``).
    """
    if threads is not None:
        return threads
    if device.type != "cpu" or not use_cache:
        return None
    return max(1, min(torch.get_num_threads(), idle_cpus() if idle is None else idle))


def cache_dtype(model: CausalTransformer, device: torch.device) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on (so no decoded token converts the
    whole cache in every layer), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


@torch.inference_mode()
def generate_tokens(model: CausalTransformer, prompt_ids: list[int], max_new_tokens: int = 200,
                    temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                    seed: int | None = None, eos_id: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time (for streaming). Stops at ``max_new_tokens`` or ``eos_id``.

    With the cache, each step feeds one token; when the context fills up, the cache is rebuilt from
    the most recent half of the context. Without it, each step re-runs the whole (cropped) context.
    """
    if not prompt_ids:
        raise ValueError("the prompt must encode to at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    limit = model.cfg.max_seq_len
    context = list(prompt_ids)
    cache = None
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                window = context[-limit:]
                logits = model(torch.tensor([window], device=device))[:, -1]
            elif cache is None or cache.pos >= limit:
                window = context[-(limit // 2 if cache is not None else limit):]
                cache = KVCache.empty(model.cfg, 1, limit, device, cache_dtype(model, device))
                logits = model(torch.tensor([window], device=device), cache=cache)[:, -1]
            else:
                logits = model(torch.tensor([[context[-1]]], device=device), cache=cache)[:, -1]
            nxt = int(sample_next(logits, temperature, top_k, top_p, gen))
            context.append(nxt)
            yield nxt
            if eos_id is not None and nxt == eos_id:
                return
    finally:
        model.train(was_training)
