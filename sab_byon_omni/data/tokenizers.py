"""Tokenizers behind one interface, each owning its encoding: ``encode``, ``encode_array`` (many
texts at once, vectorised), ``encode_batch``, ``decode``, ``vocab_size``, ``pad_id``, ``eos_id``,
and ``to_spec()`` / ``from_spec()`` so a tokenizer travels inside a checkpoint as plain data.
A tokenizer of ours that trained a model on chat data also carries the chat template the
conversations were rendered with (``chat_template`` in its spec, absent otherwise and in older
checkpoints): what ``chat`` and ``export --format hf`` use for that model. It changes no id, so
:func:`spec_equal` and :func:`spec_hash` leave it out.

* ``char96``: the guide's. id 0 is ``<PAD>``, ids 1..95 are ASCII 32..126. It is lossy outside
  printable ASCII, by a fixed rule: every whitespace character (newline, tab, CR, ...) becomes a
  space; other characters are NFKD-decomposed and stripped of combining marks (``é`` -> ``e``),
  and what is still not printable ASCII becomes ``?``. Decoding skips ``<PAD>``.
* ``byte``: ``<PAD>`` = 0, ``<EOS>`` = 1, then the 256 byte values: lossless for any text.
* ``bpe``: byte-level BPE trained with Hugging Face ``tokenizers``; ``<PAD>`` = 0, ``<EOS>`` = 1.
* ``hf``: a pretrained model's own ``tokenizer.json``, used as it is, with its special tokens and
  chat template (:mod:`sab_byon_omni.data.pretrained_tokenizer`).

:data:`TOKENIZERS` maps each name to its class; :func:`from_spec` rebuilds one from its spec and
:func:`build_tokenizer` makes one from a name or a :class:`~sab_byon_omni.config.DataConfig`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from sab_byon_omni.config import DataConfig
from sab_byon_omni.data.pretrained_tokenizer import HFTokenizer
from sab_byon_omni.data.rust import decode_ids, encode_ids, rust_calls, rust_tokenizer, utf8_safe
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.atomic import atomic_write_text
from sab_byon_omni.files.untrusted import not_a_file

log = logging.getLogger(__name__)

PAD, EOS = "<PAD>", "<EOS>"


class Tokenizer(Protocol):
    """What every tokenizer offers; each class also has the classmethods ``from_spec(spec)`` and
    ``build(cfg, texts)`` that :func:`from_spec` and :func:`build_tokenizer` dispatch to."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int | None
    needs_file: bool  # its vocabulary was learned: a corpus cache keeps it as a file (save/load)

    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, texts: list[str]) -> np.ndarray: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_spec(self) -> dict[str, Any]: ...


def _uint8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


class _FixedVocabulary:
    """A tokenizer whose vocabulary is a rule, not learned: nothing to train, its spec is its name."""

    name: ClassVar[str]
    vocab_size: ClassVar[int]
    pad_id: ClassVar[int] = 0
    eos_id: ClassVar[int | None] = None
    needs_file: ClassVar[bool] = False
    chat_template: str | None = None  # recorded by a chat run (see the module doc)

    def encode_array(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array([text]).tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array([t]) for t in texts]

    def to_spec(self) -> dict[str, Any]:
        return with_template({"name": self.name}, self.chat_template)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "_FixedVocabulary":
        tok = cls()
        tok.chat_template = template_of(spec)
        return tok

    @classmethod
    def build(cls, cfg: DataConfig, texts: Iterable[Any] | None = None) -> "_FixedVocabulary":
        return cls()


class Char96Tokenizer(_FixedVocabulary):
    """``<PAD>`` + printable ASCII 32..126: 96 ids; id = ASCII code - 31."""

    name = "char96"
    vocab_size = 96
    OFFSET = 31

    @staticmethod
    def normalize(text: str) -> str:
        """Map any string onto printable ASCII by the documented rule."""
        if text.isascii() and text.isprintable():
            return text
        out = []
        for ch in text:
            if 32 <= ord(ch) <= 126:
                out.append(ch)
            elif ch.isspace():
                out.append(" ")
            else:
                base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
                base = "".join(c if 32 <= ord(c) <= 126 else "?" for c in base)
                out.append(base or "?")
        return "".join(out)

    def encode_array(self, texts: list[str]) -> np.ndarray:
        return _uint8(self.normalize("".join(texts)).encode("ascii")) - self.OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        chars = []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            if not 0 < i < self.vocab_size:
                raise ValueError(f"id {i} is outside the char96 vocabulary")
            chars.append(chr(i + self.OFFSET))
        return "".join(chars)


class ByteTokenizer(_FixedVocabulary):
    """``<PAD>`` = 0, ``<EOS>`` = 1, byte b = b + 2: lossless for any text and code."""

    name = "byte"
    vocab_size = 258
    eos_id = 1
    OFFSET = 2

    def encode_array(self, texts: list[str]) -> np.ndarray:
        return _uint8("".join(texts).encode("utf-8", errors="surrogatepass")) + self.OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET)
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``) with ``<PAD>`` = 0 and ``<EOS>`` = 1. Every
    call into the library goes through :func:`rust_calls`, so a panic names ``source``."""

    name = "bpe"
    pad_id = 0
    eos_id = 1
    needs_file = True
    chat_template: str | None = None  # recorded by a chat run (see the module doc)

    def __init__(self, tok: Any, source: str = "the BPE tokenizer") -> None:
        self._tok, self.source = tok, source
        with rust_calls(source, "reading its vocabulary"):
            tok.encode_special_tokens = True  # "<EOS>" typed in a text is text, not the end token
            self.vocab_size = tok.get_vocab_size()
            ids = tok.token_to_id(PAD), tok.token_to_id(EOS)
        if ids != (0, 1):
            raise SabError("BPE tokenizer must have <PAD> as id 0 and <EOS> as id 1")

    @classmethod
    def train(cls, texts: Iterable[Any], vocab_size: int = 8192) -> "BPETokenizer":
        """Learn merges from ``texts`` (strings, or lists of strings)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        with rust_calls("the BPE tokenizer being trained", "training it"):
            tok.train_from_iterator(texts, trainer=trainer)  # an exception from ``texts`` comes through as it is
        return cls(tok)

    @classmethod
    def build(cls, cfg: DataConfig, texts: Iterable[Any] | None = None) -> "BPETokenizer":
        """Loaded from ``data.tokenizer_path`` if set, else trained on ``texts``."""
        if cfg.tokenizer_path:
            return cls.load(cfg.tokenizer_path)
        if texts is None:
            raise SabError("data.tokenizer=bpe needs a trained tokenizer: set data.tokenizer_path to a "
                           "tokenizer.json, or train one on your files (data.dataset=PATH)")
        t0, chars = time.perf_counter(), [0]

        def counted() -> Iterator[Any]:
            for text in texts:
                chars[0] += len(text) if isinstance(text, str) else 0
                yield text

        tok = cls.train(counted(), cfg.bpe_vocab_size)
        log.info("trained a BPE tokenizer (%d ids) on the training documents in %.1f s", tok.vocab_size,
                 time.perf_counter() - t0)
        suits = max(512, round(chars[0] / 1e6 * 1000 / 256) * 256)  # about 1,000 ids per MB of text
        if tok.vocab_size > 4 * suits:
            log.warning("BPE: %d ids learned from %.2f MB of text (%.0f characters per id): most ids are too rare "
                        "to learn; --bpe_vocab_size %d, or --tokenizer byte, suits a corpus this small (docs/DATA.md)",
                        tok.vocab_size, chars[0] / 1e6, chars[0] / max(tok.vocab_size, 1), suits)
        return tok

    @classmethod
    def from_json(cls, text: str, source: str = "the BPE tokenizer") -> "BPETokenizer":
        """From the text of a tokenizer.json; ``source`` names it in later errors (SabError here
        does not name it: the caller knows where the text came from)."""
        return cls(rust_tokenizer(text, "invalid BPE tokenizer JSON"), source)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "BPETokenizer":
        if not isinstance(spec.get("json"), str):
            raise SabError("BPE tokenizer spec has no 'json' field")
        tok = cls.from_json(spec["json"], "the BPE tokenizer stored with the model")
        tok.chat_template = template_of(spec)
        return tok

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        p = Path(path).expanduser()
        if (why := not_a_file(p)) is not None:
            raise SabError(f"tokenizer {p}: {why}")
        try:
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SabError(f"{p}: not a tokenizer.json (a UTF-8 JSON file written by a BPE run): {first_line(e)}") from None
        try:
            return cls.from_json(text, str(p))
        except SabError as e:
            raise SabError(f"{p}: {e}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_spec()["json"], what="tokenizer")

    def encode(self, text: str) -> list[int]:
        with rust_calls(self.source, "encoding a text"):
            return self._tok.encode(utf8_safe(text)).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return encode_ids(self._tok, texts, self.source)

    def encode_array(self, texts: list[str]) -> np.ndarray:
        return np.concatenate([np.zeros(0, dtype=np.int64), *self.encode_batch(texts)])

    def decode(self, ids: Iterable[int]) -> str:
        return decode_ids(self._tok, ids, self.source)

    def to_spec(self) -> dict[str, Any]:
        with rust_calls(self.source, "writing it out"):
            return with_template({"name": self.name, "json": self._tok.to_str()}, self.chat_template)


def with_template(spec: dict[str, Any], template: str | None) -> dict[str, Any]:
    """``spec`` with the chat template a chat run recorded (none: the spec as before)."""
    return {**spec, "chat_template": template} if template is not None else spec


def template_of(spec: dict[str, Any]) -> str | None:
    """The chat template recorded in one of our tokenizers' specs, or None (not a chat run, or an older file)."""
    template = spec.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise SabError(f"tokenizer spec: chat_template is {type(template).__name__}, not a string")
    return template


# ------------------------------------------------------------------------------------- registry
TOKENIZERS: dict[str, type] = {cls.name: cls for cls in (Char96Tokenizer, ByteTokenizer, BPETokenizer, HFTokenizer)}


def tokenizer_class(name: Any) -> Any:
    """The class registered under ``name``."""
    cls = TOKENIZERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise SabError(f"unknown tokenizer {bounded(name)}: use one of {', '.join(TOKENIZERS)}")
    return cls


def from_spec(spec: Any) -> Tokenizer:
    """Rebuild a tokenizer from ``to_spec()`` output (as stored in checkpoints)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise SabError(f"invalid tokenizer spec: expected a mapping with a 'name', got {type(spec).__name__}")
    return tokenizer_class(spec["name"]).from_spec(spec)


def build_tokenizer(source: str | DataConfig, texts: Iterable[Any] | None = None) -> Tokenizer:
    """The tokenizer that a name or ``data`` config asks for. ``bpe`` is loaded from
    ``data.tokenizer_path`` if set, else trained on ``texts`` (strings or lists of strings, only
    consumed when training) with ``data.bpe_vocab_size`` ids."""
    if isinstance(source, str):  # the name is checked here, with this function's own message
        return tokenizer_class(source).build(DataConfig(tokenizer=source), texts)
    return tokenizer_class(source.tokenizer).build(source, texts)


def _ids_part(spec: dict[str, Any]) -> dict[str, Any]:
    """What decides the ids: one of our specs without the chat template a chat run recorded
    (an ``hf`` spec as it is, as before)."""
    if spec.get("name") == HFTokenizer.name:
        return spec
    return {k: v for k, v in spec.items() if k != "chat_template"}


def spec_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(_ids_part(a), sort_keys=True) == json.dumps(_ids_part(b), sort_keys=True)


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_ids_part(spec), sort_keys=True).encode()).hexdigest()[:16]


def describe_tokenizer(spec: dict[str, Any]) -> str:
    """``bpe, 8,192 ids, spec 0123abcd...``: a spec in a few words, for logs and errors."""
    vocab = ""
    if spec.get("name") in (BPETokenizer.name, HFTokenizer.name):
        try:
            vocab = f", {len(json.loads(spec['json'])['model']['vocab']):,} ids"
        except (KeyError, TypeError, ValueError):
            pass
    return f"{spec.get('name')}{vocab}, spec {spec_hash(spec)}"
