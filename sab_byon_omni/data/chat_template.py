"""Chat templates: a conversation (a list of ``{"role", "content"}`` messages) -> the text a model
reads, rendered as ``transformers``' ``apply_chat_template`` renders it.

The template is the tokenizer's own (``hf`` tokenizers carry the one their model was published
with), else :data:`DEFAULT_TEMPLATE`. A template comes from a file we did not write, so it runs only
in jinja2's ``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation
of its inputs, ranges of at most 100,000), with transformers' options (``trim_blocks``,
``lstrip_blocks``, the ``raise_exception`` function, ``tojson`` that does not escape HTML), and
its output is cut off past :data:`MAX_RENDERED_CHARS`: a template that fails, loops over huge ranges
or renders without end is one clear line, not a hang or a traceback.

:func:`assistant_segments` splits a rendered conversation into the parts the loss ignores and the
assistant's parts it counts; :meth:`ChatTemplate.end_of_turn` finds the text that ends an
assistant turn (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), where sampling stops.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sab_byon_omni.errors import SabError, first_line

MAX_RENDERED_CHARS = 1 << 24  # 16 M characters: far beyond any seq_len, far below a memory problem
ROLES = ("system", "user", "assistant")

# The template used when the tokenizer has none (char96, byte, bpe, or an hf tokenizer without one):
# each turn is a role tag line, the text, and an end tag. Every character is printable ASCII or a
# newline, so the char96 tokenizer (which reads a newline as a space) renders it too.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_PROBE = "\u2063sab-probe\u2063"  # a text no template writes around an answer


class _TemplateRaised(Exception):
    """What a template's ``raise_exception(message)`` raises."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the tokenizer's ``bos_token`` / ``eos_token`` strings."""

    def __init__(self, source: str | None = None, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "the chat template") -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source if source else DEFAULT_TEMPLATE
        self.is_default = not source
        self.where = "the default chat template" if self.is_default else where
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise SabError(f"{self.where}: not a jinja2 template jinja2 can compile: {first_line(e)}") from None

    @classmethod
    def of(cls, tokenizer: Any) -> "ChatTemplate":
        """The template of a tokenizer: its own (an ``hf`` tokenizer's), else the default."""
        tokens = getattr(tokenizer, "tokens", {}) or {}
        return cls(getattr(tokenizer, "chat_template", None), tokens.get("bos"), tokens.get("eos"),
                   f"the chat template of {getattr(tokenizer, 'source', 'the tokenizer')}")

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The text of ``messages``; ``add_generation_prompt`` appends what opens an assistant turn."""
        from jinja2 import TemplateError

        pieces, size = [], 0
        try:
            for piece in self._template.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 **self.special):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise SabError(f"{self.where} renders more than {MAX_RENDERED_CHARS:,} characters for one "
                                   "conversation: refused")
                pieces.append(piece)
        except _TemplateRaised as e:
            raise SabError(f"{self.where} refuses this conversation: {first_line(str(e))}") from None
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
                RecursionError, MemoryError) as e:
            raise SabError(f"{self.where} fails: {type(e).__name__}: {first_line(e)}") from None
        return "".join(pieces)

    def end_of_turn(self) -> str | None:
        """The text that follows an assistant's answer (stripped of whitespace), or None if nothing does."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        text = self.render(messages)
        at = text.rfind(_PROBE)
        return (text[at + len(_PROBE):].strip() or None) if at >= 0 else None


def assistant_segments(template: ChatTemplate, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation's text up to its last assistant turn as ``(text, is_assistant)`` pieces.

    For each assistant message ``k`` the prompt is ``render(messages[:k], add_generation_prompt=True)``
    and the turn ``render(messages[:k + 1])``: the assistant's piece is what the turn adds to the
    prompt (its text and the template's end of turn), the piece before it what the prompt adds to the
    previous turn. A template that does not render a conversation as a growing text (each turn
    extending the one before) cannot be split so: a SabError.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:k], add_generation_prompt=True)
        turn = template.render(messages[:k + 1])
        if not prompt.startswith(done) or not turn.startswith(prompt) or len(turn) == len(prompt):
            raise SabError(f"{template.where} does not render this conversation as a growing text (at message "
                           f"{k + 1}): the assistant's part cannot be told from the prompt")
        pieces += [(prompt[len(done):], False), (turn[len(prompt):], True)]
        done = turn
    return pieces
