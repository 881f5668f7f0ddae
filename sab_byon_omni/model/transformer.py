"""A pre-norm causal decoder: token embedding (+ fragmergent modulation), rotary positions,
``scaled_dot_product_attention`` with a causal mask, GELU MLP, tied output head.

No training code lives here: precision, parallelism, activation checkpointing and the loss are
applied from outside (see ``sab_byon_omni.training``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.model.fragmergent import Fragmergent
from sab_byon_omni.model.init import init_rows
from sab_byon_omni.model.ops import GeluLinear, linear


def rope_tables(head_dim: int, max_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) tables of shape (max_len, head_dim) for :func:`apply_rope`; the sine's first
    half is negated once here rather than at every call."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (T, D/2)
    return torch.cat([ang, ang], dim=-1).cos(), torch.cat([-ang.sin(), ang.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by the angles of positions given as tables from
    :func:`rope_tables`, shaped to broadcast against ``x``: (T, D) for (B, H, T, D), or (T, 1, 1, D)
    for the model's (B, T, 2, H, D) q and k."""
    # x * cos + cat(-x2, x1) * sin == x * cos + roll(x) * cat(-sin1, sin2): one roll and one fused
    # multiply-add instead of slice, negate, cat, two multiplies and an add (1.36x faster forward +
    # backward on CPU, benchmarks/levers.py rope).
    return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, dims=-1), sin_signed.to(x.dtype))


@dataclass
class KVCache:
    """Pre-allocated keys and values for every layer; ``pos`` tokens are filled."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> "KVCache":
        shape = (batch, cfg.n_heads, max_len, cfg.head_dim)
        # Uninitialised: attention only ever reads the first ``pos`` positions, which are written first.
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.dropout = cfg.dropout
        self.copy_v = False  # memory saving (see CausalTransformer.set_memory_saving)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        qk, v = linear(x, self.qkv.weight).view(b, t, 3, self.n_heads, self.head_dim).split((2, 1), dim=2)
        # q and k rotated together in memory order, then viewed as (B, H, T, D): 2.1x faster forward +
        # backward than one by one as (B, H, T, D) views (benchmarks/levers.py rope), the same numbers
        q, k = apply_rope(qk, cos[:, None, None], sin[:, None, None]).permute(2, 0, 3, 1, 4).unbind(0)
        v = v.squeeze(2).transpose(1, 2)
        if cache is None:
            if self.copy_v and torch.is_grad_enabled():
                v = v.contiguous()  # else v, a view, keeps the whole qkv output alive for backward
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            start = cache.pos
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k_all, v_all = cache.k[layer][:, :, :start + t], cache.v[layer][:, :, :start + t]
            if t == 1:
                y = F.scaled_dot_product_attention(q, k_all, v_all)
            elif start == 0:  # the prompt: plain causal attention (the flash kernels, no mask built)
                y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
            else:  # a chunk after a prefix: query i sees keys 0 .. start + i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return linear(y.transpose(1, 2).reshape(b, t, c), self.proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.recompute_gelu = False  # memory saving (see CausalTransformer.set_memory_saving)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = linear(x, self.up.weight)
        if self.recompute_gelu and torch.is_grad_enabled():
            return self.dropout(GeluLinear.apply(u, self.down.weight))
        return self.dropout(linear(F.gelu(u, approximate="tanh"), self.down.weight))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm1 = nn.LayerNorm(cfg.hidden, bias=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cache, self.layer)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """ids (B, T) int64 -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        # Drawn first from torch's global generator: the initial weights follow from it alone (see
        # model/init.py), so a model built on the meta device and initialised later (FSDP) equals this one.
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.fragmergent = Fragmergent(cfg.fragmergent_mode, cfg.fragmergent_t, cfg.fragmergent_alpha,
                                       cfg.fragmergent_lambda, cfg.fragmergent_omega, cfg.fragmergent_strength)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.hidden, bias=False)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        if not self.embed.weight.is_meta:
            self.reset_parameters()
            self.reset_buffers()

    def init_plan(self) -> Iterator[tuple[int, nn.Parameter, float | None]]:
        """(index, parameter, std) of every parameter in a fixed order: N(0, 0.02) for matrices,
        0.02 / sqrt(2 n_layers) for the residual projections, ones for the norm gains (std None)."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for index, (name, p) in enumerate(self.named_parameters()):
            std = None if p.dim() < 2 else resid_std if name.endswith(("proj.weight", "down.weight")) else 0.02
            yield index, p, std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for index, p, std in self.init_plan():
            init_rows(p, p.shape, self.init_seed, index, std)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The RoPE tables and the fragmergent step of a new model (after ``to_empty``, say)."""
        with torch.device("cpu"):  # the same tables whatever device context the model is built in
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.on_step(0)

    def on_step(self, step: int) -> None:
        """Tell the model which optimizer step comes next (the trainer calls it after every step and
        on resume): the fragmergent modulation in ``step`` mode follows it."""
        self.fragmergent.set_step(step)

    def set_memory_saving(self, on: bool) -> None:
        """Trade training speed for activation memory, with the same math (gradients equal bit for
        bit in fp32, tested): the MLP recomputes its GELU in backward instead of keeping it, and
        attention copies ``v`` out of the qkv output so that the rest of it is freed. Per block and
        token that keeps 12 instead of 18 hidden-size activations for backward, for an extra GELU
        and a copy. Off by default; the training memory plan switches it on only when a run would
        not fit without it (``train.memory_saving``)."""
        for block in self.blocks:
            block.attn.copy_v = block.mlp.recompute_gelu = on

    def muon_matrices(self) -> list[tuple[nn.Parameter, int]]:
        """The hidden weight matrices an optimizer such as Muon may update as matrices (every
        block's 2-D weights; not the embedding, the head or the norms), each with the number of equal
        row blocks it is made of: 3 for the fused qkv (q, k and v), 1 for the others."""
        return [(p, 3 if p is block.attn.qkv.weight else 1)
                for block in self.blocks for p in block.parameters() if p.dim() == 2]

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.drop(self.fragmergent(self.embed(input_ids)))
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += t
        return linear(self.norm(x), self.head.weight)
