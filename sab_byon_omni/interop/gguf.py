"""GGUF files (llama.cpp's format) read into, and written from, the transformers-shaped form.

``read_gguf(path)`` returns :class:`HFParts`: ``config`` (the ``config.json`` of a
``LlamaForCausalLM``, or ``Qwen2ForCausalLM``), ``tensors`` (fp32, dequantised, under transformers'
names, ``lm_head.weight`` only when the head is not tied), ``tokenizer_json`` (a ``tokenizers``
JSON built from the vocabulary inside, see :mod:`~sab_byon_omni.interop.gguf_tokenizer`) and
``tokenizer_config`` (special tokens, ``add_bos_token``, the chat template as a string).
``write_gguf(path, *parts, dtype=...)`` writes that form as a GGUF that llama.cpp, the ``gguf``
package and transformers' GGUF loader read.

* Architectures: ``llama`` (Llama, SmolLM, Mistral-style files) and ``qwen2``. Anything else, and
  any feature outside the plain model (mixture of experts, RoPE scaling or frequency factors,
  partial rotary, extra tensors), is refused with one line naming it.
* Types read: :data:`READ_TYPES` (float, the 4-8 bit block types and the K-quants), dequantised by
  the ``gguf`` package exactly as transformers does; others (the IQ and ternary types) are refused.
  Types written: ``config.GGUF_TYPES`` (vectors stay F32, as llama.cpp writes them).
* llama.cpp stores a Llama's q and k rows permuted (its rotary pairs adjacent dimensions, Hugging
  Face's the two halves of each head): reading undoes it, writing does it.

The header is read within limits before anything is trusted (:mod:`sab_byon_omni.files.gguf_header`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sab_byon_omni.config import GGUF_TYPES
from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.files.gguf_header import GGUFHeader, TensorInfo, read_gguf_header
from sab_byon_omni.interop.gguf_tokenizer import (
    SPECIALS, GGUFVocab, tokenizer_config, tokenizer_json, vocab_from_json, vocab_from_metadata,
)

log = logging.getLogger(__name__)

INSTALL = "pip install 'sab-byon-omni[gguf]' (or pip install gguf)"
READ_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LIMITS = {"embedding_length": 1 << 16, "block_count": 1024, "feed_forward_length": 1 << 20,
          "attention.head_count": 1024, "attention.head_count_kv": 1024, "context_length": 1 << 24}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
               "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
               "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
               "ffn_down.weight": "mlp.down_proj.weight"}
BIAS_NAMES = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
              "attn_v.bias": "self_attn.v_proj.bias"}
# a tensor outside the plain model, and the feature it belongs to
FEATURES = {"rope_freqs": "RoPE frequency factors (Llama 3.1+ long-context scaling)",
            "_exps": "mixture-of-experts layers", "_shexp": "mixture-of-experts layers", ".bias": "biases",
            "attn_qkv": "a fused qkv projection"}


@dataclass(frozen=True)
class Arch:
    """One GGUF architecture: its transformers class, whether llama.cpp permutes q/k, qkv biases."""

    name: str
    model_type: str
    hf_class: str
    permute_qk: bool
    qkv_bias: bool


ARCHS = {"llama": Arch("llama", "llama", "LlamaForCausalLM", True, False),
         "qwen2": Arch("qwen2", "qwen2", "Qwen2ForCausalLM", False, True)}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF arch


class HFParts(NamedTuple):
    """A model in transformers' shape, in memory."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any]


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SabError(f"reading or writing GGUF files needs the gguf package: {INSTALL}") from None
    return gguf


GGUF_TAG = ("sab_byon_omni.export", "sab-omni export")  # a metadata key and value: what export --force may replace


def block_sizes() -> dict[int, tuple[int, int]]:
    """(values, bytes) per block of every ggml type the installed ``gguf`` package knows."""
    return {int(k): v for k, v in _gguf().GGML_QUANT_SIZES.items()}


def type_name(ggml_type: int) -> str:
    try:
        return _gguf().GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# ------------------------------------------------------------------------------------- read
def _number(md: dict[str, Any], key: str, source: str, default: Any = None, limit: int = 0) -> Any:
    """``md[key]``: a positive integer up to ``limit`` (or, with ``limit`` 0, a positive finite float)."""
    value = md.get(key, default)
    if value is None:
        raise SabError(f"{source}: no {key} in its metadata (an incomplete GGUF?)")
    kind_ok = type(value) is int if limit else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not kind_ok:  # a string '4' or 'x' is of the wrong type, not out of range
        raise SabError(f"{source}: {key} = {bounded(value)} is not {'an integer' if limit else 'a number'} "
                       f"(a {type(value).__name__} in the metadata)")
    ok = 0 < value <= limit if limit else math.isfinite(value) and value > 0
    if not ok:
        raise SabError(f"{source}: {key} = {bounded(value)} is out of range" + (f" (1 to {limit:,})" if limit else ""))
    return value


def _arch(md: dict[str, Any], source: str) -> Arch:
    name = md.get("general.architecture")
    if name not in ARCHS:
        raise SabError(f"{source}: GGUF architecture {bounded(name)} is not supported (this reads "
                       f"{', '.join(ARCHS)})")
    arch = ARCHS[name]
    refused = [(md.get(f"{name}.expert_count", 0), "mixture-of-experts (expert_count)"),
               (md.get(f"{name}.rope.scaling.type", "none") not in ("none", None), "RoPE scaling"),
               (md.get(f"{name}.rope.scaling.factor", 1.0) not in (0.0, 1.0), "RoPE scaling")]
    for bad, what in refused:
        if bad:
            raise SabError(f"{source}: this {name} GGUF uses {what}, which is not supported")
    return arch


def _config(md: dict[str, Any], arch: Arch, embed: TensorInfo | None, source: str) -> dict[str, Any]:
    """The transformers ``config.json`` for the metadata of ``arch``."""
    def n(key: str, default: Any = None) -> int:
        return _number(md, f"{arch.name}.{key}", source, default, LIMITS[key])

    hidden, heads = n("embedding_length"), n("attention.head_count")
    kv_heads = n("attention.head_count_kv", heads)
    head_dim = _number(md, f"{arch.name}.attention.key_length", source, hidden // heads, 1 << 16)
    rotary = _number(md, f"{arch.name}.rope.dimension_count", source, head_dim, 1 << 16)
    value_dim = md.get(f"{arch.name}.attention.value_length", head_dim)
    if heads % kv_heads or head_dim % 2 or rotary != head_dim or value_dim != head_dim:
        raise SabError(f"{source}: attention of {heads} heads, {kv_heads} key/value heads, head size {head_dim} "
                       f"(values {bounded(value_dim)}), rotary over {rotary} dimensions is not supported (grouped "
                       "heads, an even head size, rotary over the whole head)")
    if embed is None:
        raise SabError(f"{source}: no tensor token_embd.weight (the embedding)")
    config = {"architectures": [arch.hf_class], "model_type": arch.model_type, "vocab_size": embed.shape[0],
              "hidden_size": hidden, "intermediate_size": n("feed_forward_length"),
              "num_hidden_layers": n("block_count"), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": n("context_length"),
              "rms_norm_eps": _number(md, f"{arch.name}.attention.layer_norm_rms_epsilon", source),
              "rope_theta": _number(md, f"{arch.name}.rope.freq_base", source, 10000.0),
              "torch_dtype": "float32", "tie_word_embeddings": True}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if arch.qkv_bias:
        config.update(use_sliding_window=False, sliding_window=None)
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def expected_tensors(config: dict[str, Any], arch: Arch) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (transformers name, shape) of every tensor of a model of ``config``
    (``output.weight`` included: it is absent when the head is tied)."""
    c = config
    hidden, ffn, vocab, head = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    shapes = {"attn_norm": (hidden,), "attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, q), "ffn_norm": (hidden,), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    bias = {"attn_q": (q,), "attn_k": (kv,), "attn_v": (kv,)} if arch.qkv_bias else {}
    out = {"token_embd.weight": (GLOBAL_NAMES["token_embd.weight"], (vocab, hidden)),
           "output_norm.weight": (GLOBAL_NAMES["output_norm.weight"], (hidden,)),
           "output.weight": (GLOBAL_NAMES["output.weight"], (vocab, hidden))}
    for i in range(c["num_hidden_layers"]):
        for names, kinds, suffix in ((LAYER_NAMES, shapes, ".weight"), (BIAS_NAMES, bias, ".bias")):
            for part, shape in kinds.items():
                out[f"blk.{i}.{part}{suffix}"] = (f"model.layers.{i}.{names[part + suffix]}", shape)
    return out


def _check_tensors(header: GGUFHeader, expected: dict[str, tuple[str, tuple[int, ...]]], arch: Arch,
                   source: str) -> None:
    present = {t.name: t for t in header.tensors}
    for t in header.tensors:
        if t.name not in expected:
            feature = next((what for key, what in FEATURES.items() if key in t.name), None)
            why = f" ({feature}, not supported)" if feature else ""
            raise SabError(f"{source}: tensor {bounded(t.name)} is not part of a plain {arch.name} model{why}")
        if t.shape != expected[t.name][1]:
            raise SabError(f"{source}: tensor {t.name} has shape {list(t.shape)} but the metadata implies "
                           f"{list(expected[t.name][1])}")
        if type_name(t.ggml_type) not in READ_TYPES:
            raise SabError(f"{source}: tensor {t.name} is stored as {type_name(t.ggml_type)}, which is not supported "
                           f"(supported: {', '.join(READ_TYPES)})")
    missing = next((name for name in expected if name not in present and name != "output.weight"), None)
    if missing is not None:
        raise SabError(f"{source}: no tensor {missing} (an incomplete {arch.name} GGUF)")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (adjacent rotary pairs) -> transformers' (the two halves of a head)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' q/k row order -> llama.cpp's (its convert_hf_to_gguf.py ``permute``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantised(path: Path, header: GGUFHeader, expected: dict[str, tuple[str, tuple[int, ...]]],
                 config: dict[str, Any], arch: Arch) -> dict[str, torch.Tensor]:
    import numpy as np

    gguf = _gguf()
    data = np.memmap(path, dtype=np.uint8, mode="r")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for t in header.tensors:
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = data[t.offset:t.offset + t.nbytes].reshape(*t.shape[:-1], t.shape[-1] // per_block * block_bytes)
        values = gguf.quants.dequantize(raw, qtype)
        if np.may_share_memory(values, data):  # F32 is a view of the file: copy it out
            values = values.copy()
        w = torch.from_numpy(values).reshape(t.shape).float()
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch.permute_qk and part in heads:
            w = _unpermute(w, heads[part])
        out[expected[t.name][0]] = w.contiguous()
    return out


def read_gguf(path: str | Path) -> HFParts:
    """The model in the GGUF file at ``path``, in transformers' shape (see the module doc). Every
    check runs before the tensors are dequantised; a SabError names what is wrong or unsupported."""
    p = Path(path)
    source = str(p)
    header = read_gguf_header(p, block_sizes())
    md = header.metadata
    arch = _arch(md, source)
    config = _config(md, arch, next((t for t in header.tensors if t.name == "token_embd.weight"), None), source)
    expected = expected_tensors(config, arch)
    _check_tensors(header, expected, arch, source)
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in header.tensors)
    vocab = vocab_from_metadata(md, source)
    if len(vocab.tokens) > config["vocab_size"]:
        raise SabError(f"{source}: {len(vocab.tokens):,} tokens but an embedding of {config['vocab_size']:,} rows")
    config.update({f"{k}_token_id": vocab.special_ids.get(k) for k in ("bos", "eos", "pad")})
    tensors = _dequantised(p, header, expected, config, arch)
    log.info("read %s: a %s GGUF of %d tensors", p, arch.name, len(tensors))
    return HFParts(config, tensors, tokenizer_json(vocab), tokenizer_config(vocab, config["max_position_embeddings"]))


# ------------------------------------------------------------------------------------ write
def _arch_for(config: dict[str, Any], source: str) -> Arch:
    """The GGUF architecture a transformers ``config`` is written as, once it is checked to fit."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise SabError(f"{source}: a {bounded(model_type)} model has no GGUF form here: only Llama-shaped models "
                       f"({', '.join(MODEL_TYPES)}) are written")
    arch = ARCHS[MODEL_TYPES[model_type]]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    misfits = [(config.get("hidden_act", "silu") != "silu", "hidden_act must be silu"),
               (rope.get("rope_type", rope.get("type", "default")) != "default", "RoPE scaling is not written"),
               (config.get("partial_rotary_factor", 1.0) != 1.0, "rotary must cover the whole head"),
               (config.get("mlp_bias") or (config.get("attention_bias") and not arch.qkv_bias),
                "biases are not written"),
               (model_type == "mistral" and 0 < (config.get("sliding_window") or 0) < config["max_position_embeddings"],
                "a sliding window has no GGUF key"),
               (head_dim % 2 != 0, "the head size must be even")]
    for bad, why in misfits:
        if bad:
            raise SabError(f"{source}: this {model_type} model has no GGUF form: {why}")
    return arch


def _write_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The fields :func:`expected_tensors` reads, checked, with transformers' defaults filled in."""
    c = dict(config)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings"):
        if type(c.get(key)) is not int or c[key] < 1:
            raise SabError(f"{source}: its config has no {key} (a positive integer): {bounded(c.get(key))}")
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    c["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c


def _ggml_type(w: torch.Tensor, dtype: str) -> Any:
    """llama.cpp's choice: vectors in F32, matrices in the asked type (F16 where a row is not whole Q8_0 blocks)."""
    q = _gguf().GGMLQuantizationType
    if w.dim() == 1 or dtype == "f32":
        return q.F32
    if dtype == "q8_0" and w.shape[-1] % _gguf().GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return q.Q8_0
    return q.F16


def _add_metadata(w: Any, c: dict[str, Any], arch: Arch, dtype: str, vocab: GGUFVocab) -> None:
    gguf, a = _gguf(), arch.name
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in [("context_length", c["max_position_embeddings"]), ("embedding_length", c["hidden_size"]),
                       ("block_count", c["num_hidden_layers"]), ("feed_forward_length", c["intermediate_size"]),
                       ("attention.head_count", c["num_attention_heads"]),
                       ("attention.head_count_kv", c["num_key_value_heads"]), ("vocab_size", c["vocab_size"]),
                       ("rope.dimension_count", c["head_dim"])]:
        w.add_uint32(f"{a}.{key}", int(value))
    if c["head_dim"] != c["hidden_size"] // c["num_attention_heads"]:
        w.add_uint32(f"{a}.attention.key_length", c["head_dim"])
        w.add_uint32(f"{a}.attention.value_length", c["head_dim"])
    rope = c.get("rope_parameters") or {}
    w.add_float32(f"{a}.rope.freq_base", float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(c.get("rms_norm_eps", 1e-6)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.merges:  # the writer cannot type an empty array
        w.add_token_merges(vocab.merges)
    for name, i in vocab.special_ids.items():
        w.add_uint32(f"tokenizer.ggml.{SPECIALS[name]}", i)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


def write_gguf(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer_json: str,
               tokenizer_config: dict[str, Any], dtype: str = "f16", overwrite: bool = False) -> Path:
    """Write the transformers-shaped model (see :class:`HFParts`) as a GGUF file at ``path``, its
    matrices in ``dtype`` (one of ``config.GGUF_TYPES``), atomically; an existing file only with ``overwrite``."""
    from sab_byon_omni.files.atomic import atomic_path

    out, source = Path(path), "the model"
    if dtype not in GGUF_TYPES:
        raise SabError(f"--gguf-type={bounded(dtype)} is not one of: {', '.join(GGUF_TYPES)}")
    if out.exists() and not overwrite:
        raise SabError(f"{out} already exists; pass --force to replace it")
    c = _write_config(config, source)
    arch = _arch_for(c, source)
    expected = expected_tensors(c, arch)
    tied = "lm_head.weight" not in tensors
    wanted = {hf: (name, shape) for name, (hf, shape) in expected.items() if not (tied and name == "output.weight")}
    missing = next((hf for hf in wanted if hf not in tensors), None)
    extra = next((k for k in tensors if k not in wanted), None)
    if missing or extra:
        raise SabError(f"{source}: {'no tensor ' + missing if missing else 'an unexpected tensor ' + bounded(extra)} "
                       f"for a {c['model_type']} of this config")
    bad = next((hf for hf, (_, shape) in wanted.items() if tuple(tensors[hf].shape) != shape), None)
    if bad is not None:
        raise SabError(f"{source}: {bad} has shape {list(tensors[bad].shape)}, not {list(wanted[bad][1])}")
    vocab = vocab_from_json(tokenizer_json, tokenizer_config, c["vocab_size"], "the tokenizer")
    gguf = _gguf()
    heads = {"attn_q": c["num_attention_heads"], "attn_k": c["num_key_value_heads"]}
    with atomic_path(out, what="GGUF file", kept="the output was not written") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        _add_metadata(w, c, arch, dtype, vocab)
        w.add_string(*GGUF_TAG)  # what export --force may replace
        for hf, (name, _) in wanted.items():
            t = tensors[hf].detach().to("cpu", torch.float32)
            part = name.split(".")[2] if name.startswith("blk.") else ""
            if arch.permute_qk and part in heads:
                t = _permute(t, heads[part])
            qtype = _ggml_type(t, dtype)
            w.add_tensor(name, gguf.quants.quantize(t.contiguous().numpy(), qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s: a %s GGUF in %s", out, arch.name, dtype)
    return out
