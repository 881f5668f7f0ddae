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
    ids, finite = sample_on_device(logits, temperature, top_k, top_p, generator)
    if not bool(finite):
        raise ValueError(NON_FINITE)
    return ids


NON_FINITE = "the model produced non-finite logits (NaN or infinite weights?)"


def sample_on_device(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_next` without waiting for the device: ((B, 1) ids, a 0-d bool tensor saying
    whether every logit was finite, for the caller to check when it next reads ids back anyway)."""
    logits = logits.float()
    finite = torch.isfinite(logits).all()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True), finite
    # Non-finite logits (reported by ``finite``) become zeros, so multinomial never sees a NaN (on
    # CUDA a device assert). Shifted so that the largest is 0 (softmax, top-k and top-p do not
    # change), a temperature too small to divide by gives 0 and -inf, never inf: the greedy limit.
    safe = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
    scaled = (safe - safe.amax(-1, keepdim=True)) / temperature
    probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator), finite


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


def readback_every(device: torch.device) -> int:
    """Tokens sampled between two reads of the ids back to the host: 1 on a CPU (reading a CPU
    tensor waits for nothing), 8 on a GPU, where each read waits for the device to finish and
    leaves it idle while Python prepares the next step."""
    return 1 if device.type == "cpu" else 8


@torch.no_grad()  # not inference_mode: there autocast casts every weight again for every token (no cast cache)
def generate_tokens(model: CausalTransformer, prompt_ids: list[int], max_new_tokens: int = 200,
                    temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                    seed: int | None = None, eos_id: int | None = None, use_cache: bool = True,
                    every: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (for streaming). Stops at ``max_new_tokens`` or ``eos_id``.

    With the cache, each step feeds one token; when the context fills up, the cache is rebuilt from
    the most recent half of the context. Without it, each step re-runs the whole (cropped) context.
    With the cache the sampled ids stay on the device and feed the next step there; every ``every``
    tokens (default :func:`readback_every`) they come back to the host together, which is also when
    the finiteness of their logits is checked and the end token looked for (a chunk's tokens after
    it are dropped), so a GPU does not wait on the host between those reads. (A rebuild of the
    cache and the path without it read every id back first: they need the context on the host.)
    """
    if not prompt_ids:
        raise ValueError("the prompt must encode to at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    every = every or readback_every(device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    context = list(prompt_ids)
    pending: list[torch.Tensor] = []  # sampled ids not yet read back, each (1, 1)
    finite: list[torch.Tensor] = []  # whether each one's logits were finite
    step = _Decoder(model, use_cache, device)
    try:
        for i in range(max_new_tokens):
            if pending and step.needs_context():
                yield from _read_back(pending, finite, context, eos_id)
            if context[-1:] == [eos_id] and len(context) > len(prompt_ids):
                return
            nxt, ok = sample_on_device(step(context, pending[-1] if pending else None), temperature, top_k, top_p, gen)
            pending.append(nxt)
            finite.append(ok)
            if len(pending) == every or i + 1 == max_new_tokens:
                yield from _read_back(pending, finite, context, eos_id)
                if context[-1] == eos_id:
                    return
    finally:
        model.train(was_training)


def _read_back(pending: list[torch.Tensor], finite: list[torch.Tensor], context: list[int],
               eos_id: int | None) -> Iterator[int]:
    """The pending ids on the host, once their logits are known to be finite: appended to
    ``context`` and yielded, up to the end token; both lists emptied."""
    ok = finite[0] if len(finite) == 1 else torch.stack(finite).all()
    if not bool(ok):
        raise ValueError(NON_FINITE)
    ids = (pending[0] if len(pending) == 1 else torch.cat(pending)).view(-1).tolist()
    pending.clear()
    finite.clear()
    for tok in ids:
        context.append(tok)
        yield tok
        if tok == eos_id:
            return


class _Decoder:
    """The logits of the next token: with the cache, of the last sampled id (``last``, still on the
    device; the cache rebuilt from the last half of ``context`` when it fills up), else of the whole
    (cropped) ``context`` each time."""

    def __init__(self, model: CausalTransformer, use_cache: bool, device: torch.device) -> None:
        self.model, self.use_cache, self.device = model, use_cache, device
        self.limit = model.cfg.max_seq_len
        self.cache: KVCache | None = None

    def needs_context(self) -> bool:
        """Whether the next call reads ``context`` (every id on the host) rather than only ``last``."""
        return not self.use_cache or self.cache is None or self.cache.pos >= self.limit

    def __call__(self, context: list[int], last: torch.Tensor | None) -> torch.Tensor:
        model, limit = self.model, self.limit
        if not self.use_cache:
            return model(torch.tensor([context[-limit:]], device=self.device))[:, -1]
        if self.needs_context():
            window = context[-(limit // 2 if self.cache is not None else limit):]
            self.cache = KVCache.empty(model.cfg, 1, limit, self.device, cache_dtype(model, self.device))
            return model(torch.tensor([window], device=self.device), cache=self.cache)[:, -1]
        if last is None:
            last = torch.tensor([context[-1:]], device=self.device)
        return model(last, cache=self.cache)[:, -1]
