"""Hugging Face ``transformers`` folders, both ways: one place to call.

* :func:`save_hf` (``export --format hf``): the model in its own architecture: a Llama-family
  model as ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``, GPT-2 as
  ``GPT2LMHeadModel``, GPT-NeoX as ``GPTNeoXForCausalLM``, and this project's SAB model as a stock
  GPT-NeoX with the same logits (:mod:`~sab_byon_omni.interop.hf_export`, ``hf_neox``);
* :func:`load_hf`: a transformers folder of those families (safetensors, no code run) as our
  config, tokenizer and state dict (:mod:`~sab_byon_omni.interop.hf_import`);
* :func:`to_hf_parts` / :func:`from_hf_parts`: the same in memory (config, tensors by transformers
  name, tokenizer.json, tokenizer config), for readers and writers of other containers (GGUF).

The family tables (config fields and tensor names) are in :mod:`~sab_byon_omni.interop.hf_families`;
docs/HF_EXPORT.md says what is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sab_byon_omni.config import RunConfig
from sab_byon_omni.data.tokenizers import Tokenizer
from sab_byon_omni.interop.hf_export import save_hf, to_hf_parts
from sab_byon_omni.interop.hf_import import from_hf_parts, read_hf_folder

__all__ = ["from_hf_parts", "load_hf", "read_hf_folder", "save_hf", "to_hf_parts"]


def load_hf(directory: str | Path) -> tuple[RunConfig, Tokenizer, dict[str, torch.Tensor]]:
    """A transformers folder as (run config, tokenizer, state dict) that
    ``CausalTransformer(cfg.model).load_state_dict`` takes strictly. Anything that would not give
    the same logits is refused with a SabError naming it."""
    w = read_hf_folder(directory)
    return w.config, w.tokenizer, w.state_dict
