"""The open model families, as ``config.json`` fields and tensor names, both ways.

A family is a ``transformers`` architecture and how our one model class holds it:

| model_type | architecture | our options |
|---|---|---|
| llama, mistral | LlamaForCausalLM, MistralForCausalLM | rmsnorm, swiglu, n_kv_heads, rope (theta; llama3 or linear scaling) |
| qwen2 | Qwen2ForCausalLM | the same, and qkv_bias |
| qwen3 | Qwen3ForCausalLM | the same as llama, and qk_norm (RMSNorm on each head's q and k) |
| gpt2 | GPT2LMHeadModel | layernorm with bias, gelu (tanh or exact), learned positions, bias |
| gpt_neox | GPTNeoXForCausalLM | layernorm with bias, gelu, rope_fraction, parallel_residual, bias |

:data:`LAYOUTS` maps our parameter names to theirs per family (fused q/k/v and gate/up rows split
and joined; GPT-2's Conv1D weights transposed; NeoX's per-head ``query_key_value`` reordered).
:func:`model_fields` reads a ``config.json`` into our model fields, refusing with one line what our
model cannot compute exactly; :func:`hf_config` writes one back; :func:`check_representable` says
why a model has no exact form in a family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sab_byon_omni.config import PRESETS, ModelConfig
from sab_byon_omni.errors import SabError, bounded

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = (*LLAMA_LIKE, "gpt2", "gpt_neox")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


@dataclass(frozen=True)
class Layout:
    """Where our parameters live in a family's checkpoint. ``layer``: (our module under
    ``blocks.N.``, theirs under ``prefix`` (a tuple: rows joined in that order), how: ``""`` as it is,
    ``"T"`` transposed (GPT-2's Conv1D), ``"neox"`` per-head q/k/v rows); ``top``: the same outside
    the blocks; ``biases``: our modules whose bias the architecture always has (zeros where ours has
    none); ``strip``: prefixes some checkpoints of the family put before (or leave off) the names."""

    prefix: str
    layer: tuple[tuple[str, str | tuple[str, ...], str], ...]
    top: tuple[tuple[str, str], ...]
    head: str
    biases: frozenset[str] = frozenset()
    ignored: tuple[str, ...] = ()
    strip: tuple[str, ...] = ()


_LLAMA = Layout(
    prefix="model.layers.{i}.",
    layer=(("norm1", "input_layernorm", ""),
           ("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ""),
           ("attn.proj", "self_attn.o_proj", ""), ("norm2", "post_attention_layernorm", ""),
           ("mlp.up", ("mlp.gate_proj", "mlp.up_proj"), ""), ("mlp.down", "mlp.down_proj", "")),
    top=(("embed", "model.embed_tokens"), ("norm", "model.norm")), head="lm_head",
    ignored=(".rotary_emb.inv_freq",))
_ALL_BIASES = frozenset(("norm1", "norm2", "norm", "attn.qkv", "attn.proj", "mlp.up", "mlp.down"))
LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA, "mistral": _LLAMA,
    "qwen2": Layout(_LLAMA.prefix, _LLAMA.layer, _LLAMA.top, _LLAMA.head, frozenset({"attn.qkv"}), _LLAMA.ignored),
    "qwen3": Layout(_LLAMA.prefix, _LLAMA.layer + (("attn.q_norm", "self_attn.q_norm", ""),
                                                   ("attn.k_norm", "self_attn.k_norm", "")),
                    _LLAMA.top, _LLAMA.head, ignored=_LLAMA.ignored),
    "gpt2": Layout(
        prefix="transformer.h.{i}.",
        layer=(("norm1", "ln_1", ""), ("attn.qkv", "attn.c_attn", "T"), ("attn.proj", "attn.c_proj", "T"),
               ("norm2", "ln_2", ""), ("mlp.up", "mlp.c_fc", "T"), ("mlp.down", "mlp.c_proj", "T")),
        top=(("embed", "transformer.wte"), ("pos", "transformer.wpe"), ("norm", "transformer.ln_f")),
        head="lm_head", biases=_ALL_BIASES, ignored=(".attn.bias", ".attn.masked_bias"), strip=("transformer.",)),
    "gpt_neox": Layout(
        prefix="gpt_neox.layers.{i}.",
        layer=(("norm1", "input_layernorm", ""), ("attn.qkv", "attention.query_key_value", "neox"),
               ("attn.proj", "attention.dense", ""), ("norm2", "post_attention_layernorm", ""),
               ("mlp.up", "mlp.dense_h_to_4h", ""), ("mlp.down", "mlp.dense_4h_to_h", "")),
        top=(("embed", "gpt_neox.embed_in"), ("norm", "gpt_neox.final_layer_norm")), head="embed_out",
        biases=_ALL_BIASES, ignored=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")),
}


# ------------------------------------------------------------------------------ config.json -> ours
_KINDS = {int: "an integer", float: "a number", bool: "true or false (a JSON boolean)", str: "a string", list: "a list"}
MAX_DIM = 1 << 31  # a dimension beyond any model (ModelConfig holds the real limits)


def read(conf: dict[str, Any], key: str, kind: type, source: str, default: Any = None,
         lo: float | None = None, hi: float | None = None, above: float | None = None) -> Any:
    """``conf[key]`` checked to be of ``kind`` (a JSON boolean for bool; a finite number for float)
    within ``[lo, hi]`` (and ``> above``), ``default`` when missing or null; else one SabError
    naming the key: a stranger's config.json is read by type, never converted blindly."""
    value = conf.get(key)
    if value is None:
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)
    if ok and kind is float:
        try:
            value = float(value)
        except OverflowError:  # an integer of 400 digits
            ok = False
        ok = ok and math.isfinite(value)
    if not ok:
        raise SabError(f"{source}: {key} {bounded(value)} is not {_KINDS[kind]}")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and value <= above):
        low = f"> {above}" if above is not None else f">= {lo}" if lo is not None else ""
        high = f"<= {hi}" if hi is not None else ""
        raise SabError(f"{source}: {key} {bounded(value)} is out of range (it must be {' and '.join(filter(None, (low, high)))})")
    return value


def _first(conf: dict[str, Any], names: tuple[str, ...], kind: type, source: str, default: Any, **bounds: Any) -> Any:
    """The first of ``names`` present in ``conf`` (aliases across transformers versions), read by type."""
    name = next((n for n in names if conf.get(n) is not None), None)
    return default if name is None else read(conf, name, kind, source, **bounds)


def _mapping(conf: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = conf.get(key)
    if value is not None and not isinstance(value, dict):
        raise SabError(f"{source}: {key} {bounded(value)} is not a mapping")
    return value or {}


def rope_fields(conf: dict[str, Any], source: str, theta: float = 10000.0, fraction: float = 1.0) -> dict[str, Any]:
    """Our rotary fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` / ``rotary_pct`` / ``rotary_emb_base`` (4.x); a scaling we do not compute is refused."""
    rope = _mapping(conf, "rope_parameters", source) or _mapping(conf, "rope_scaling", source)
    kind = _first(rope, ("rope_type", "type"), str, source, "default")
    if kind not in ROPE_TYPES:
        raise SabError(f"{source}: rope scaling {bounded(kind)} is not supported (supported: "
                       f"{', '.join(ROPE_TYPES)}): no exact import")
    base = _first(conf, ("rope_theta", "rotary_emb_base"), float, source, theta, above=0.0)
    out = {"rope_base": read(rope, "rope_theta", float, source, base, above=0.0),
           "rope_fraction": read(rope, "partial_rotary_factor", float, source, _first(
               conf, ("partial_rotary_factor", "rotary_pct"), float, source, fraction, above=0.0, hi=1.0),
               above=0.0, hi=1.0),
           "rope_scaling": ROPE_TYPES[kind]}
    if kind != "default":
        out["rope_scaling_factor"] = read(rope, "factor", float, source, 1.0, above=0.0)
    if kind == "llama3":
        out.update(rope_low_freq_factor=read(rope, "low_freq_factor", float, source, 1.0, above=0.0),
                   rope_high_freq_factor=read(rope, "high_freq_factor", float, source, 4.0, above=0.0),
                   rope_original_max_len=read(rope, "original_max_position_embeddings", int, source, 8192, lo=1,
                                              hi=MAX_DIM))
    return out


def _refuse(source: str, model_type: str, checks: list[tuple[bool, str]]) -> None:
    for bad, why in checks:
        if bad:
            raise SabError(f"{source}: this {model_type} model is not supported: {why}")


def _dims(conf: dict[str, Any], names: dict[str, str], source: str) -> dict[str, Any]:
    missing = [theirs for theirs in names.values() if conf.get(theirs) is None]
    if missing:
        raise SabError(f"{source}: no {missing[0]} (an integer) in config.json")
    return {mine: read(conf, theirs, int, source, lo=1, hi=MAX_DIM) for mine, theirs in names.items()}


def _llama_fields(conf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    dims = _dims(conf, {"hidden": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
                        "ffn": "intermediate_size", "max_seq_len": "max_position_embeddings",
                        "vocab_size": "vocab_size"}, source)
    window, layers = read(conf, "sliding_window", int, source), read(conf, "layer_types", list, source, [])
    head_dim = read(conf, "head_dim", int, source, lo=1, hi=MAX_DIM)
    act = read(conf, "hidden_act", str, source, "silu")
    _refuse(source, model_type, [
        (act != "silu", f"hidden_act {bounded(act)} is not silu"),
        (read(conf, "mlp_bias", bool, source, False), "mlp_bias is true"),
        (read(conf, "attention_bias", bool, source, False), "attention_bias is true"),
        (model_type == "mistral" and window is not None and window < dims["max_seq_len"],
         f"sliding_window {bounded(window)} is shorter than max_position_embeddings (sliding-window attention)"),
        (model_type in ("qwen2", "qwen3") and (read(conf, "use_sliding_window", bool, source, False) or
                                               "sliding_attention" in layers),
         "use_sliding_window is true (sliding-window attention)"),
        (head_dim not in (None, dims["hidden"] // dims["n_heads"]),
         f"head_dim {bounded(head_dim)} is not hidden_size / num_attention_heads"),
    ])
    return {**dims, "family": model_type, "norm": "rmsnorm", "mlp": "swiglu", "qkv_bias": model_type == "qwen2",
            "qk_norm": model_type == "qwen3",
            "norm_eps": read(conf, "rms_norm_eps", float, source, 1e-6, above=0.0, hi=1.0),
            "n_kv_heads": read(conf, "num_key_value_heads", int, source, lo=1, hi=MAX_DIM),
            "tie_embeddings": read(conf, "tie_word_embeddings", bool, source, False), **rope_fields(conf, source)}


def _gelu(act: Any, model_type: str, source: str) -> str:
    if not isinstance(act, str) or act not in GELUS:
        raise SabError(f"{source}: this {model_type} model is not supported: activation {bounded(act)} is not one of "
                       f"{', '.join(GELUS)}")
    return GELUS[act]


def _gpt2_fields(conf: dict[str, Any], source: str) -> dict[str, Any]:
    dims = _dims(conf, {"hidden": "n_embd", "n_heads": "n_head", "n_layers": "n_layer", "max_seq_len": "n_positions",
                        "vocab_size": "vocab_size"}, source)
    _refuse(source, "gpt2", [
        (not read(conf, "scale_attn_weights", bool, source, True), "scale_attn_weights is false"),
        (read(conf, "scale_attn_by_inverse_layer_idx", bool, source, False), "scale_attn_by_inverse_layer_idx is true"),
        (read(conf, "add_cross_attention", bool, source, False), "add_cross_attention is true"),
    ])
    return {**dims, "family": "gpt2", "ffn": read(conf, "n_inner", int, source, 4 * dims["hidden"], lo=1, hi=MAX_DIM),
            "positions": "learned", "norm_bias": True, "bias": True,
            "norm_eps": read(conf, "layer_norm_epsilon", float, source, 1e-5, above=0.0, hi=1.0),
            "gelu_approximate": _gelu(conf.get("activation_function", "gelu_new"), "gpt2", source),
            "tie_embeddings": read(conf, "tie_word_embeddings", bool, source, True)}


def _neox_fields(conf: dict[str, Any], source: str) -> dict[str, Any]:
    dims = _dims(conf, {"hidden": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
                        "ffn": "intermediate_size", "max_seq_len": "max_position_embeddings",
                        "vocab_size": "vocab_size"}, source)
    return {**dims, "family": "gpt_neox", "norm_bias": True, "bias": True,
            "norm_eps": read(conf, "layer_norm_eps", float, source, 1e-5, above=0.0, hi=1.0),
            "gelu_approximate": _gelu(conf.get("hidden_act", "gelu"), "gpt_neox", source),
            "parallel_residual": read(conf, "use_parallel_residual", bool, source, True),
            "tie_embeddings": read(conf, "tie_word_embeddings", bool, source, False),
            **rope_fields(conf, source, fraction=0.25)}


def model_fields(conf: Any, source: str) -> dict[str, Any]:
    """Our ``model`` config fields (fragmergent off) for a transformers ``config.json``, or a
    SabError naming what does not fit: an unknown model_type, quantised weights, an option our model
    does not compute."""
    if not isinstance(conf, dict):
        raise SabError(f"{source}: not a config.json (a JSON mapping)")
    model_type = conf.get("model_type")
    if model_type not in FAMILIES:
        raise SabError(f"{source}: model_type {bounded(model_type)} is not supported (supported: "
                       f"{', '.join(FAMILIES)})")
    quant = conf.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise SabError(f"{source}: quantized weights ({bounded(method)}) are not supported: use the unquantized "
                       "model (float weights)")
    if model_type in LLAMA_LIKE:
        fields = _llama_fields(conf, model_type, source)
    else:
        fields = _gpt2_fields(conf, source) if model_type == "gpt2" else _neox_fields(conf, source)
    shape = ("hidden", "n_heads", "n_layers", "ffn")  # the preset is a label: every dimension is set
    preset = next((n for n, p in PRESETS.items() if all(fields[k] == p[k] for k in shape)), "lightweight")
    return {"preset": preset, **fields, "fragmergent_mode": "off"}


# ------------------------------------------------------------------------------ ours -> config.json
def check_representable(cfg: ModelConfig, family: str) -> None:
    """Refuse (one line) a model that ``family``'s architecture cannot compute exactly."""
    arch = ARCHITECTURES[family]
    need: list[tuple[str, Any]]  # (field, the value the architecture computes)
    if family in LLAMA_LIKE:
        need = [("norm", "rmsnorm"), ("mlp", "swiglu"), ("positions", "rope"), ("rope_fraction", 1.0),
                ("parallel_residual", False), ("bias", False)]
        need += [("qkv_bias", False)] if family != "qwen2" else []
        need += [("qk_norm", family == "qwen3")]
    else:  # GPT-2 and GPT-NeoX: every head its own keys and values
        need = [("norm", "layernorm"), ("mlp", "gelu"), ("n_kv_heads", cfg.n_heads), ("qk_norm", False)]
        need += [("positions", "learned"), ("parallel_residual", False)] if family == "gpt2" else \
            [("positions", "rope"), ("rope_scaling", "none")]
    # the speed-run levers no stock architecture computes (Gemma 2 soft-caps, but is not a family here)
    need += [("logit_softcap", 0.0), ("value_embed", False), ("unet_skips", False), ("document_mask_id", None)]
    need += [("mlp", "swiglu" if family in LLAMA_LIKE else "gelu")]
    for name, want in need:
        have = cfg.kv_heads if name == "n_kv_heads" else getattr(cfg, name)
        if have != want:
            lever = name in ("logit_softcap", "value_embed", "unet_skips", "document_mask_id") or have == "relu2"
            where = ("no transformers architecture computes it; --format safetensors or pt keeps it" if lever else
                     "only Qwen3 computes it, for a model trained with --family qwen3 --norm rmsnorm --mlp swiglu; "
                     "--format safetensors or pt keeps this one" if name == "qk_norm"
                     else "export it with the family whose architecture it has")
            raise SabError(f"model.{name}={bounded(have)} has no exact form in {arch} (it needs {want}); {where}")


def hf_config(cfg: ModelConfig, family: str, dtype: str, ids: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of ``family`` for ``cfg``, read alike by transformers 5 (``rope_parameters``)
    and 4.x (``rope_theta``, ``rope_scaling``, ``rotary_pct``); ``ids``: bos/eos/pad token ids."""
    base = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
            **{f"{k}_token_id": ids.get(k) for k in ("bos", "eos", "pad")}}
    if family == "gpt2":
        return {**base, "n_embd": cfg.hidden, "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": cfg.ffn,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True}
    rope = {"rope_type": {v: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling], "rope_theta": cfg.rope_base}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    base.update(hidden_size=cfg.hidden, num_attention_heads=cfg.n_heads, num_hidden_layers=cfg.n_layers,
                intermediate_size=cfg.ffn, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_base,
                attention_dropout=cfg.dropout)
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = cfg.rope_fraction
        return {**base, "hidden_act": "gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu",
                "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": cfg.parallel_residual, "attention_bias": True,
                "rope_parameters": rope, "rotary_pct": cfg.rope_fraction, "rotary_emb_base": cfg.rope_base,
                "hidden_dropout": cfg.dropout}
    extra = {"mistral": {"sliding_window": None}, "llama": {"attention_bias": False, "mlp_bias": False},
             "qwen2": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers},
             "qwen3": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers,
                       "attention_bias": False}}
    return {**base, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
            "rope_scaling": rope if cfg.rope_scaling != "none" else None, **extra[family]}
