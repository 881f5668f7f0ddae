"""``bench --mode generate``: greedy decoding with the KV cache, batch 1, against HF ``generate``.

Decoding is bound by memory bandwidth: each new token reads every weight once (plus the cache),
so the figure of merit is MBU, the bytes read per second over the read bandwidth measured in the
same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sab_byon_omni.benchmark.common import BenchOptions, interleave, random_batch, timed
from sab_byon_omni.benchmark.peers import build_hf_peer
from sab_byon_omni.benchmark.results import GenerateBench, Machine
from sab_byon_omni.config import replace
from sab_byon_omni.device import DTYPES, intra_op_threads, make_precision, resolve_device
from sab_byon_omni.errors import SabError
from sab_byon_omni.machine import measure_read_bandwidth
from sab_byon_omni.model.generate import generate_tokens
from sab_byon_omni.model.transformer import CausalTransformer


def decode_bytes_per_token(model: nn.Module, context: float, dtype: torch.dtype | None = None) -> float:
    """Bytes one decoding step reads: every parameter once, plus keys and values of ``context``
    cached positions in every layer, in ``dtype`` (default: the parameters'). Under autocast that
    is the compute dtype: autocast casts each weight once per generation and reads the cached
    copy for every token after, and the cache is allocated in that dtype."""
    cfg = model.cfg
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    return weights + 2 * cfg.n_layers * context * cfg.kv_heads * cfg.head_dim * size


def run_generate_bench(opts: BenchOptions, prompt_len: int = 64, new_tokens: int = 128) -> GenerateBench:
    """Greedy generation of ``new_tokens`` after a random prompt, batch 1, with the KV cache; the
    peer is HF ``generate`` (its default dynamic cache) on the ``hf`` peer (benchmark/peers.py)."""
    if prompt_len < 1 or new_tokens < 1:
        raise SabError("--prompt-len and --new-tokens must be at least 1")
    m = opts.run.model
    if prompt_len + new_tokens > m.max_seq_len:
        raise SabError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the {m.preset} "
                       f"preset's max_seq_len={m.max_seq_len}")
    cfg = replace(opts.run, seq_len=max(prompt_len + new_tokens, 2))
    with intra_op_threads(opts.threads):
        device = resolve_device(cfg.train.device)
        precision = make_precision(cfg.train.precision, device)
        torch.manual_seed(cfg.train.seed)
        with torch.device(device):
            ours = CausalTransformer(cfg.model).eval()
        prompt = random_batch(1, prompt_len, m.vocab_size, cfg.train.seed).input_ids.to(device)

        def run_ours() -> None:
            with precision.autocast():
                n = sum(1 for _ in generate_tokens(ours, prompt[0].tolist(), max_new_tokens=new_tokens, temperature=0))
            assert n == new_tokens

        runners: dict[str, Callable[[], Any]] = {"ours": run_ours}
        if "hf" in opts.compare:
            runners["hf"] = _hf_runner(cfg.model, cfg.train.seed, device, precision, prompt, new_tokens)
        for _ in range(opts.warmup):
            for fn in runners.values():
                timed(fn, device)
        times = interleave(runners, opts.steps, device)
        bandwidth = measure_read_bandwidth(device)
        compute = DTYPES[precision.name] if precision.name != "fp32" else None
        bytes_tok = decode_bytes_per_token(ours, prompt_len + new_tokens / 2, compute)

        def rates(seconds: float) -> tuple[float, float, float]:
            tps = new_tokens / seconds  # prefill time included: a lower bound
            return tps, tps * bytes_tok / 1e9, tps * bytes_tok / bandwidth

        seconds = statistics.median(times["ours"])
        result = GenerateBench(m.preset, ours.num_parameters(), m.vocab_size, prompt_len, new_tokens, 1,
                               precision.name, opts.steps, opts.warmup, Machine.of(device), bytes_tok,
                               bandwidth / 1e9, seconds, *rates(seconds))
        if "hf" in times:
            result.hf_seconds = statistics.median(times["hf"])
            result.hf_tokens_per_s, result.hf_gbs, result.hf_mbu = rates(result.hf_seconds)
        return result


def _hf_runner(m: Any, seed: int, device: torch.device, precision: Any, prompt: torch.Tensor,
               new_tokens: int) -> Any:
    with torch.device(device):
        hf = build_hf_peer(m, seed).to(device).eval()
    hf.generation_config.pad_token_id = 0

    @torch.no_grad()
    def run_hf() -> None:
        with precision.autocast():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        assert out.shape[1] == prompt.shape[1] + new_tokens

    return run_hf
