"""Chat and instruction data: JSONL files of conversations -> token ids with answer-only labels.

A ``.jsonl`` file is chat data when its first record has one of these forms (each later line must
have the same one; the form is chosen per file):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional): the user turn is
  the instruction, then a blank line and the input if there is one; the assistant turn the output.
* ``{"prompt": "...", "completion": "..."}``: one user turn and the assistant's answer.

A record may carry a ``"system"`` string (instruction and prompt forms), which opens the conversation.
A line that is not JSON, has not the file's form, has a role other than system/user/assistant, a
content that is not a string, or no assistant turn is refused as ``file:line: what is wrong``.

:func:`encode_conversation` renders a conversation with the template
(:mod:`~sab_byon_omni.data.chat_template`) and gives its ids with the labels the loss reads: the
assistant's tokens (its text and the end of its turn) are labels, every other token is
``IGNORE_INDEX``. :func:`cut_to_fit` cuts a conversation longer than ``seq_len`` at the ends of its
assistant turns; an exchange (prompt and answer) longer than ``seq_len`` on its own is refused.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sab_byon_omni.data.batching import IGNORE_INDEX
from sab_byon_omni.data.chat_template import ROLES, ChatTemplate, assistant_segments
from sab_byon_omni.errors import SabError, bounded

FORMATS = ("messages", "instruction", "prompt")
CHAT_EXTENSIONS = (".jsonl", ".ndjson")
MAX_LINE_CHARS = 1 << 26  # a record of 64 M characters is no conversation


def record_format(record: Any) -> str | None:
    """The chat form of a parsed JSONL record (one of :data:`FORMATS`), or None (not chat data)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt"
    return None


CHAT_KEYS = ("messages", "instruction", "input", "output", "prompt", "completion", "system")
FORMS_IN_WORDS = "messages, instruction/output (input optional) or prompt/completion"


def did_you_mean(keys: Any, accepted: Any) -> str:
    """``"; did you mean 'messages'?"`` for the first key that is close to an accepted one without
    being one (a typo), else ""."""
    accepted = list(dict.fromkeys(accepted))
    for key in keys:
        if isinstance(key, str) and key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.8)
            if close:
                return f"; did you mean {close[0]!r}?"
    return ""


def key_list(record: dict) -> str:
    """The keys of a record, for a message (bounded)."""
    keys = [k if isinstance(k, str) else repr(k) for k in record]
    shown = ", ".join(k[:40] for k in keys[:12])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "") if keys else "none"


def first_record(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, ValueError, RecursionError):
        return None
    return None


def file_format(path: Path) -> str | None:
    """The chat form of a file (its first record's), or None for a file that is not chat data."""
    if path.suffix.lower() not in CHAT_EXTENSIONS:
        return None
    return record_format(first_record(path))


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise SabError(f"{where}: {what} is {bounded(value)}, not a string")
    return value


def messages_of(record: Any, form: str, where: str) -> list[dict[str, str]]:
    """The conversation of one record of form ``form``, checked (``where`` is ``file:line``)."""
    if record_format(record) != form:
        hint = did_you_mean(record, CHAT_KEYS) if isinstance(record, dict) else ""
        raise SabError(f"{where}: not a {form!r} record like the file's first one (keys "
                       f"{bounded(sorted(record)) if isinstance(record, dict) else bounded(record)}{hint})")
    system = record.get("system")
    head = [{"role": "system", "content": _text(system, "'system'", where)}] if system is not None else []
    if form == "instruction":
        user = _text(record["instruction"], "'instruction'", where)
        extra = _text("" if record.get("input") is None else record["input"], "'input'", where)  # 0 / false refused
        return head + [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                       {"role": "assistant", "content": _text(record["output"], "'output'", where)}]
    if form == "prompt":
        return head + [{"role": "user", "content": _text(record["prompt"], "'prompt'", where)},
                       {"role": "assistant", "content": _text(record["completion"], "'completion'", where)}]
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise SabError(f"{where}: 'messages' is {bounded(raw)}, not a list of messages")
    out = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise SabError(f"{where}: message {i} is {bounded(m)}, not an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise SabError(f"{where}: message {i} has no {key!r} (keys: {key_list(m)}"
                               f"{did_you_mean(m, ('role', 'content'))})")
        if m.get("role") not in ROLES:
            raise SabError(f"{where}: message {i} has role {bounded(m.get('role'))}; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"message {i}'s content", where)})
    if not any(m["role"] == "assistant" for m in out):
        raise SabError(f"{where}: the conversation has no assistant turn: nothing to learn from")
    return out


def read_conversations(path: Path, form: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(``file:line``, messages) for every record of a chat file of form ``form``."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if len(line) > MAX_LINE_CHARS:
                raise SabError(f"{where}: a line of {len(line):,} characters is more than a record can need")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise SabError(f"{where}: not a JSON record") from None
            yield where, messages_of(record, form, where)


@dataclass
class Encoded:
    """One conversation as ids, labels (IGNORE_INDEX but on the assistant's tokens) and the ends of
    its exchanges (token offsets after each assistant turn: where it may be cut)."""

    ids: np.ndarray
    labels: np.ndarray
    turn_ends: list[int]


def encode_texts(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Ids of each text, with no token the tokenizer adds around a text (a BOS): the template writes those."""
    if tokenizer.name == "hf":
        return tokenizer.encode_batch(texts, add_special_tokens=False)
    return tokenizer.encode_batch(texts)


def encode_conversation(tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]]) -> Encoded:
    """Render ``messages`` with ``template`` and encode them piece by piece (see the module doc)."""
    pieces = assistant_segments(template, messages)
    encoded = encode_texts(tokenizer, [text for text, _ in pieces])
    ids = np.concatenate([np.zeros(0, dtype=np.int64), *encoded]).astype(np.int64)
    labels = np.concatenate([np.zeros(0, dtype=np.int64)] + [
        e if answer else np.full(len(e), IGNORE_INDEX, dtype=np.int64) for e, (_, answer) in zip(encoded, pieces)])
    ends = np.cumsum([len(e) for e in encoded])[1::2].tolist()
    return Encoded(ids, labels.astype(np.int64), ends)


def cut_to_fit(conv: Encoded, seq_len: int, where: str) -> list[Encoded]:
    """``conv`` as samples of at most ``seq_len`` tokens, cut only at the ends of exchanges (each
    sample holds whole prompt-and-answer exchanges); an exchange longer than ``seq_len`` is refused."""
    if len(conv.ids) <= seq_len:
        return [conv]
    out, start, last = [], 0, 0
    for end in conv.turn_ends:
        if end - last > seq_len:
            raise SabError(f"{where}: one exchange (prompt and answer) is {end - last:,} tokens, more than "
                           f"data.seq_len={seq_len}: raise --seq_len or shorten it")
        if end - start > seq_len:
            out.append(Encoded(conv.ids[start:last], conv.labels[start:last], []))
            start = last
        last = end
    out.append(Encoded(conv.ids[start:last], conv.labels[start:last], []))
    return out
