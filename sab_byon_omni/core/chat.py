"""A conversation with a model: the history rendered with its chat template, answers streamed.

:class:`ChatSession` keeps the messages (an optional system prompt, then user and assistant turns),
renders them with the tokenizer's chat template (or the default, :mod:`~sab_byon_omni.data.chat_template`)
and samples the answer until the template's end of turn (``<|im_end|>``, ``<|eot_id|>``, the
default's ``<|end|>``), the tokenizer's end-of-sequence token, or ``max_new_tokens``.

The history is kept within the model's context: before each answer, the oldest exchanges (a user
turn and the answers to it) are dropped until the prompt leaves room for the answer (at most half
the context is reserved for it); the system prompt is always kept. :meth:`ChatSession.answer` is a
generator of text pieces: closing it early (a Ctrl-C in the reader) ends the answer, and what was
said so far stays in the history.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sab_byon_omni.data.chat import encode_texts
from sab_byon_omni.data.chat_template import ChatTemplate
from sab_byon_omni.device import intra_op_threads, make_precision
from sab_byon_omni.errors import SabError, first_line
from sab_byon_omni.model.generate import decoding_threads, generate_tokens


@dataclass
class Sampling:
    """How answers are sampled (as ``sab-omni generate`` samples)."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None
    precision: str = "auto"
    threads: int | None = None


@dataclass
class Turn:
    """What the last answer did: tokens sampled, seconds, exchanges dropped from the history before it,
    and whether it ended at the end of turn (False: cut by max_new_tokens or stopped)."""

    tokens: int = 0
    seconds: float = 0.0
    dropped: int = 0
    finished: bool = False
    text: str = ""


def _held_back(text: str, stop: str | None) -> tuple[str, bool]:
    """(the part of ``text`` safe to show, whether ``stop`` was reached): text up to ``stop``, less any
    ending that could be the start of it."""
    if not stop:
        return text, False
    at = text.find(stop)
    if at >= 0:
        return text[:at], True
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return text[:-k], False
    return text, False


class ChatSession:
    """A conversation with ``sab`` (a :class:`~sab_byon_omni.core.sab_transcendent.SABTranscendentV2`)."""

    def __init__(self, sab: Any, system: str | None = None, sampling: Sampling | None = None) -> None:
        tok = sab.tokenizer
        self.sab, self.system, self.sampling = sab, system, sampling or Sampling()
        self.history: list[dict[str, str]] = []
        self.last = Turn()
        self.template = ChatTemplate.of(tok)
        self.end_text = self.template.end_of_turn()
        end_id = tok.token_id(self.end_text) if self.end_text and hasattr(tok, "token_id") else None
        self.stop_ids = {i for i in (tok.eos_id, end_id) if i is not None}
        self.context = sab.config.model.max_seq_len
        bare = self.template.render(self._messages([{"role": "user", "content": "Hi"}]), add_generation_prompt=True)
        # a template that opens every conversation with a system turn of its own (SmolLM2's ChatML)
        self.default_system = not system and "system" in bare

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_ids(self) -> tuple[list[int], int]:
        """The ids of the history rendered with the generation prompt, and how many of the oldest
        exchanges were dropped from it to leave room for the answer."""
        room = self.context - min(self.sampling.max_new_tokens, self.context // 2)
        dropped, history = 0, list(self.history)  # the history changes only when the prompt fits
        while True:
            text = self.template.render(self._messages(history), add_generation_prompt=True)
            ids = encode_texts(self.sab.tokenizer, [text])[0].tolist()
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            if len(ids) <= room or len(users) < 2:
                break
            del history[:users[1]]  # the oldest user turn and what answered it
            dropped += 1
        if len(ids) > room:
            with_ = (" with the system prompt" if self.system else
                     " with the template's default system prompt" if self.default_system else "")
            raise SabError(f"the message is {len(ids):,} tokens{with_}, more than the "
                           f"{room:,} the context of {self.context:,} leaves beside the answer: shorten it")
        self.history[:] = history
        return ids, dropped

    def answer(self, text: str) -> Iterator[str]:
        """Add the user's ``text`` and yield the answer as it is sampled (see the module doc)."""
        self.history.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt_ids()
        except SabError:  # refused (too long, or the template refuses it): the session goes on without it
            self.history.pop()
            raise
        self.last = Turn(dropped=dropped)
        return self._stream(ids)

    def _stream(self, ids: list[int]) -> Iterator[str]:
        s, sab, out, shown = self.sampling, self.sab, [], ""
        t0 = time.perf_counter()
        try:
            with make_precision(s.precision, sab.device).autocast(), \
                    intra_op_threads(decoding_threads(sab.device, s.threads, True)):
                for tok in generate_tokens(sab.model, ids, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                           s.seed, None, True):
                    self.last.tokens += 1
                    if tok in self.stop_ids:
                        self.last.finished = True
                        break
                    out.append(tok)
                    visible, ended = _held_back(sab.tokenizer.decode(out), self.end_text)
                    if len(visible) > len(shown) and not visible.endswith("\ufffd"):
                        piece, shown = visible[len(shown):], visible
                        yield piece
                    if ended:
                        self.last.finished = True
                        break
        except ValueError as e:  # non-finite logits from damaged weights
            raise SabError(f"cannot sample: {first_line(e)}") from None
        finally:
            self.last.seconds = time.perf_counter() - t0
            self.last.text = _held_back(sab.tokenizer.decode(out), self.end_text)[0]
            self.history.append({"role": "assistant", "content": self.last.text})
        if len(self.last.text) > len(shown):
            yield self.last.text[len(shown):]


@torch.no_grad()  # as generate_tokens: autocast keeps its cast weights only outside inference_mode
def reply(sab: Any, text: str, system: str | None = None, sampling: Sampling | None = None) -> str:
    """One answer to ``text`` (a conversation of one user turn), whole."""
    return "".join(ChatSession(sab, system, sampling or Sampling()).answer(text))
