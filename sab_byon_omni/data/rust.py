"""Calls into the Hugging Face ``tokenizers`` library (Rust), guarded: a panic becomes a SabError
that names the tokenizer file; and the one rule for text that has no UTF-8 form."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def rust_calls(source: str, what: str) -> Iterator[None]:
    """Turn a panic of the ``tokenizers`` library into a SabError that names ``source`` (the
    tokenizer file): a hostile tokenizer.json (a normalizer regex that backtracks, ``(a|aa)+$``)
    makes the regex engine give up, and the library panics instead of returning an error."""
    try:
        yield
    except BaseException as e:
        if not _is_panic(e):
            raise
        raise SabError(f"{source}: the tokenizers library failed while {what} ({first_line(e, 100)}): "
                       "the tokenizer file is damaged or hostile; use another one") from None
