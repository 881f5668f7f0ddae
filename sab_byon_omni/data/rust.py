"""Calls into the Hugging Face ``tokenizers`` library (Rust), guarded: a panic or the library's own
error becomes a SabError that names the tokenizer file; a tokenizer read from a file never pads or
truncates; and the one rule for text that has no UTF-8 form."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from sab_byon_omni.errors import SabError, first_line


def utf8_safe(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD; the one rule for text that has no UTF-8
    form. Lone surrogates come from undecodable bytes in ``sys.argv`` (one per byte) and from JSON
    escapes such as ``"\\ud800"``; a pair of surrogates becomes the character it encodes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _is_panic(e: BaseException) -> bool:
    """A Rust panic inside ``tokenizers`` (pyo3's PanicException): it derives from BaseException,
    so ``except Exception`` lets it through. KeyboardInterrupt, SystemExit... are not panics."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


def _is_library_error(e: BaseException) -> bool:
    """The library's own errors are plain ``Exception`` (``WordLevel error: Missing [UNK] token``,
    ``Unk token '<unk>' not found``): no code of ours raises that bare type."""
    return type(e) is Exception


@contextlib.contextmanager
def rust_calls(source: str, what: str) -> Iterator[None]:
    """Turn a panic or an error of the ``tokenizers`` library into a SabError that names ``source``
    (the tokenizer file): a hostile tokenizer.json (a normalizer regex that backtracks, ``(a|aa)+$``)
    makes the regex engine give up, and the library panics instead of returning an error; a model
    whose unknown token is not in its vocabulary fails on the first unknown text."""
    try:
        yield
    except BaseException as e:
        if not (_is_panic(e) or _is_library_error(e)):
            raise
        raise SabError(f"{source}: the tokenizers library failed while {what} ({first_line(e, 100)}): "
                       "the tokenizer file is damaged or hostile; use another one") from None


def rust_tokenizer(text: str, source: str) -> Any:
    """A ``tokenizers.Tokenizer`` from the text of a tokenizer.json, with its ``padding`` and
    ``truncation`` dropped: the project never uses them, and a stranger's file can ask every encoding
    to be padded to 10^8 tokens (gigabytes per call). A file the library refuses is one SabError."""
    from tokenizers import Tokenizer

    with rust_calls(source, "reading it"):
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # the library's own exception types (a ValueError for bad JSON too)
            raise SabError(f"{source}: not a tokenizer the tokenizers library reads: {first_line(e)}") from None
        tok.no_padding()
        tok.no_truncation()
    return tok


def encode_ids(tok: Any, texts: list[str], source: str, add_special_tokens: bool = True) -> list[np.ndarray]:
    """``tok.encode_batch`` of ``texts`` (made valid UTF-8) as int64 arrays, a library error as one line."""
    with rust_calls(source, "encoding texts"):
        ids = [e.ids for e in tok.encode_batch([utf8_safe(t) for t in texts], add_special_tokens=add_special_tokens)]
    return [np.asarray(i, dtype=np.int64) for i in ids]


def decode_ids(tok: Any, ids: Iterable[int], source: str) -> str:
    """``tok.decode`` of ``ids`` without special tokens, a library error as one line."""
    ids = [int(i) for i in ids]
    with rust_calls(source, "decoding"):
        return tok.decode(ids, skip_special_tokens=True)
