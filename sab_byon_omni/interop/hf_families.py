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
def _get(conf: dict[str, Any], *names: str, default: Any = None) -> Any:
    return next((conf[n] for n in names if conf.get(n) is not None), default)


def rope_fields(conf: dict[str, Any], source: str, theta: float = 10000.0, fraction: float = 1.0) -> dict[str, Any]:
    """Our rotary fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` / ``rotary_pct`` / ``rotary_emb_base`` (4.x); a scaling we do not compute is refused."""
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise SabError(f"{source}: rope scaling {bounded(kind)} is not supported (supported: "
                       f"{', '.join(ROPE_TYPES)}): no exact import")
    out = {"rope_base": float(_get(rope, "rope_theta", default=_get(conf, "rope_theta", "rotary_emb_base",
                                                                        default=theta))),
           "rope_fraction": float(_get(rope, "partial_rotary_factor", default=_get(
               conf, "partial_rotary_factor", "rotary_pct", default=fraction))),
           "rope_scaling": ROPE_TYPES[kind]}
    if kind != "default":
        out["rope_scaling_factor"] = float(rope.get("factor", 1.0))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                   rope_original_max_len=int(rope.get("original_max_position_embeddings", 8192)))
    return out


def _refuse(source: str, model_type: str, checks: list[tuple[bool, str]]) -> None:
    for bad, why in checks:
        if bad:
            raise SabError(f"{source}: this {model_type} model is not supported: {why}")


def _dims(conf: dict[str, Any], names: dict[str, str], source: str) -> dict[str, Any]:
    missing = [theirs for theirs in names.values() if not isinstance(conf.get(theirs), int)]
    if missing:
        raise SabError(f"{source}: no {missing[0]} (an integer) in config.json")
    return {mine: conf[theirs] for mine, theirs in names.items()}


def _llama_fields(conf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    dims = _dims(conf, {"hidden": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
                        "ffn": "intermediate_size", "max_seq_len": "max_position_embeddings",
                        "vocab_size": "vocab_size"}, source)
    window, layers = conf.get("sliding_window"), conf.get("layer_types") or []
    _refuse(source, model_type, [
        (conf.get("hidden_act", "silu") != "silu", f"hidden_act {bounded(conf.get('hidden_act'))} is not silu"),
        (bool(conf.get("mlp_bias")), "mlp_bias is true"),
        (bool(conf.get("attention_bias")), "attention_bias is true"),
        (model_type == "mistral" and window is not None and window < dims["max_seq_len"],
         f"sliding_window {bounded(window)} is shorter than max_position_embeddings (sliding-window attention)"),
        (model_type in ("qwen2", "qwen3") and (conf.get("use_sliding_window") is True
                                               or "sliding_attention" in layers),
         "use_sliding_window is true (sliding-window attention)"),
        (conf.get("head_dim") not in (None, dims["hidden"] // dims["n_heads"]),
         f"head_dim {bounded(conf.get('head_dim'))} is not hidden_size / num_attention_heads"),
    ])
    return {**dims, "family": model_type, "norm": "rmsnorm", "mlp": "swiglu", "qkv_bias": model_type == "qwen2",
            "qk_norm": model_type == "qwen3",
            "norm_eps": float(conf.get("rms_norm_eps", 1e-6)), "n_kv_heads": conf.get("num_key_value_heads"),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", False)), **rope_fields(conf, source)}


def _gelu(act: Any, model_type: str, source: str) -> str:
    if act not in GELUS:
        raise SabError(f"{source}: this {model_type} model is not supported: activation {bounded(act)} is not one of "
                       f"{', '.join(GELUS)}")
    return GELUS[act]


def _gpt2_fields(conf: dict[str, Any], source: str) -> dict[str, Any]:
    dims = _dims(conf, {"hidden": "n_embd", "n_heads": "n_head", "n_layers": "n_layer", "max_seq_len": "n_positions",
                        "vocab_size": "vocab_size"}, source)
    _refuse(source, "gpt2", [
        (conf.get("scale_attn_weights", True) is not True, "scale_attn_weights is false"),
        (bool(conf.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx is true"),
        (bool(conf.get("add_cross_attention")), "add_cross_attention is true"),
    ])
    return {**dims, "family": "gpt2", "ffn": conf.get("n_inner") or 4 * dims["hidden"], "positions": "learned",
            "norm_bias": True, "bias": True, "norm_eps": float(conf.get("layer_norm_epsilon", 1e-5)),
            "gelu_approximate": _gelu(conf.get("activation_function", "gelu_new"), "gpt2", source),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", True))}


def _neox_fields(conf: dict[str, Any], source: str) -> dict[str, Any]:
    dims = _dims(conf, {"hidden": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
                        "ffn": "intermediate_size", "max_seq_len": "max_position_embeddings",
                        "vocab_size": "vocab_size"}, source)
    return {**dims, "family": "gpt_neox", "norm_bias": True, "bias": True,
            "norm_eps": float(conf.get("layer_norm_eps", 1e-5)),
            "gelu_approximate": _gelu(conf.get("hidden_act", "gelu"), "gpt_neox", source),
            "parallel_residual": bool(conf.get("use_parallel_residual", True)),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", False)),
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
        need = [("norm", "layernorm"), ("mlp", "gelu"), ("n_kv_heads", cfg.n_heads)]
        need += [("positions", "learned"), ("parallel_residual", False)] if family == "gpt2" else \
            [("positions", "rope"), ("rope_scaling", "none")]
    # the speed-run levers no stock architecture computes (Gemma 2 soft-caps, but is not a family here)
    need += [("logit_softcap", 0.0), ("value_embed", False), ("unet_skips", False), ("document_mask_id", None)]
    need += [("mlp", "swiglu" if family in LLAMA_LIKE else "gelu")]
    for name, want in need:
        have = cfg.kv_heads if name == "n_kv_heads" else getattr(cfg, name)
        if have != want:
            raise SabError(f"model.{name}={bounded(have)} has no exact form in {arch} (it needs {want}); export "
                           "it with the family whose architecture it has")


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
