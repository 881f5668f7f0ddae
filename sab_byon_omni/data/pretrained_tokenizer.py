"""``hf``: a pretrained model's own tokenizer, its ``tokenizer.json`` used as it is.

It encodes and decodes as ``transformers.AutoTokenizer`` (5.x) does for the Llama, Mistral, Qwen2,
GPT-2 and GPT-NeoX tokenizers: ``encode(text)`` is ``tok(text)["input_ids"]`` (the file's post
processor adds a BOS where the model's does; special tokens typed in the text are matched, unless
``split_special_tokens``), and ``decode(ids)`` is ``tok.decode(ids, skip_special_tokens=True)``.
The special tokens (bos, eos, pad, unk) come from ``tokenizer_config.json`` /
``special_tokens_map.json``, else from the ids in the model's ``config.json``; pad falls back to
eos. The chat template (``chat_template.jinja``, or ``tokenizer_config.json``'s) is kept as a string.

The whole of it is plain data (:meth:`HFTokenizer.to_spec`): it travels inside checkpoints and
safetensors exports. A file we did not write is checked before the Rust library reads it: bounded
size and nesting (``files.untrusted``), and at most :data:`MAX_ENTRIES` vocabulary entries, merges or
added tokens, each id below the largest vocabulary the project supports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.config import LIMITS, DataConfig
from sab_byon_omni.data.rust import decode_ids, encode_ids, rust_calls, rust_tokenizer, utf8_safe
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.atomic import atomic_write_text
from sab_byon_omni.files.untrusted import MAX_JSON_BYTES, parse_json, read_json

MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")
MAX_ENTRIES = 1 << 21  # 8x the largest open vocabulary (Gemma's 262,144) and Llama 3's 280k merges
SPECIALS = ("bos", "eos", "pad", "unk")
MAX_TEMPLATE = 16  # pieces of a post_processor template, ids of one of its special tokens (real ones: 1-3)
TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPECIAL_TOKENS_MAP, CHAT_TEMPLATE, MODEL_CONFIG = "special_tokens_map.json", "chat_template.jinja", "config.json"


def parse_tokenizer_json(text: str, source: str) -> dict[str, Any]:
    """A ``tokenizer.json`` parsed, refused (one line naming what is too large) if its sizes are
    those of no real tokenizer, before the Rust library builds it."""
    raw = parse_json(text, source)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise SabError(f"{source}: not a tokenizers JSON file (no model)")
    if model.get("type") not in MODELS:
        raise SabError(f"{source}: tokenizer model {bounded(model.get('type'))} is not one of: {', '.join(MODELS)}")
    vocab, merges, added = model.get("vocab") or {}, model.get("merges") or [], raw.get("added_tokens") or []
    for what, items in (("vocabulary entries", vocab), ("merges", merges), ("added tokens", added)):
        if not isinstance(items, (dict, list)):
            raise SabError(f"{source}: its {what} are not a list or mapping")
        if len(items) > MAX_ENTRIES:
            raise SabError(f"{source}: {len(items):,} {what} is more than a tokenizer has (at most {MAX_ENTRIES:,})")
    ids = [*(vocab.values() if isinstance(vocab, dict) else range(len(vocab))),
           *(t.get("id") if isinstance(t, dict) else None for t in added), *post_processor_ids(raw, source)]
    bad = [i for i in ids if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < LIMITS["vocab_size"])]
    if bad:
        raise SabError(f"{source}: token id {bounded(bad[0])} is not an integer in [0, {LIMITS['vocab_size']:,})")
    return raw


def _processors(post: Any, source: str, depth: int = 0) -> list[dict[str, Any]]:
    if post is None:
        return []
    if not isinstance(post, dict) or depth > 4:
        raise SabError(f"{source}: its post_processor is not a mapping of a processor")
    if post.get("type") == "Sequence":
        inner = post.get("processors")
        if not isinstance(inner, list) or len(inner) > MAX_TEMPLATE:
            raise SabError(f"{source}: its post_processor Sequence is not a list of at most {MAX_TEMPLATE} processors")
        return [p for q in inner for p in _processors(q, source, depth + 1)]
    return [post]


def post_processor_ids(raw: dict[str, Any], source: str) -> list[Any]:
    """The ids a ``tokenizer.json``'s post processor adds to every text, refused when it adds more
    than a real template does (``MAX_TEMPLATE`` pieces, ``MAX_TEMPLATE`` ids per special token): each
    encoding grows by at most ``MAX_TEMPLATE ** 2`` ids."""
    ids: list[Any] = []
    for p in _processors(raw.get("post_processor"), source):
        for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
            pair = p.get(key)
            if pair is not None:
                ids.append(pair[1] if isinstance(pair, list) and len(pair) == 2 else None)
        templates = [p.get(k) or [] for k in ("single", "pair")]
        specials = p.get("special_tokens") or {}
        if not all(isinstance(t, list) and len(t) <= MAX_TEMPLATE for t in templates) or not isinstance(
                specials, dict) or len(specials) > MAX_TEMPLATE:
            raise SabError(f"{source}: its post_processor template adds more than {MAX_TEMPLATE} pieces to a text")
        for t in specials.values():
            t_ids = t.get("ids") if isinstance(t, dict) else None
            if not isinstance(t_ids, list) or len(t_ids) > MAX_TEMPLATE:
                raise SabError(f"{source}: a special token of its post_processor has not a list of at most "
                               f"{MAX_TEMPLATE} ids")
            ids.extend(t_ids)
    return ids


def token_of_id(raw: dict[str, Any], i: int) -> str | None:
    """The token with id ``i`` in a parsed ``tokenizer.json`` (an added token, or the vocabulary's)."""
    for t in raw.get("added_tokens") or []:
        if t.get("id") == i and isinstance(t.get("content"), str):
            return t["content"]
    vocab = raw["model"].get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [piece, score] in id order
        entry = vocab[i] if 0 <= i < len(vocab) else None
        return entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], str) else None
    return next((t for t, j in vocab.items() if j == i), None)


def read_text(path: Path) -> str:
    """A UTF-8 file we did not write, refused before it is read if larger than any JSON we parse."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise SabError(f"{path}: {path.stat().st_size:,} bytes is more than a tokenizer file can need")
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SabError(f"cannot read {path}: {first_line(e)}") from None


def token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def folder_parts(folder: Path, missing: str) -> tuple[str, dict[str, Any]]:
    """A model folder's ``tokenizer.json`` text and its ``tokenizer_config.json`` with
    ``special_tokens_map.json`` under it and ``chat_template.jinja`` over it (transformers 5 writes
    the template there); ``missing``: the error when there is no ``tokenizer.json``."""
    if not (folder / TOKENIZER_JSON).is_file():
        raise SabError(missing)
    config: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        if (folder / name).is_file():
            part = read_json(folder / name)
            config.update(part if isinstance(part, dict) else {})
    if (folder / CHAT_TEMPLATE).is_file():
        config["chat_template"] = read_text(folder / CHAT_TEMPLATE)
    return read_text(folder / TOKENIZER_JSON), config


def chat_template_of(config: dict[str, Any]) -> str | None:
    """The (default) chat template of a ``tokenizer_config.json``: a string, or a list of named ones."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


class HFTokenizer:
    """A pretrained ``tokenizer.json`` with its special tokens and chat template (see the module
    doc). Every call into the library goes through :func:`rust_calls`, so a panic names ``source``."""

    name = "hf"
    needs_file = True  # a corpus cache keeps its spec as a file (save/load)

    def __init__(self, text: str, special: dict[str, Any], source: str = "the pretrained tokenizer",
                 raw: Any = None) -> None:
        """``special``: bos/eos/pad/unk token strings, ``chat_template``, ``split_special_tokens``,
        ``clean_up_tokenization_spaces``; ``raw``: ``text`` parsed and checked already."""
        from tokenizers import AddedToken

        raw = raw if raw is not None else parse_tokenizer_json(text, source)
        self.source = source
        tok = rust_tokenizer(text, source)
        self.tokens = {k: token_text(special.get(k)) for k in SPECIALS}
        self.chat_template = special.get("chat_template") if isinstance(special.get("chat_template"), str) else None
        self.split_special_tokens = special.get("split_special_tokens") is True
        # transformers skips its clean-up for BPE (it would strip real spaces before punctuation)
        self.clean_up = special.get("clean_up_tokenization_spaces") is True and raw["model"]["type"] != "BPE"
        with rust_calls(source, "reading its vocabulary"):
            tok.encode_special_tokens = self.split_special_tokens
            added = {str(t) for t in tok.get_added_tokens_decoder().values()}
            missing = [t for t in self.tokens.values() if t and t not in added and tok.token_to_id(t) is not None]
            if missing:  # as transformers: a named special token is matched as one, never split
                tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            self.ids = {k: tok.token_to_id(t) if t else None for k, t in self.tokens.items()}
            known = [*tok.get_vocab(with_added_tokens=True).values(), *post_processor_ids(raw, source)]
            self.vocab_size = max(known, default=-1) + 1  # an id the post processor adds is one the model must have
            self.add_bos = self.ids["bos"] is not None and tok.encode("a").ids[:1] == [self.ids["bos"]]
        self._tok = tok
        self.bos_id, self.eos_id, self.unk_id = self.ids["bos"], self.ids["eos"], self.ids["unk"]
        self.pad_id = next((i for i in (self.ids["pad"], self.eos_id) if i is not None), 0)

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_parts(cls, text: str, tokenizer_config: dict[str, Any], model_config: dict[str, Any] | None = None,
                   source: str = TOKENIZER_JSON) -> "HFTokenizer":
        """From a ``tokenizer.json``'s text, its ``tokenizer_config.json`` (with
        ``special_tokens_map.json`` under it, and ``chat_template`` set from a template file if
        there is one) and the model's ``config.json`` (its token ids, where the tokenizer config
        names none)."""
        if not isinstance(tokenizer_config, dict):
            raise SabError(f"{source}: its tokenizer_config is not a mapping")
        raw = parse_tokenizer_json(text, source)
        special: dict[str, Any] = {k: token_text(tokenizer_config.get(f"{k}_token")) for k in SPECIALS}
        special.update(chat_template=chat_template_of(tokenizer_config),
                       split_special_tokens=tokenizer_config.get("split_special_tokens"),
                       clean_up_tokenization_spaces=tokenizer_config.get("clean_up_tokenization_spaces"))
        for k in ("bos", "eos", "pad"):  # names from the model's ids where the tokenizer config gives none
            i = (model_config or {}).get(f"{k}_token_id")
            i = i[0] if isinstance(i, list) and i else i
            if special[k] is None and isinstance(i, int) and not isinstance(i, bool):
                special[k] = token_of_id(raw, i)
        return cls(text, special, source, raw)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "HFTokenizer":
        if not isinstance(spec.get("json"), str):
            raise SabError("hf tokenizer spec has no 'json' field")
        special = {k: spec.get(f"{k}_token") for k in SPECIALS}
        special.update({k: spec.get(k) for k in ("chat_template", "split_special_tokens", "clean_up")})
        special["clean_up_tokenization_spaces"] = special.pop("clean_up")
        return cls(spec["json"], special, "the pretrained tokenizer stored with the model")

    def to_spec(self) -> dict[str, Any]:
        with rust_calls(self.source, "writing it out"):
            text = self._tok.to_str()
        return {"name": self.name, "json": text, **{f"{k}_token": t for k, t in self.tokens.items()},
                "chat_template": self.chat_template, "split_special_tokens": self.split_special_tokens,
                "clean_up": self.clean_up}

    @classmethod
    def load(cls, path: str | Path) -> "HFTokenizer":
        """From a transformers model folder, its ``tokenizer.json`` (the files beside it are read
        too), or a file :meth:`save` wrote."""
        p = Path(path).expanduser()
        folder = p if p.is_dir() else p.parent
        if p.is_file() and p.name != TOKENIZER_JSON:
            spec = read_json(p)
            if isinstance(spec, dict) and spec.get("name") == cls.name:
                return cls.from_spec(spec)
        text, config = folder_parts(folder, f"{path}: no {TOKENIZER_JSON} (the hf tokenizer reads a transformers "
                                            "model folder)")
        model = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else {}
        return cls.from_parts(text, config, model if isinstance(model, dict) else {}, str(folder / TOKENIZER_JSON))

    @classmethod
    def build(cls, cfg: DataConfig, texts: Iterable[Any] | None = None) -> "HFTokenizer":
        if not cfg.tokenizer_path:
            raise SabError("data.tokenizer=hf is a pretrained model's tokenizer: set data.tokenizer_path to its "
                           "folder or tokenizer.json, or start from the model (--init_from)")
        return cls.load(cfg.tokenizer_path)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_spec()), what="tokenizer")

    # ------------------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        with rust_calls(self.source, "encoding a text"):
            return self._tok.encode(utf8_safe(text)).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        """``add_special_tokens=False``: without what the post processor adds (a BOS), as transformers
        encodes a rendered chat template."""
        return encode_ids(self._tok, texts, self.source, add_special_tokens)

    def encode_array(self, texts: list[str]) -> np.ndarray:
        return np.concatenate([np.zeros(0, dtype=np.int64), *self.encode_batch(texts)])

    def decode(self, ids: Iterable[int]) -> str:
        text = decode_ids(self._tok, ids, self.source)
        if self.clean_up:  # transformers' clean_up_tokenization (WordPiece-era spacing)
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def token_id(self, token: str) -> int | None:
        with rust_calls(self.source, "looking up a token"):
            return self._tok.token_to_id(token)
