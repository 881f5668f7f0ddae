"""The models ours is timed against, built with our dimensions in the same process:

* ``hf``: Hugging Face ``transformers``, trained the way the HF ``Trainer`` does by default (mean
  loss, ``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)``): for the SAB model a GPT-2 from a
  local ``GPT2Config`` of the same dimensions; for a model of an open family (``model.family``
  llama, qwen2...) that family's own class (``LlamaForCausalLM``...) holding the very weights ours
  starts from (:func:`~sab_byon_omni.interop.hf.to_hf_parts`). Both with ``use_cache=False``: a
  training step has no use for the key/value cache a Llama config would build by default (and it
  makes a compiled layer recompile for every layer index);
* ``minimal``: a plain GPT written from its textbook definition (:mod:`.minimal_gpt`), trained the
  textbook way (mean loss, ``clip_grad_norm_``, ``torch.optim.AdamW(foreach=True)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sab_byon_omni.benchmark.common import PeerStep, compile_layers
from sab_byon_omni.benchmark.minimal_gpt import MinimalStep
from sab_byon_omni.config import ModelConfig, RunConfig
from sab_byon_omni.data.tokenizers import Char96Tokenizer
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


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SabError("--compare hf needs Hugging Face transformers: pip install 'sab-byon-omni[bench]'") from None
    transformers.utils.logging.set_verbosity_error()
    return transformers


def build_hf_gpt2(cfg: ModelConfig) -> nn.Module:
    return _transformers().GPT2LMHeadModel._from_config(hf_gpt2_config(cfg), attn_implementation="sdpa")


def build_hf_family(cfg: ModelConfig, seed: int) -> nn.Module:
    """The transformers model of ``cfg.family`` with the weights ``CausalTransformer(cfg)`` starts
    from after ``torch.manual_seed(seed)`` (the same init as ours in the benchmark)."""
    from sab_byon_omni.interop.hf import to_hf_parts
    from sab_byon_omni.model.transformer import CausalTransformer

    transformers = _transformers()
    torch.manual_seed(seed)
    ours = CausalTransformer(cfg)
    try:
        config, tensors, _, _ = to_hf_parts(ours, Char96Tokenizer())
    except SabError as e:  # the export's advice ("export it with...") does not fit a benchmark
        raise SabError(f"--compare hf with --model.family {cfg.family}: {str(e).split('; ')[0]}: give the --model.* "
                       "options of that architecture (bench --help shows SmolLM2's)") from None
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **{**config, "use_cache": False})
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if k not in ("lm_head.weight",)]:  # a tied head is the embedding
        raise SabError(f"--compare hf: the {model_type} peer does not take our weights: {(missing + unexpected)[:3]}")
    return hf


def build_hf_peer(cfg: ModelConfig, seed: int) -> nn.Module:
    """The ``hf`` peer for ``cfg``: GPT-2 of the same dimensions (SAB), else its family's class."""
    return build_hf_gpt2(cfg) if cfg.family == "sab" else build_hf_family(cfg, seed)


def hf_peer_name(cfg: ModelConfig) -> str:
    from sab_byon_omni.interop.hf_families import ARCHITECTURES

    return "HF GPT-2" if cfg.family == "sab" else f"HF {ARCHITECTURES[cfg.family]} with our weights"


class HFStep(PeerStep):
    """One step of the HF peer the way the HF Trainer runs it by default."""

    def __init__(self, cfg: RunConfig, batch: Batch, precision: Precision) -> None:
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        with torch.device(precision.device):  # initialised there: a 1B GPT-2 builds in seconds on a GPU
            self.model = build_hf_peer(cfg.model, cfg.train.seed).to(precision.device).train()
        if t.compile:  # as train.compile compiles ours: each layer
            compile_layers(self.model)
        fused = precision.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                           weight_decay=t.weight_decay, fused=fused or None)
        self.scaler = precision.scaler()
        self.precision, self.max_norm = precision, t.max_grad_norm
        self.batch = batch.to(precision.device)

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.batch.input_ids, labels=self.batch.labels).loss


PEER_STEPS = {"hf": HFStep, "minimal": MinimalStep}
