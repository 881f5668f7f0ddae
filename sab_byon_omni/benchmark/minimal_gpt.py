"""A plain GPT, written from its textbook definition (nanoGPT's ``model.py``), for ``sab-omni bench
--compare minimal``: the baseline a reader would write in an afternoon, with no tricks.

Learned positions, pre-norm blocks with LayerNorm (weight and bias), causal
``F.scaled_dot_product_attention(is_causal=True)``, an MLP with the exact ``nn.GELU()``, biases on
every linear (as nanoGPT's default ``bias=True``), a weight-tied head, the mean cross-entropy over
the shifted targets, ``torch.optim.AdamW(foreach=True)`` with decay on matrices only, and
``clip_grad_norm_``. It has this package's dimensions: the same weight matrices as
:class:`~sab_byon_omni.model.transformer.CausalTransformer` (``tests/test_bench.py`` checks it),
plus biases and the position table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sab_byon_omni.benchmark.common import PeerStep, compile_layers
from sab_byon_omni.config import ModelConfig, RunConfig
from sab_byon_omni.data.batching import IGNORE_INDEX, Batch
from sab_byon_omni.device import Precision


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_heads, cfg.hidden, cfg.dropout
        self.c_attn = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.c_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden, cfg.ffn)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(cfg.ffn, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MinimalGPT(nn.Module):
    """ids (B, T) -> logits (B, T, vocab); with ``targets``, also the mean cross-entropy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return logits, loss


class MinimalStep(PeerStep):
    """One training step of :class:`MinimalGPT` the textbook way: mean loss, backward, clip, foreach
    AdamW (decay on matrices, none on biases and norms), zero the gradients."""

    def __init__(self, cfg: RunConfig, batch: Batch, precision: Precision) -> None:
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        self.model = MinimalGPT(cfg.model).to(precision.device).train()
        if t.compile:
            compile_layers(self.model)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": other, "weight_decay": 0.0}],
                                           lr=t.learning_rate, betas=(t.beta1, t.beta2), foreach=True)
        self.scaler = precision.scaler()
        self.precision, self.max_norm = precision, t.max_grad_norm
        self.batch = batch.to(precision.device)

    def loss(self) -> torch.Tensor:
        return self.model(self.batch.input_ids, self.batch.labels)[1]
