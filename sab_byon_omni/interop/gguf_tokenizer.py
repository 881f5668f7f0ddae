"""A GGUF file's vocabulary as a ``tokenizers`` JSON, and back.

A GGUF holds no ``tokenizer.json``: llama.cpp keeps the vocabulary under ``tokenizer.ggml.*``
(the tokens by id, their types, the merges, the special token ids, whether a BOS is added) and
names the pre-tokenizer (the regex that cuts text before the merges) by a label,
``tokenizer.ggml.pre``. This module reads and writes the byte-level BPE kind (``tokenizer.ggml.model
= gpt2``: GPT-2, SmolLM, Llama 3, Qwen2 and most recent models):

* the tokens become the BPE vocabulary (a normal token outside the byte-level alphabet is
  re-spelled in it, as transformers does), the merges stay as they are;
* tokens typed CONTROL become special added tokens (``<|im_start|>``), USER_DEFINED ones plain
  added tokens (``<think>``): both are matched whole in text;
* the pre-tokenizer label picks the split llama.cpp uses for it (:data:`PRE_TOKENIZERS`); a label
  not listed there is refused, since a wrong split gives other ids silently;
* ``tokenizer.ggml.add_bos_token`` (by default: llama.cpp's, true for the Llama 3 family) becomes
  a post-processor that adds the BOS.

SentencePiece vocabularies (``tokenizer.ggml.model = llama``: Llama 2, Mistral 7B v0.1, TinyLlama)
are refused with one line. The chat template (``tokenizer.chat_template``) is passed on as a string:
nothing here renders it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sab_byon_omni.errors import SabError, bounded
from sab_byon_omni.interop.hf_tokenizer import byte_alphabet

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # tokenizer.ggml.token_type values
MODEL = "gpt2"  # tokenizer.ggml.model of a byte-level BPE
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
# llama.cpp's label -> the split it uses (src/llama-vocab.cpp): "gpt2" is GPT-2's own regex (the
# tokenizers library's ByteLevel), "digits" cuts every digit apart first, then GPT-2's regex
SPLITS = {"gpt2": None, "digits": None, "llama3": _LLAMA3, "qwen2": _QWEN2}
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais", "trillion", "default"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), "qwen2"),
}
WRITTEN_AS = {"gpt2": "gpt2", "digits": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}  # one label per split
ADDS_BOS = {"llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}  # llama.cpp
SPECIALS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@dataclass
class GGUFVocab:
    """What ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` hold."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str = "gpt2"
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


# ------------------------------------------------------------------------------------- read
def _strings(md: dict[str, Any], key: str, source: str, required: bool = True) -> list[str]:
    value = md.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SabError(f"{source}: {key} is {'missing' if value is None else 'not a list of strings'}: "
                       "the GGUF has no usable vocabulary")
    return value


def vocab_from_metadata(md: dict[str, Any], source: str) -> GGUFVocab:
    """The vocabulary in a GGUF's metadata, checked (a SabError names what is wrong or unsupported)."""
    model = md.get("tokenizer.ggml.model")
    if model != MODEL:
        kind = " (a SentencePiece vocabulary)" if model == "llama" else ""
        raise SabError(f"{source}: tokenizer.ggml.model {bounded(model)}{kind} is not supported: only byte-level BPE "
                       f"vocabularies ({MODEL}) are read")
    tokens = _strings(md, "tokenizer.ggml.tokens", source)
    merges = _strings(md, "tokenizer.ggml.merges", source, required=False)
    types = md.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens) or not all(type(t) is int for t in types):
        raise SabError(f"{source}: tokenizer.ggml.token_type is not one integer per token")
    bad = next((m for m in merges if len(m.split(" ")) != 2 or "" in m.split(" ")), None)
    if bad is not None:
        raise SabError(f"{source}: the merge {bounded(bad)} is not two tokens separated by one space")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise SabError(f"{source}: tokenizer.ggml.pre {bounded(pre)} (the pre-tokenizer) is not supported; this reads "
                       f"{', '.join(sorted(PRE_TOKENIZERS))}")
    ids = {}
    for name, key in SPECIALS.items():
        i = md.get(f"tokenizer.ggml.{key}")
        if i is not None:
            if type(i) is not int or not 0 <= i < len(tokens):
                raise SabError(f"{source}: tokenizer.ggml.{key} {bounded(i)} is not a token id "
                               f"(0 to {len(tokens) - 1})")
            ids[name] = i
    flags = [md.get(f"tokenizer.ggml.add_{k}_token", pre in ADDS_BOS and k == "bos") for k in ("bos", "eos")]
    template = md.get("tokenizer.chat_template")
    if not all(isinstance(f, bool) for f in flags) or not isinstance(template, (str, type(None))):
        raise SabError(f"{source}: tokenizer.ggml.add_bos_token/add_eos_token must be booleans and "
                       "tokenizer.chat_template a string")
    if (flags[0] and "bos" not in ids) or (flags[1] and "eos" not in ids):
        raise SabError(f"{source}: it asks to add a BOS or EOS token but names none (tokenizer.ggml.bos_token_id)")
    return GGUFVocab(tokens, types, merges, pre, ids, flags[0], flags[1], template)


def _pre_tokenizer(split: str) -> dict[str, Any]:
    if split == "gpt2":
        return _BYTE_LEVEL
    if split == "digits":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": SPLITS[split]}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}


def _post_processor(v: GGUFVocab) -> dict[str, Any]:
    added = [("bos", v.add_bos), ("eos", v.add_eos)]
    specials = {v.tokens[v.special_ids[k]]: v.special_ids[k] for k, on in added if on}
    bos = [{"SpecialToken": {"id": v.tokens[v.special_ids["bos"]], "type_id": 0}}] if v.add_bos else []
    eos = [{"SpecialToken": {"id": v.tokens[v.special_ids["eos"]], "type_id": 0}}] if v.add_eos else []
    seq = [{"Sequence": {"id": "A", "type_id": 0}}]
    return {"type": "TemplateProcessing", "single": bos + seq + eos,
            "pair": bos + seq + eos + bos + [{"Sequence": {"id": "B", "type_id": 1}}] + eos,
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in specials.items()}}


def tokenizer_json(v: GGUFVocab) -> str:
    """The ``tokenizers`` JSON of a vocabulary read from a GGUF."""
    alphabet, spelling = set(byte_alphabet()), byte_alphabet()
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(v.tokens, v.token_types)):
        if kind not in (CONTROL, USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)  # a repeated token keeps its first id
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == CONTROL}
             for i, (tok, kind) in enumerate(zip(v.tokens, v.token_types)) if kind in (CONTROL, USER_DEFINED)]
    split = PRE_TOKENIZERS[v.pre]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": split == "llama3", "vocab": vocab, "merges": v.merges}
    return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                       "normalizer": None, "pre_tokenizer": _pre_tokenizer(split),
                       "post_processor": _post_processor(v), "decoder": {**_BYTE_LEVEL, "add_prefix_space": True},
                       "model": model}, ensure_ascii=False)


def tokenizer_config(v: GGUFVocab, max_length: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` fields of a vocabulary read from a GGUF."""
    names = {f"{k}_token": (v.tokens[v.special_ids[k]] if k in v.special_ids else None) for k in SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": v.add_bos,
              "add_eos_token": v.add_eos, "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    if v.chat_template is not None:
        config["chat_template"] = v.chat_template
    return config


# ------------------------------------------------------------------------------------ write
def _split_of(pre: Any, merges: list[str], source: str) -> str:
    """Which of :data:`SPLITS` a ``tokenizers`` pre-tokenizer is (a SabError if none)."""
    def byte_level(p: Any, regex: bool) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)
                and p.get("use_regex", True) == regex)

    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    steps = steps if isinstance(steps, list) else []
    if len(steps) == 1 and (byte_level(steps[0], True) or (byte_level(steps[0], False) and not merges)):
        return "gpt2"  # without merges every byte is its own token, whatever the split
    if len(steps) == 2 and byte_level(steps[1], True) and steps[0] == {"type": "Digits", "individual_digits": True}:
        return "digits"
    if len(steps) == 2 and byte_level(steps[1], False) and isinstance(steps[0], dict) \
            and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert"):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        split = next((name for name, r in SPLITS.items() if r is not None and r == regex), None)
        if split is not None:
            return split
    raise SabError(f"{source}: its pre-tokenizer ({bounded(json.dumps(pre))}) is none of the byte-level splits a GGUF "
                   f"can name ({', '.join(WRITTEN_AS.values())})")


def _tokens_by_id(model: dict[str, Any], added: list[Any], vocab_size: int, source: str) -> tuple[list[str], list[int]]:
    by_id: dict[int, tuple[str, int]] = {i: (tok, NORMAL) for tok, i in model["vocab"].items()}
    for a in added:
        by_id[a["id"]] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    n = max(by_id, default=-1) + 1
    if n > vocab_size:
        raise SabError(f"{source}: the tokenizer has ids up to {n - 1} but the model's vocabulary is {vocab_size}")
    missing = next((i for i in range(n) if i not in by_id), None)
    if missing is not None:
        raise SabError(f"{source}: no token has id {missing}; a GGUF lists the tokens of ids 0 to {n - 1} in order")
    tokens = [by_id[i][0] for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    return tokens, [by_id[i][1] for i in range(n)] + [UNUSED] * (vocab_size - n)


def _token_name(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value  # tokenizer_config spells an AddedToken so


def vocab_from_json(text: str, config: dict[str, Any], vocab_size: int, source: str = "the tokenizer") -> GGUFVocab:
    """The GGUF vocabulary of a byte-level BPE ``tokenizers`` JSON and its ``tokenizer_config``
    fields (bos/eos/unk/pad tokens, add_bos_token, add_eos_token, chat_template), padded with
    unused ``[PADn]`` tokens to ``vocab_size``; a SabError names what a GGUF cannot hold."""
    from sab_byon_omni.files.untrusted import parse_json

    raw = parse_json(text, source)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise SabError(f"{source}: not a BPE tokenizer; a GGUF holds byte-level BPE vocabularies")
    if raw.get("normalizer") is not None or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise SabError(f"{source}: its normalizer, byte fallback or subword prefix has no place in a GGUF vocabulary")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    try:
        tokens, types = _tokens_by_id(model, raw.get("added_tokens") or [], vocab_size, source)
    except (KeyError, TypeError, AttributeError):
        raise SabError(f"{source}: its vocabulary or added tokens are not token -> id entries") from None
    ids = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    special_ids = {}
    for name in SPECIALS:
        tok = _token_name(config.get(f"{name}_token"))
        if tok is not None:
            if tok not in ids:
                raise SabError(f"{source}: its {name}_token {bounded(tok)} is not in the vocabulary")
            special_ids[name] = ids[tok]
    add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
    if (add_bos and "bos" not in special_ids) or (add_eos and "eos" not in special_ids):
        raise SabError(f"{source}: add_bos_token/add_eos_token is set but no bos_token/eos_token is named")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return GGUFVocab(tokens, types, merges, WRITTEN_AS[_split_of(raw.get("pre_tokenizer"), merges, source)],
                     special_ids, add_bos, add_eos, template if isinstance(template, str) else None)
