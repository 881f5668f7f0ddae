"""Chat templates: a conversation (a list of ``{"role", "content"}`` messages) -> the text a model
reads, rendered as ``transformers``' ``apply_chat_template`` renders it.

The template is the tokenizer's own (``hf`` tokenizers carry the one their model was published
with), else :data:`DEFAULT_TEMPLATE`. A template comes from a file we did not write, so it runs only
in jinja2's ``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation
of its inputs, ranges of at most 100,000), with transformers' options (``trim_blocks``,
``lstrip_blocks``, the ``raise_exception`` function, ``tojson`` that does not escape HTML), and
its output is cut off past :data:`MAX_RENDERED_CHARS`. Beyond jinja2's sandbox (:class:`_BoundedSandbox`):
an operation that would build a string or list larger than that limit (``'a' * n``, ``'%0*d' % (n, 1)``,
``x.ljust(n)``, ``tojson(indent=n)``, the ``center``/``indent`` filters) is refused before it runs,
``**`` takes exponents up to 1,024, ``lipsum`` is gone, nesting too deep to compile is refused, and a
compile or render that runs longer than :data:`MAX_RENDER_SECONDS` (nested loops) is stopped. A
template that fails, loops, or would exhaust memory is one clear line, not a hang or a traceback.

:func:`assistant_segments` splits a rendered conversation into the parts the loss ignores and the
assistant's parts it counts; :meth:`ChatTemplate.end_of_turn` finds the text that ends an
assistant turn (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), where sampling stops.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sab_byon_omni.errors import SabError, first_line

MAX_RENDERED_CHARS = 1 << 24  # 16 M characters: far beyond any seq_len, far below a memory problem
MAX_RENDER_SECONDS = 10.0  # a real template renders a conversation in milliseconds
MAX_EXPONENT = 1024
_WIDE = re.compile(r"\d{8,}")  # a width or precision of 10^7 or more in a format string
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


class _TemplateTooBig(Exception):
    """An operation inside a template that would build too much (see :class:`_BoundedSandbox`)."""


class _TemplateTimeout(Exception):
    """A template that ran longer than :data:`MAX_RENDER_SECONDS`."""


def _check_size(n: Any, what: str) -> None:
    if isinstance(n, (int, float)) and not isinstance(n, bool) and abs(n) > MAX_RENDERED_CHARS:
        raise _TemplateTooBig(f"{what} of {n:,.0f} characters or items (at most {MAX_RENDERED_CHARS:,})")


_WIDTH_FROM_ARGS = re.compile(r"%[-+ #0]*\*|%[-+ #0]*\d*\.\*|:[^{}]*\{")  # '%*d', '%.*f', '{0:>{1}}'


def _check_format(fmt: str, args: Any) -> None:
    """A ``%`` or ``str.format`` call whose widths would build a huge string: written in the format
    string, or taken from its arguments (``*``, a nested ``{}``); a large number merely printed is fine."""
    if _WIDE.search(fmt):
        raise _TemplateTooBig("a format width of 10^7 or more")
    if _WIDTH_FROM_ARGS.search(fmt):
        for a in args if isinstance(args, (tuple, list)) else (args,):
            _check_size(a, "a format argument")


def _bounded_sandbox() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _BoundedSandbox(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox with what it leaves open closed: operators and string methods
        that build a string or list of any size in one step, and huge powers."""

        intercepted_binops = frozenset({"*", "%", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool):
                        _check_size(len(seq) * n, "a repeated string or list")
            elif operator == "%" and isinstance(left, str):
                _check_format(left, right)
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise _TemplateTooBig(f"an exponent of {right:,.0f} (at most {MAX_EXPONENT:,})")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            bare = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            owner, name = getattr(bare, "__self__", None), getattr(bare, "__name__", "")
            if isinstance(owner, str):
                if name in ("ljust", "rjust", "center", "zfill", "expandtabs"):
                    for a in (*args, *kwargs.values()):
                        _check_size(a, f"str.{name}")
                    if name == "expandtabs":
                        _check_size(owner.count("\t") * (args[0] if args and isinstance(args[0], int) else 8),
                                    "str.expandtabs")
                elif name in ("format", "format_map"):
                    _check_format(owner, (*args, *kwargs.values()))
            return super().call(__context, __obj, *args, **kwargs)

    return _BoundedSandbox


def _center(value: Any, width: Any = 80) -> str:
    _check_size(width, "the center filter")
    return str(value).center(width)


def _indent(value: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    from jinja2.filters import do_indent

    _check_size(len(str(value)) * (width if isinstance(width, int) else len(str(width))), "the indent filter")
    return do_indent(value, width, first, blank)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_TemplateTimeout` in this (the main) thread after ``seconds``; elsewhere, or
    where the platform has no interval timer, no limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _TemplateTimeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > 64:
        raise _TemplateTooBig(f"tojson's indent of {indent if isinstance(indent, int) else len(indent)} (at most 64)")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the tokenizer's ``bos_token`` / ``eos_token`` strings."""

    def __init__(self, source: str | None = None, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "the chat template") -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols

        self.source = source if source else DEFAULT_TEMPLATE
        self.is_default = not source or source == DEFAULT_TEMPLATE
        self.where = "the default chat template" if self.is_default else where
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters.update(tojson=_tojson, center=_center, indent=_indent)
        env.globals.pop("lipsum", None)  # lorem ipsum of any length: no chat template needs it
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            with _time_limit(MAX_RENDER_SECONDS):
                self._template = env.from_string(self.source)
        except TemplateError as e:
            raise SabError(f"{self.where}: not a jinja2 template jinja2 can compile: {first_line(e)}") from None
        except RecursionError:
            raise SabError(f"{self.where}: nested too deeply for jinja2 to compile") from None
        except (MemoryError, _TemplateTimeout):
            raise SabError(f"{self.where}: too large for jinja2 to compile within {MAX_RENDER_SECONDS:g} s") from None

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
            with _time_limit(MAX_RENDER_SECONDS):
                for piece in self._template.generate(messages=list(messages),
                                                     add_generation_prompt=add_generation_prompt, **self.special):
                    size += len(piece)
                    if size > MAX_RENDERED_CHARS:
                        raise SabError(f"{self.where} renders more than {MAX_RENDERED_CHARS:,} characters for one "
                                       "conversation: refused")
                    pieces.append(piece)
        except _TemplateRaised as e:
            raise SabError(f"{self.where} refuses this conversation: {first_line(str(e))}") from None
        except _TemplateTooBig as e:
            raise SabError(f"{self.where} would build too much: {e}: refused") from None
        except _TemplateTimeout:
            raise SabError(f"{self.where} ran longer than {MAX_RENDER_SECONDS:g} s for one conversation "
                           "(a loop without end?): refused") from None
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
