"""Export to Hugging Face ``transformers`` as a stock GPT-NeoX folder, and import such a folder back.

``save_hf(model, tokenizer, DIR)`` writes ``config.json``, ``model.safetensors``,
``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``),
``generation_config.json`` and a ``README.md`` model card. ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it offline, without this package and without
``trust_remote_code``: it is a ``GPTNeoXForCausalLM`` with

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

``clock`` mode is refused: its factor follows wall time, so no fixed weights represent it.
``load_hf(DIR)`` reads such a folder (or any GPT-NeoX checkpoint of this shape) back to our
config, tokenizer and state dict. See docs/HF_EXPORT.md.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.config import PRESETS, ModelConfig, RunConfig, build_config
from sab_byon_omni.data.tokenizers import Tokenizer
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.atomic import atomic_directory
from sab_byon_omni.files.checkpoint import check_tensors
from sab_byon_omni.files.untrusted import read_json
from sab_byon_omni.interop.hf_tokenizer import TOKENIZER_JSON, hf_tokenizer_files, tokenizer_from_json
from sab_byon_omni.model.transformer import CausalTransformer

log = logging.getLogger(__name__)

ARCHITECTURE = "GPTNeoXForCausalLM"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ROPE_THETA = 10000.0  # model.transformer.rope_tables' base
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the model uses
HIDDEN_ACT = "gelu_pytorch_tanh"
TANH_GELUS = (HIDDEN_ACT, "gelu_new")  # the same function; gelu_new differs by float rounding only
# per layer: (ours under blocks.{i}., NeoX under gpt_neox.layers.{i}.); qkv is reordered separately
LAYER_NAMES = [("norm1.weight", "input_layernorm.weight"), ("norm2.weight", "post_attention_layernorm.weight"),
               ("attn.proj.weight", "attention.dense.weight"), ("mlp.up.weight", "mlp.dense_h_to_4h.weight"),
               ("mlp.down.weight", "mlp.dense_4h_to_h.weight")]
ZERO_BIASES = ["input_layernorm.bias", "post_attention_layernorm.bias", "attention.query_key_value.bias",
               "attention.dense.bias", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias"]
# buffers that old GPT-NeoX checkpoints carry (causal masks, rotary tables): not weights
IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
_SHARD = re.compile(r"^[\w.-]{1,200}\.safetensors$")  # a shard named by an index: a plain file of the folder


# ------------------------------------------------------------------------------------- export
def qkv_to_neox(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows [q; k; v] (each head contiguous) -> rows [q_0; k_0; v_0; q_1; ...] (NeoX's per-head view)."""
    return w.reshape(3, n_heads, -1, w.shape[-1]).transpose(0, 1).reshape(w.shape)


def qkv_from_neox(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, 3, -1, w.shape[-1]).transpose(0, 1).reshape(w.shape)


@torch.no_grad()
def neox_state_dict(model: CausalTransformer) -> dict[str, torch.Tensor]:
    """GPT-NeoX tensors (CPU, contiguous) for ``model``."""
    cfg, ours = model.cfg, model.state_dict()
    # the fragmergent factor folded in: exactly the product the forward computes, in any dtype
    out = {"gpt_neox.embed_in.weight": model.fragmergent(model.embed.weight),
           "embed_out.weight": model.head.weight}  # transformers 5 reads it as lm_head.weight
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        out[q + "attention.query_key_value.weight"] = qkv_to_neox(ours[p + "attn.qkv.weight"], cfg.n_heads)
        out.update({q + theirs: ours[p + mine] for mine, theirs in LAYER_NAMES})
        for bias in ZERO_BIASES:  # NeoX always has these; zeros add nothing
            weight = out[q + bias.replace(".bias", ".weight")]
            out[q + bias] = weight.new_zeros(weight.shape[0])
    out["gpt_neox.final_layer_norm.weight"] = ours["norm.weight"]
    out["gpt_neox.final_layer_norm.bias"] = torch.zeros_like(ours["norm.weight"])
    seen: set[int] = set()  # safetensors refuses shared storage: with mode off, embed_in *is* the tied head
    for k, v in out.items():
        v = v.detach().cpu().contiguous()
        out[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    return out


def neox_config(model: CausalTransformer, tokenizer: Tokenizer) -> dict[str, Any]:
    """``config.json`` for transformers 5 (``rope_parameters``) and 4.x (``rotary_pct``, ``rotary_emb_base``)."""
    cfg = model.cfg
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURE], "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ffn, "hidden_act": HIDDEN_ACT,
        "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": LAYER_NORM_EPS,
        "use_parallel_residual": False, "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 1.0},
        "rotary_pct": 1.0, "rotary_emb_base": ROPE_THETA,
        "tie_word_embeddings": False, "attention_dropout": cfg.dropout, "hidden_dropout": cfg.dropout,
        "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
        "bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
    }


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


def save_hf(model: CausalTransformer, tokenizer: Tokenizer, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` as a transformers GPT-NeoX folder (see the module doc).
    An existing ``directory`` is replaced only with ``overwrite``; the write is atomic."""
    from safetensors.torch import save_file

    if not isinstance(model, CausalTransformer):
        raise SabError(f"save_hf needs a CausalTransformer, got {type(model).__name__}")
    mode = model.cfg.fragmergent_mode
    if mode == "clock":
        raise SabError("model.fragmergent_mode=clock scales the embedding by a factor that follows wall time, so no "
                       "fixed weights represent it; set fragmergent_mode to step, fixed or off before exporting")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise SabError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                       f"is {model.cfg.vocab_size}; export the tokenizer the model was trained with")
    tensors, tokenizer_files = neox_state_dict(model), hf_tokenizer_files(tokenizer, model.cfg.max_seq_len)
    texts = {CONFIG: neox_config(model, tokenizer),
             "generation_config.json": {"bos_token_id": None, "eos_token_id": tokenizer.eos_id,
                                        "pad_token_id": tokenizer.pad_id}}
    out = Path(directory)
    with atomic_directory(out, what="transformers export", overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name, data in texts.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(model_card(model, tokenizer), encoding="utf-8")
    log.info("exported %s as a GPTNeoXForCausalLM with the %s tokenizer", out, tokenizer.name)
    return out


# ------------------------------------------------------------------------------------- import
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise SabError(f"{path} not found: not a transformers model folder")
    return read_json(path)


def _rope(conf: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings in either the transformers 5 or the 4.x spelling (NeoX defaults: a
    quarter of the head, base 10000)."""
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {}
    fraction = conf.get("rotary_pct", conf.get("partial_rotary_factor", 0.25))
    theta = conf.get("rope_theta", conf.get("rotary_emb_base", ROPE_THETA))
    return {"type": rope.get("rope_type", rope.get("type", "default")),
            "fraction": rope.get("partial_rotary_factor", fraction), "theta": rope.get("rope_theta", theta)}


def check_neox_config(conf: Any, source: str) -> dict[str, Any]:
    """Our ``model`` config fields for a GPT-NeoX ``config.json``, or a SabError naming what does not fit."""
    if not isinstance(conf, dict) or conf.get("model_type") != "gpt_neox":
        got = conf.get("model_type") if isinstance(conf, dict) else None
        raise SabError(f"{source}: model_type {bounded(got)} is not gpt_neox; only GPT-NeoX folders are imported")
    rope, act, eps = _rope(conf), conf.get("hidden_act", "gelu"), conf.get("layer_norm_eps", LAYER_NORM_EPS)
    mismatches = [
        (conf.get("use_parallel_residual", True) is not False, "use_parallel_residual must be false (sequential)"),
        (rope["fraction"] != 1.0, f"rotary fraction {bounded(rope['fraction'])} must be 1.0 (the whole head)"),
        (rope["type"] != "default", f"rope_type {bounded(rope['type'])} must be default (no scaling)"),
        (rope["theta"] != ROPE_THETA, f"rope_theta {bounded(rope['theta'])} must be {ROPE_THETA:g}"),
        (act not in TANH_GELUS, f"hidden_act {bounded(act)} must be the tanh GELU ({' or '.join(TANH_GELUS)})"),
        (eps != LAYER_NORM_EPS, f"layer_norm_eps {bounded(eps)} must be {LAYER_NORM_EPS:g}"),
    ]
    for bad, why in mismatches:
        if bad:
            raise SabError(f"{source}: this GPT-NeoX does not fit our architecture: {why}")
    names = {"hidden": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
             "ffn": "intermediate_size", "max_seq_len": "max_position_embeddings", "vocab_size": "vocab_size"}
    missing = [theirs for theirs in names.values() if theirs not in conf]
    if missing:
        raise SabError(f"{source}: no {missing[0]}")
    dims = {mine: conf[theirs] for mine, theirs in names.items()}
    # the preset whose shape it has (only a label: every dimension is set explicitly)
    shape = ("hidden", "n_heads", "n_layers", "ffn")
    preset = next((name for name, p in PRESETS.items() if all(dims[k] == p[k] for k in shape)), "lightweight")
    return {"preset": preset, **dims, "dropout": conf.get("hidden_dropout") or 0.0}


def _shard_files(d: Path) -> list[Path]:
    """The shards ``model.safetensors.index.json`` names: plain ``*.safetensors`` names inside ``d``
    (never a path elsewhere: ``../../etc/passwd``, an absolute path), each a regular file."""
    index_path = d / WEIGHTS_INDEX
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SabError(f"{index_path}: no weight_map (a mapping of tensor names to shard files) in it")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _SHARD.match(name):
            raise SabError(f"{index_path}: refused: {bounded(tensor)} is in the shard {bounded(name)}, which is not "
                           "a *.safetensors file of the folder")
        names.add(name)
    files = [d / name for name in sorted(names)]
    for f in files:
        if not f.is_file():  # follows links (the Hugging Face cache links its blobs): a device or pipe is refused
            raise SabError(f"{index_path}: its shard {f.name} is missing or not a regular file")
    return files


def _load_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (d / WEIGHTS).is_file():
        files = [d / WEIGHTS]
    elif (d / WEIGHTS_INDEX).is_file():
        files = _shard_files(d)
    else:
        raise SabError(f"{d}: no {WEIGHTS} (only safetensors weights are read: a .bin file is a pickle); "
                       "re-save it with transformers' save_pretrained")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # a missing shard, a damaged header: safetensors raises its own types
            raise SabError(f"{f}: cannot read the weights: {first_line(e)}") from None
        check_tensors(tensors, str(f))
    return tensors


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    t = tensors.pop(name, None)
    if t is None:
        raise SabError(f"{source}: the weights have no {name}")
    if tuple(t.shape) != shape:
        raise SabError(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape} from config.json")
    return t


def from_neox_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, tie_config: bool,
                      source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Our state dict (fragmergent off) from GPT-NeoX tensors, and whether the head is tied."""
    tensors = {k.removeprefix("gpt_neox."): v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    for name in [k for k in tensors if k.endswith(".bias")]:
        if torch.count_nonzero(tensors[name]):
            raise SabError(f"{source}: this GPT-NeoX does not fit our architecture: {name} is not zero "
                           "(ours has no biases)")
        del tensors[name]
    c, v, f = cfg.hidden, cfg.vocab_size, cfg.ffn
    shapes = {"norm1.weight": (c,), "norm2.weight": (c,), "attn.proj.weight": (c, c), "mlp.up.weight": (f, c),
              "mlp.down.weight": (c, f)}
    out = {"embed.weight": _take(tensors, "embed_in.weight", (v, c), source)}
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"layers.{i}."
        qkv = _take(tensors, q + "attention.query_key_value.weight", (3 * c, c), source)
        out[p + "attn.qkv.weight"] = qkv_from_neox(qkv, cfg.n_heads)
        out.update({p + mine: _take(tensors, q + theirs, shapes[mine], source) for mine, theirs in LAYER_NAMES})
    out["norm.weight"] = _take(tensors, "final_layer_norm.weight", (c,), source)
    head_name = next((k for k in ("embed_out.weight", "lm_head.weight") if k in tensors), None)
    if head_name is None and not tie_config:
        raise SabError(f"{source}: the weights have no lm_head.weight and tie_word_embeddings is false")
    head = _take(tensors, head_name, (v, c), source) if head_name else out["embed.weight"]
    if tensors:
        raise SabError(f"{source}: unexpected tensors for our architecture: {bounded(sorted(tensors))}")
    tied = torch.equal(head, out["embed.weight"])
    out["head.weight"] = out["embed.weight"] if tied else head  # a tied model lists it under both names
    out = {k: t.contiguous() for k, t in out.items()}
    out["fragmergent.step"] = torch.zeros((), dtype=torch.float32)
    return out, tied


def load_hf(directory: str | Path) -> tuple[RunConfig, Tokenizer, dict[str, torch.Tensor]]:
    """Read a GPT-NeoX folder (written by :func:`save_hf`, or any GPT-NeoX of our shape) back:
    the run config (fragmergent mode ``off``: any factor is already in the embedding; an untied
    head when the two matrices differ), our tokenizer and a state dict that
    ``CausalTransformer(cfg.model).load_state_dict`` takes strictly. Anything that would not give
    the same logits is refused with a SabError naming it."""
    d = Path(directory)
    if not d.is_dir():
        raise SabError(f"transformers model folder not found: {d}")
    conf = _read_json(d / CONFIG)
    model_fields = check_neox_config(conf, str(d / CONFIG))
    tok_path = d / TOKENIZER_JSON
    if not tok_path.is_file():
        raise SabError(f"{d}: no {TOKENIZER_JSON} (a tokenizers file is needed to rebuild the tokenizer)")
    try:
        tokenizer = tokenizer_from_json(tok_path.read_bytes().decode("utf-8"), str(tok_path))
    except (OSError, UnicodeDecodeError) as e:
        raise SabError(f"cannot read {tok_path}: {first_line(e)}") from None
    cfg = build_config({"model": {**model_fields, "fragmergent_mode": "off"},
                        "data": {"tokenizer": tokenizer.name, "seq_len": model_fields["max_seq_len"]}},
                       source=str(d / CONFIG))
    if conf.get("head_dim") not in (None, cfg.model.head_dim):
        raise SabError(f"{d / CONFIG}: head_dim {bounded(conf['head_dim'])} must be hidden_size / num_attention_heads")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise SabError(f"{tok_path}: {tokenizer.vocab_size} ids do not fit the model's "
                       f"vocab_size {cfg.model.vocab_size}")
    state, tied = from_neox_tensors(_load_tensors(d), cfg.model, bool(conf.get("tie_word_embeddings")), str(d))
    cfg.model.tie_embeddings = tied
    return cfg, tokenizer, state
