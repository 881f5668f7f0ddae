"""A pre-norm causal decoder, one class for this project's model and the open ones whose options
its config names: token embedding (+ fragmergent modulation), rotary or learned positions,
``scaled_dot_product_attention`` with a causal mask and grouped-query heads, a GELU or SwiGLU MLP,
LayerNorm or RMSNorm, optional biases, sequential or parallel residual, tied or untied head.

The defaults are the SAB model: LayerNorm without bias, full-head RoPE (base 10000), tanh-GELU MLP,
no biases, sequential residual; its parameters keep their names (``embed``, ``blocks.N.norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.up``, ``mlp.down``, ``norm``, ``head``,
``fragmergent.step``). An option adds parameters only when it is on: ``*.bias`` (``bias``,
``qkv_bias``, ``norm_bias``) and ``pos`` (learned positions). Matrices stay fused: ``attn.qkv``
holds rows [q; k; v] with ``n_heads``, ``n_kv_heads``, ``n_kv_heads`` heads, and a SwiGLU's
``mlp.up`` holds [gate; up] (2 x ffn rows); :meth:`CausalTransformer.muon_matrices` says how the
rows split.

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
from sab_byon_omni.model.ops import (
    CausalAttentionCpu,
    GeluLinear,
    RMSNormCpu,
    compute_dtype,
    fp32_attention_backward,
    linear,
    linear_cross_entropy,
    plain_autograd,
)

# torch >= 2.5 attends grouped heads without copying k and v (1.3x faster forward + backward than
# expanded copies on a 2-core CPU, SmolLM2-135M's 9 query and 3 key/value heads, 4 x 256 tokens)
LEVER_PARAMETERS = ("q_norm.", "k_norm.", "value_gate", "value_embed.", "skip_gains")  # what the levers add
SDPA_GQA = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 5)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotary inverse frequencies base^(-2i/d) of the ``rotary_dim`` rotated dimensions, with
    ``rope_scaling`` applied (linear: all divided by the factor; llama3: Llama 3.1's long-context
    rule, low frequencies divided, high ones kept, a smooth blend between)."""
    d = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        factor, old = cfg.rope_scaling_factor, cfg.rope_original_max_len
        low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv


def rope_tables(head_dim: int, max_len: int, base: float = 10000.0,
                inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) tables of shape (max_len, head_dim) for :func:`apply_rope`; the sine's first
    half is negated once here rather than at every call. ``inv``: the inverse frequencies (default:
    base^(-2i/head_dim))."""
    if inv is None:
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (T, D/2)
    return torch.cat([ang, ang], dim=-1).cos(), torch.cat([-ang.sin(), ang.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by the angles of positions given as tables from
    :func:`rope_tables`, shaped to broadcast against ``x``: (T, D) for (B, H, T, D), or (T, 1, D)
    for the model's (B, T, heads, D) q and k."""
    # x * cos + cat(-x2, x1) * sin == x * cos + roll(x) * cat(-sin1, sin2): one roll and one fused
    # multiply-add instead of slice, negate, cat, two multiplies and an add (1.36x faster forward +
    # backward on CPU, benchmarks/levers.py rope).
    return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, dims=-1), sin_signed.to(x.dtype))


@dataclass
class KVCache:
    """Pre-allocated keys and values (``n_kv_heads`` heads) for every layer; ``pos`` tokens are filled."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0
    docs: torch.Tensor | None = None  # (batch, max_len) document index of each cached token (document_mask_id)
    next_doc: torch.Tensor | None = None  # (batch,) the document index the next token starts in

    def document_ids(self, ids: torch.Tensor, separator: int) -> torch.Tensor:
        """The document index of each of ``ids`` (B, t), the tokens that follow the cached ones, and of
        every token up to them: (B, pos + t). A token's document is the number of separators before it."""
        ends = (ids == separator).long()
        new = self.next_doc[:, None] + ends.cumsum(1) - ends
        self.docs[:, self.pos:self.pos + ids.shape[1]] = new
        self.next_doc += ends.sum(1)
        return self.docs[:, :self.pos + ids.shape[1]]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> "KVCache":
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        # Uninitialised: attention only ever reads the first ``pos`` positions, which are written first.
        docs = None if cfg.document_mask_id is None else torch.zeros(batch, max_len, dtype=torch.long, device=device)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   docs=docs, next_doc=None if docs is None else torch.zeros(batch, dtype=torch.long, device=device))


def document_ids(ids: torch.Tensor, separator: int) -> torch.Tensor:
    """(B, T) document index of each token of packed windows: the number of separators before it (a
    separator belongs to the document it ends)."""
    ends = (ids == separator).long()
    return ends.cumsum(1) - ends


def document_mask(docs_q: torch.Tensor, docs_k: torch.Tensor) -> torch.Tensor:
    """(B, 1, t, S) boolean attention mask of the last t of S positions: causal and within a document."""
    t, s = docs_q.shape[1], docs_k.shape[1]
    causal = torch.ones(t, s, dtype=torch.bool, device=docs_q.device).tril(diagonal=s - t)
    return (causal & (docs_q[:, :, None] == docs_k[:, None, :]))[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
    """``scaled_dot_product_attention`` of (B, H, T, D) queries with (B, K, S, D) keys and values,
    K dividing H (query head i reads key head i // (H / K)). Short causal windows in bf16 or fp16
    on a CPU take :class:`~sab_byon_omni.model.ops.CausalAttentionCpu` (the same attention, a
    faster backward)."""
    if kw.get("is_causal") and not kw.get("dropout_p") and "attn_mask" not in kw \
            and (SDPA_GQA or k.shape[1] == q.shape[1]) and fp32_attention_backward(q, k, v):
        return CausalAttentionCpu.apply(q, k, v)
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    rep = q.shape[1] // k.shape[1]  # torch 2.4: the heads copied
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **kw)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a projection: :func:`linear` (its CPU path) for a plain ``nn.Linear``, the
    layer's own forward for another module in its place (a LoRA adapter, model/lora.py)."""
    return linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (the same parameter, the same maths) that trains on a CPU through
    :class:`~sab_byon_omni.model.ops.RMSNormCpu`: fewer passes, and its output in the dtype the
    next matmul runs in. Inference, other devices, ``torch.compile`` (which fuses the norm itself)
    and ``torch.func`` transforms take ``nn.RMSNorm``'s own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight is not None
                and (x.requires_grad or self.weight.requires_grad) and x.dtype == self.weight.dtype == torch.float32
                and not torch.compiler.is_compiling() and plain_autograd()):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return RMSNormCpu.apply(x, self.weight, eps, compute_dtype(x))
        return super().forward(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rotary_dim = cfg.rotary_dim if cfg.positions == "rope" else 0
        rows = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, rows, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.copy_v = False  # memory saving (see CausalTransformer.set_memory_saving)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        # value_embed: the values get value_gate x the model's second embedding of the same tokens
        self.value_gate = nn.Parameter(torch.ones(1)) if cfg.value_embed else None

    def rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q and k (B, T, heads, D) rotated together in memory order: 2.1x faster forward + backward
        than one by one as (B, H, T, D) views (benchmarks/levers.py rope), the same numbers."""
        cos, sin = cos[:, None], sin[:, None]
        if self.rotary_dim == self.head_dim:
            return apply_rope(qk, cos, sin)
        turned, kept = qk.split((self.rotary_dim, self.head_dim - self.rotary_dim), dim=-1)
        return torch.cat([apply_rope(turned, cos, sin), kept], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: a boolean (B, 1, t, S) mask that replaces the causal one (document masking);
        ``ve``: the value embedding of the tokens (B, t, n_kv_heads x head_dim) when it is on."""
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv_heads
        qkv = project(self.qkv, x).view(b, t, h + 2 * kv, self.head_dim)
        qk, v = qkv.split((h + kv, kv), dim=2)
        if self.q_norm is not None:
            q, k = qk.float().split((h, kv), dim=2)  # in fp32 like the block norms (bf16 input, fp32 weight:
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2).to(v.dtype)  # torch's unfused path and a warning)
        if ve is not None:
            v = v + self.value_gate.to(v.dtype) * ve.view(b, t, kv, self.head_dim).to(v.dtype)
        if self.rotary_dim:
            qk = self.rotate(qk, cos, sin)
        q, k = qk.transpose(1, 2).split((h, kv), dim=1)
        v = v.transpose(1, 2)
        if cache is None:
            if self.copy_v and torch.is_grad_enabled():
                v = v.contiguous()  # else v, a view, keeps the whole qkv output alive for backward
            drop = self.dropout if self.training else 0.0
            y = attend(q, k, v, is_causal=True, dropout_p=drop) if mask is None else \
                attend(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            start = cache.pos
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k_all, v_all = cache.k[layer][:, :, :start + t], cache.v[layer][:, :, :start + t]
            if mask is not None:
                y = attend(q, k_all, v_all, attn_mask=mask)
            elif t == 1:
                y = attend(q, k_all, v_all)
            elif start == 0:  # the prompt: plain causal attention (the flash kernels, no mask built)
                y = attend(q, k_all, v_all, is_causal=True)
            else:  # a chunk after a prefix: query i sees keys 0 .. start + i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = attend(q, k_all, v_all, attn_mask=mask)
        return project(self.proj, y.transpose(1, 2).reshape(b, t, h * self.head_dim))


class MLP(nn.Module):
    """down(gelu(up x)), the GELU tanh-approximated or exact (``gelu_approximate``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = cfg.gelu_approximate
        self.recompute_gelu = False  # memory saving (see CausalTransformer.set_memory_saving)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = project(self.up, x)
        if self.recompute_gelu and torch.is_grad_enabled():
            return self.dropout(GeluLinear.apply(u, self.down.weight, self.down.bias, self.approximate))
        return self.dropout(project(self.down, F.gelu(u, approximate=self.approximate)))


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), gate and up fused in ``up`` (rows [gate; up])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden, 2 * cfg.ffn, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.recompute_gelu = False  # no GELU to recompute: memory saving leaves this MLP as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self.up, x).chunk(2, dim=-1)
        return self.dropout(project(self.down, F.silu(gate) * up))


class ReLU2(nn.Module):
    """down(relu(up x)^2) (Primer's squared ReLU, modded-nanogpt's MLP)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.recompute_gelu = False  # no GELU to recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(linear(F.relu(linear(x, self.up.weight, self.up.bias)).square(), self.down.weight,
                                   self.down.bias))


MLPS: dict[str, type[nn.Module]] = {"gelu": MLP, "swiglu": SwiGLU, "relu2": ReLU2}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.parallel = layer, cfg.parallel_residual
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), cos, sin, cache, self.layer, mask, ve)
        if self.parallel:  # GPT-NeoX: both branches read the block's input
            return x + a + self.mlp(self.norm2(x))
        x = x + a
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
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden)
        self.fragmergent = Fragmergent(cfg.fragmergent_mode, cfg.fragmergent_t, cfg.fragmergent_alpha,
                                       cfg.fragmergent_lambda, cfg.fragmergent_omega, cfg.fragmergent_strength)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        if cfg.value_embed:
            self.value_embed = nn.Embedding(cfg.vocab_size, cfg.kv_heads * cfg.head_dim)
        if cfg.unet_skips:  # one gain per skip, first block output -> last block input
            self.skip_gains = nn.Parameter(torch.ones(cfg.n_layers // 2))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if cfg.positions == "rope":
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.rotary_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.rotary_dim), persistent=False)
        if not self.embed.weight.is_meta:
            self.reset_parameters()
            self.reset_buffers()

    def init_plan(self) -> Iterator[tuple[int, nn.Parameter, float | None]]:
        """(index, parameter, std) of every parameter in a fixed order: N(0, 0.02) for matrices,
        0.02 / sqrt(2 n_layers) for the residual projections (zeros with ``zero_init_proj``), ones
        for the norm gains and the levers' gains (std None), zeros for biases (std 0)."""
        resid_std = 0.0 if self.cfg.zero_init_proj else 0.02 / math.sqrt(2 * self.cfg.n_layers)
        # the levers' parameters come last, so switching one on leaves every other initial weight as it was
        named = sorted(self.named_parameters(), key=lambda item: any(k in item[0] for k in LEVER_PARAMETERS))
        for index, (name, p) in enumerate(named):
            if name.endswith(".bias"):
                std = 0.0
            else:
                std = None if p.dim() < 2 else resid_std if name.endswith(("proj.weight", "down.weight")) else 0.02
            yield index, p, std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for index, p, std in self.init_plan():
            init_rows(p, p.shape, self.init_seed, index, std)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The RoPE tables and the fragmergent step of a new model (after ``to_empty``, say)."""
        if self.cfg.positions == "rope":
            with torch.device("cpu"):  # the same tables whatever device context the model is built in
                cos, sin = rope_tables(self.cfg.rotary_dim, self.cfg.max_seq_len, inv=rope_frequencies(self.cfg))
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        self.on_step(0)

    def on_step(self, step: int) -> None:
        """Tell the model which optimizer step comes next (the trainer calls it after every step and
        on resume): the fragmergent modulation in ``step`` mode follows it."""
        self.fragmergent.set_step(step)

    def set_memory_saving(self, on: bool) -> None:
        """Trade training speed for activation memory, with the same math (gradients equal bit for
        bit in fp32, tested): a GELU MLP recomputes its GELU in backward instead of keeping it, and
        attention copies ``v`` out of the qkv output so that the rest of it is freed. Per block and
        token that keeps 12 instead of 18 hidden-size activations for backward (the SAB shape), for
        an extra GELU and a copy. Off by default; the training memory plan switches it on only when
        a run would not fit without it (``train.memory_saving``)."""
        for block in self.blocks:
            block.attn.copy_v = on
            block.mlp.recompute_gelu = on and isinstance(block.mlp, MLP) and type(block.mlp.down) is nn.Linear

    def muon_matrices(self) -> list[tuple[nn.Parameter, int | list[int]]]:
        """Every 2-D hidden matrix (the blocks' projections; not the embedding, positions or head)
        with the row blocks it is made of, which Muon orthogonalises one by one: their number when
        they are equal, else their sizes. qkv is [q, k, v] (3, or unequal sizes with grouped-query
        attention), a SwiGLU's up is [gate; up] (2), every other matrix is one block."""
        cfg = self.cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        out: list[tuple[nn.Parameter, int | list[int]]] = []
        for block in self.blocks:
            for p in (block.attn.qkv.weight, block.attn.proj.weight, block.mlp.up.weight, block.mlp.down.weight):
                rows = ([q, kv, kv] if p is block.attn.qkv.weight
                        else [cfg.ffn, cfg.ffn] if p is block.mlp.up.weight and cfg.mlp == "swiglu" else [p.shape[0]])
                out.append((p, len(rows) if len(set(rows)) == 1 else rows))
        return out

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, vocab); with ``targets`` (B, T; -100 where none) instead the summed
        cross-entropy of the logits against them in fp32, computed by the head without keeping the
        logits (:func:`~sab_byon_omni.model.ops.linear_cross_entropy`). The loss is the caller's
        choice (``sab_byon_omni.loss``); it is taken here so that the head's weight is at hand
        wherever it is sharded (FSDP gathers it for this forward)."""
        t = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.fragmergent(self.embed(input_ids))
        cos = sin = None
        if self.cfg.positions == "rope":
            cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        else:
            x = x + self.pos.weight[start:start + t]
        x = self.drop(x)
        x = self.run_blocks(x, cos, sin, cache, self.attention_mask(input_ids, cache),
                            self.value_embed(input_ids) if self.cfg.value_embed else None)
        if cache is not None:
            cache.pos += t
        if targets is not None:
            return linear_cross_entropy(self.norm(x), self.head.weight, targets, self.cfg.logit_softcap or 0.0)
        logits = linear(self.norm(x), self.head.weight)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def attention_mask(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """With ``document_mask_id``: the (B, 1, t, S) mask of causal attention within documents, else None."""
        sep = self.cfg.document_mask_id
        if sep is None:
            return None
        docs_k = document_ids(input_ids, sep) if cache is None else cache.document_ids(input_ids, sep)
        return document_mask(docs_k[:, -input_ids.shape[1]:], docs_k)

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                   cache: KVCache | None, mask: torch.Tensor | None, ve: torch.Tensor | None) -> torch.Tensor:
        """The blocks in order; with ``unet_skips`` the output of block i (i < n/2) is added, times its
        gain, to the input of block n - 1 - i."""
        n = len(self.blocks)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if self.cfg.unet_skips and i >= n - n // 2 and skips:
                x = x + self.skip_gains[i - (n - n // 2)].to(x.dtype) * skips.pop()
            x = block(x, cos, sin, cache, mask, ve)
            if self.cfg.unet_skips and i < n // 2:
                skips.append(x)
        return x
