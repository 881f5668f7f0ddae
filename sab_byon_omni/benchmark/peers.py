"""The models ours is timed against, built with our dimensions in the same process:

* ``hf``: Hugging Face ``transformers`` GPT-2 from a local ``GPT2Config``, trained the way the HF
  ``Trainer`` does by default (mean loss, ``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)``);
* ``minimal``: a plain GPT written from its textbook definition (:mod:`.minimal_gpt`), trained the
  textbook way (mean loss, ``clip_grad_norm_``, ``torch.optim.AdamW(foreach=True)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sab_byon_omni.benchmark.common import PeerStep
from sab_byon_omni.benchmark.minimal_gpt import MinimalStep
from sab_byon_omni.config import ModelConfig, RunConfig
from sab_byon_omni.data.batching import Batch
from sab_byon_omni.device import Precision
from sab_byon_omni.errors import SabError


def hf_gpt2_config(cfg: ModelConfig) -> Any:
    """A GPT-2 config with this model's dimensions (built locally; nothing is downloaded)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.hidden,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn, activation_function="gelu_new",
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      use_cache=False)


def build_hf_gpt2(cfg: ModelConfig) -> nn.Module:
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise SabError("--compare hf needs Hugging Face transformers: pip install 'sab-byon-omni[bench]'") from None
    transformers.utils.logging.set_verbosity_error()
    return GPT2LMHeadModel._from_config(hf_gpt2_config(cfg), attn_implementation="sdpa")


class HFStep(PeerStep):
    """One step of HF GPT-2 the way the HF Trainer runs it by default."""

    def __init__(self, cfg: RunConfig, batch: Batch, precision: Precision) -> None:
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        with torch.device(precision.device):  # initialised there: a 1B GPT-2 builds in seconds on a GPU
            self.model = build_hf_gpt2(cfg.model).to(precision.device).train()
        fused = precision.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                           weight_decay=t.weight_decay, fused=fused or None)
        self.scaler = precision.scaler()
        self.precision, self.max_norm = precision, t.max_grad_norm
        self.batch = batch.to(precision.device)

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.batch.input_ids, labels=self.batch.labels).loss


PEER_STEPS = {"hf": HFStep, "minimal": MinimalStep}
