"""Tokenizers behind one interface: ``encode``, ``decode``, ``vocab_size``, ``pad_id``, ``eos_id``,
and ``to_spec()`` / ``from_spec()`` so a tokenizer travels inside a checkpoint as plain data.

* ``char96``: the guide's. id 0 is ``<PAD>``, ids 1..95 are ASCII 32..126. It is lossy outside
  printable ASCII, by a fixed rule: every whitespace character (newline, tab, CR, ...) becomes a
  space; other characters are NFKD-decomposed and stripped of combining marks (``é`` -> ``e``),
  and what is still not printable ASCII becomes ``?``. Decoding skips ``<PAD>``.
* ``byte``: ``<PAD>`` = 0, ``<EOS>`` = 1, then the 256 byte values: lossless for any text.
* ``bpe``: byte-level BPE trained with Hugging Face ``tokenizers``; ``<PAD>`` = 0, ``<EOS>`` = 1.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from sab_byon_omni.errors import SabError

PAD, EOS = "<PAD>", "<EOS>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    pad_id: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_spec(self) -> dict[str, Any]: ...


class Char96Tokenizer:
    """``<PAD>`` + printable ASCII 32..126: 96 ids."""

    name = "char96"
    vocab_size = 96
    pad_id = 0
    eos_id = None

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

    def encode(self, text: str) -> list[int]:
        return [b - 31 for b in self.normalize(text).encode("ascii")]

    def decode(self, ids: Iterable[int]) -> str:
        chars = []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            if not 0 < i < self.vocab_size:
                raise ValueError(f"id {i} is outside the char96 vocabulary")
            chars.append(chr(i + 31))
        return "".join(chars)

    def to_spec(self) -> dict[str, Any]:
        return {"name": self.name}


class ByteTokenizer:
    """``<PAD>`` = 0, ``<EOS>`` = 1, byte b = b + 2: lossless for any text and code."""

    name = "byte"
    vocab_size = 258
    pad_id = 0
    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8", errors="surrogatepass")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - 2 for i in ids if int(i) >= 2)
        return data.decode("utf-8", errors="replace")

    def to_spec(self) -> dict[str, Any]:
        return {"name": self.name}


def _utf8_safe(text: str) -> str:
    """Lone surrogates (e.g. from undecodable bytes in ``sys.argv``) have no UTF-8 form and the
    ``tokenizers`` library rejects them: they become U+FFFD, as undecodable file bytes do."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``) with ``<PAD>`` = 0 and ``<EOS>`` = 1."""

    name = "bpe"
    pad_id = 0
    eos_id = 1

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        tok.encode_special_tokens = True  # "<EOS>" typed in a text is text, not the end token
        self.vocab_size = tok.get_vocab_size()
        if tok.token_to_id(PAD) != 0 or tok.token_to_id(EOS) != 1:
            raise SabError("BPE tokenizer must have <PAD> as id 0 and <EOS> as id 1")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(text))
        except Exception as e:  # the library raises its own exception types
            raise SabError(f"invalid BPE tokenizer JSON: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        p = Path(path)
        if not p.is_file():
            raise SabError(f"tokenizer file not found: {p}")
        return cls.from_json(p.read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str(), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_utf8_safe(text)).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch([_utf8_safe(t) for t in texts])]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_spec(self) -> dict[str, Any]:
        return {"name": self.name, "json": self._tok.to_str()}


def from_spec(spec: Any) -> Tokenizer:
    """Rebuild a tokenizer from ``to_spec()`` output (as stored in checkpoints)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise SabError(f"invalid tokenizer spec: {str(spec)[:80]!r}")
    name = spec["name"]
    if name == "char96":
        return Char96Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if not isinstance(spec.get("json"), str):
            raise SabError("BPE tokenizer spec has no 'json' field")
        return BPETokenizer.from_json(spec["json"])
    raise SabError(f"unknown tokenizer {name!r}")


def build_tokenizer(name: str, texts: Iterable[str] | None = None, vocab_size: int = 8192,
                    path: str | None = None) -> Tokenizer:
    """A tokenizer by name; ``bpe`` loads ``path`` if given, else trains on ``texts``."""
    if name == "char96":
        return Char96Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if path:
            return BPETokenizer.load(path)
        if texts is None:
            raise SabError("a BPE tokenizer needs training texts or data.tokenizer_path")
        return BPETokenizer.train(texts, vocab_size)
    raise SabError(f"unknown tokenizer {name!r}")


def spec_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
