"""The one exception type that user-facing entry points turn into ``error: ...`` and exit 2, and
the helpers that keep every message short whatever the input was."""

from __future__ import annotations

import re
import reprlib

MAX_FIRST_LINE = 160
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")  # terminal escapes, controls

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel = 60, 60, 2
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


class SabError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI): one clear line, no traceback."""


def first_line(e: BaseException | str, limit: int = MAX_FIRST_LINE) -> str:
    """The first non-empty line of an exception's message (or its type name), at most ``limit`` chars,
    without terminal escape sequences or control characters (a message may quote a hostile file)."""
    text = _CONTROL.sub("", e if isinstance(e, str) else str(e))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith(":") and i + 1 < len(lines):  # "Error(s) in loading state_dict for X:" names nothing
            line = f"{line} {lines[i + 1]}"
        if line:
            if len(line) <= limit:
                return line
            cut = line.rfind(". ", 0, limit)  # end at a sentence, not mid-word
            return line[:cut + 1] if cut >= limit // 3 else line[:limit - 1].rstrip() + "…"
    return type(e).__name__ if not isinstance(e, str) else ""


def bounded(value: object) -> str:
    """A short ``repr`` of any value, safe for error messages: nested, aliased or huge structures
    are cut at a few items and characters instead of being expanded."""
    try:
        return _repr.repr(value)
    except Exception:  # a hostile __repr__
        return f"<{type(value).__name__}>"
