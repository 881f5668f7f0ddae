"""Our SAB model as a stock GPT-NeoX (``export --format hf`` of family ``sab``), and back.

A SAB model is exported as a ``GPTNeoXForCausalLM`` that computes the same logits:

* ``use_parallel_residual=False``: x + attn(ln1(x)), then + mlp(ln2(.)), our pre-norm block;
* ``partial_rotary_factor=1`` (rotary over the whole head), ``rope_theta=10000``: NeoX rotates
  halves (``rotate_half``) with the same inverse frequencies as ours;
* ``hidden_act="gelu_pytorch_tanh"``: the same ``F.gelu(approximate="tanh")`` call as ours;
* zero biases: NeoX's LayerNorms and MLP always have biases, and the attention ones are written
  too (``attention_bias=True``) because GPT-NeoX readers other than transformers 5 (older
  transformers, llama.cpp's converter) expect every bias;
* ``query_key_value`` rows reordered: ours are [q; k; v] with each head contiguous inside, NeoX
  reads them per head as [q_h; k_h; v_h];
* the fragmergent factor ``s`` folded into ``embed_in`` (NeoX has no such factor): ``embed_in`` is
  our embedding passed through the model's own fragmergent module, so it is the very product our
  forward computes. The head is the unscaled matrix, stored as ``embed_out``
  (``tie_word_embeddings=False``) even when the two are equal, so every export has one layout.

``clock`` mode is refused: its factor follows wall time, so no fixed weights represent it. A
GPT-NeoX folder of exactly this shape, with one of our tokenizers and zero biases, imports back as
a SAB model (:func:`as_sab`); any other GPT-NeoX imports as family ``gpt_neox``. See docs/HF_EXPORT.md.
"""

from __future__ import annotations

from typing import Any

import torch

from sab_byon_omni.data.tokenizers import Tokenizer
from sab_byon_omni.errors import SabError
from sab_byon_omni.interop.hf_tokenizer import tokenizer_from_json
from sab_byon_omni.model.transformer import CausalTransformer

# the GPT-NeoX settings under which it computes our SAB block (hf_families.model_fields' names)
SAB_SHAPE = {"norm_eps": 1e-5, "gelu_approximate": "tanh", "parallel_residual": False, "rope_base": 10000.0,
             "rope_fraction": 1.0, "rope_scaling": "none"}


def qkv_to_neox(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows [q; k; v] (each head contiguous) -> rows [q_0; k_0; v_0; q_1; ...] (NeoX's per-head view);
    a bias (one dimension) alike."""
    m = w.reshape(w.shape[0], -1)
    return m.reshape(3, n_heads, -1, m.shape[-1]).transpose(0, 1).reshape(w.shape)


def qkv_from_neox(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    m = w.reshape(w.shape[0], -1)
    return m.reshape(n_heads, 3, -1, m.shape[-1]).transpose(0, 1).reshape(w.shape)


def as_sab(fields: dict[str, Any], state: dict[str, torch.Tensor], tokenizer_json: str, conf: dict[str, Any],
           source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Tokenizer] | None:
    """A GPT-NeoX import as the SAB model it was exported from: our block's settings, every bias
    zero, one of our tokenizers. Then (model fields, state dict without biases, tokenizer), the head
    tied again when it equals the embedding; else None (it imports as family gpt_neox)."""
    if any(fields.get(k) != v for k, v in SAB_SHAPE.items()):
        return None
    if any(torch.count_nonzero(t) for k, t in state.items() if k.endswith(".bias")):
        return None
    try:
        tokenizer = tokenizer_from_json(tokenizer_json, source)
    except SabError:
        return None
    state = {k: t for k, t in state.items() if not k.endswith(".bias")}
    tied = torch.equal(state["head.weight"], state["embed.weight"])
    if tied:
        state["head.weight"] = state["embed.weight"]  # a tied model lists it under both names
    sab = {k: v for k, v in fields.items() if k not in ("family", "norm_bias", "bias", *SAB_SHAPE)}
    return {**sab, "tie_embeddings": tied, "dropout": conf.get("hidden_dropout") or 0.0}, state, tokenizer


def model_card(model: CausalTransformer, tokenizer: Tokenizer) -> str:
    cfg, s = model.cfg, model.fragmergent.scale()
    scale = f"{float(s):.9g}" if cfg.fragmergent_mode != "off" else "1 (mode off)"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- gpt_neox
- sab-byon-omni
---

# sab-byon-omni model ({cfg.preset} preset), as GPT-NeoX

A causal decoder trained with sab-byon-omni, exported as a stock
`GPTNeoXForCausalLM` that computes the same logits (hidden {cfg.hidden}, {cfg.n_layers} layers,
{cfg.n_heads} heads, FFN {cfg.ffn}, vocabulary {cfg.vocab_size}, context {cfg.max_seq_len}).
No `trust_remote_code` is needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("<this folder or repo>")
model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")
ids = tok("Consciousness is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=40, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
```

- Tokenizer: `{tokenizer.name}` (pad `<PAD>` = 0{", eos `<EOS>` = 1" if tokenizer.eos_id is not None else ""};
  no BOS). Decode with `skip_special_tokens=True` to get the text sab-byon-omni returns.
- The fragmergent embedding factor (mode `{cfg.fragmergent_mode}`, s = {scale}) is folded into
  `embed_in`; the output head (`embed_out`) is the unscaled matrix, stored separately.
- Every bias is zero (the original has none).
- Context: at most {cfg.max_seq_len} tokens; sab-byon-omni slides its window past that,
  `generate` here does not.

Import back with `sab_byon_omni.interop.hf.load_hf("<folder>")`.
"""
