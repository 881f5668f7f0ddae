"""Tiny GGUF files for the tests, written the way llama.cpp's converter writes them (with the
``gguf`` package's own writer, tensor names and quantisers, not with the code under test), raw
GGUF bytes for hostile headers, and the reference model: transformers' own classes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("1", "2"), ("12", "3"), ("o", "r"),
          ("l", "d"), ("Ġw", "or"), ("Ġ", "w"), ("Ġwor", "ld"), ("Ġ", "1"), ("'", "s")]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level characters, from transformers (not from the code under test)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def tiny_vocab() -> dict[str, list]:
    """Special tokens, the 256 bytes, tokens made by :data:`MERGES`, and one user-defined token."""
    made = [a + b for a, b in MERGES]
    tokens = SPECIALS + byte_alphabet() + made + ["<think>"]
    types = [CONTROL] * len(SPECIALS) + [NORMAL] * (256 + len(made)) + [USER_DEFINED]
    return {"tokens": tokens, "types": types, "merges": [f"{a} {b}" for a, b in MERGES]}


VOCAB = len(tiny_vocab()["tokens"])


def hf_config(arch: str = "llama", tie: bool = True, **changes: Any) -> Any:
    fields = {**TINY, "vocab_size": VOCAB, "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
              **changes}
    cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    return cls(**fields)


def random_model(arch: str = "llama", tie: bool = True, seed: int = 0, **changes: Any) -> Any:
    """A transformers model whose activations and logits are of order one (the initialisation's
    are tiny: a wrong permutation or dequantisation would hide in them)."""
    torch.manual_seed(seed)
    cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    model = cls(hf_config(arch, tie, **changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (4.0 if "embed" in name or "lm_head" in name else 1))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q and k rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_metadata(w: Any, cfg: Any, arch: str, file_type: int) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)


def _vocab_metadata(w: Any, pre: str, add_bos: bool | None, template: str | None) -> None:
    v = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)


def write_gguf_file(path: Path, model: Any, qtype: str = "F32", arch: str = "llama", pre: str = "gpt2",
                    add_bos: bool | None = False, template: str | None = CHAT_TEMPLATE,
                    metadata: dict[str, Any] | None = None, extra: dict[str, tuple[np.ndarray, Any]] | None = None,
                    drop: tuple[str, ...] = ()) -> Path:
    """``model`` as llama.cpp writes it: gguf's tensor names, q/k permuted for llama, vectors in F32,
    matrices in ``qtype``; ``metadata`` {key: (value, GGUFValueType)} and ``extra`` {name: (array,
    type)} add keys and tensors, ``drop`` leaves tensors out."""
    cfg, q = model.config, gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), arch)
    _arch_metadata(w, cfg, arch, 0)
    _vocab_metadata(w, pre, add_bos, template)
    for key, (value, vtype) in (metadata or {}).items():
        w.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType.STRING if isinstance(value, list) else None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, t in state.items():
        base, _, suffix = hf.rpartition(".")
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop:
            continue
        data = t.detach().float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = llama_cpp_permute(data, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        kind = q.F32 if data.ndim == 1 else q[qtype]
        w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    for name, (data, kind) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_load(path: Path) -> Any:
    """transformers' own reading of a GGUF file (its legacy loader: the gguf package's dequantize)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def transformers_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def model_from_parts(parts: Any) -> Any:
    """The test's stand-in for our model: transformers' class built from the transformers-shaped
    form that ``read_gguf`` returns (interop.hf.from_hf_parts builds ours from the same form)."""
    config = transformers.AutoConfig.for_model(**parts.config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = dict(parts.tensors)
    if parts.config["tie_word_embeddings"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def parts_of(model: Any, tokenizer_json: str, tokenizer_config: dict[str, Any]) -> tuple:
    """A transformers model as (config, tensors, tokenizer_json, tokenizer_config)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return model.config.to_dict(), state, tokenizer_json, tokenizer_config


# ------------------------------------------------------------------------------ raw headers
def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def raw_gguf(kvs: list[tuple[str, int, bytes]] = (), tensors: list[tuple[str, list[int], int, int]] = (),
             data: bytes = b"", version: int = 3, n_tensors: int | None = None, n_kvs: int | None = None) -> bytes:
    """GGUF bytes as given: ``kvs`` (key, value type, encoded value), ``tensors`` (name, ne, ggml
    type, offset), then padding to 32 and ``data``; the counts may lie."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kvs is None else n_kvs)
    body = b"".join(gguf_string(k) + struct.pack("<I", t) + v for k, t, v in kvs)
    infos = b"".join(gguf_string(n) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, kind, off)
                     for n, ne, kind, off in tensors)
    out = head + body + infos
    return out + b"\0" * (-len(out) % 32) + data
