"""sab-omni chat: talk to a model, its answers streamed as they are sampled.

Each line you type is a user turn; the conversation is rendered with the model's chat template (or
the default one, docs/CHAT.md) and the answer stops at the template's end of turn. The oldest
exchanges are dropped when the history no longer fits the model's context (a note says so on
stderr). /reset forgets the conversation, /exit (or end of input) leaves; Ctrl-C stops an answer and
a second Ctrl-C at the prompt leaves. When stdin is not a terminal, prompts are read from it line
by line and only the answers are written to stdout, one line each: a session can be scripted.
"""

from __future__ import annotations

import argparse
import sys

from sab_byon_omni.commands.common import check_paths_first
from sab_byon_omni.commands.generate import add_sampling_flags
from sab_byon_omni.estimate import plural

EXAMPLE = """examples:
  sab-omni chat --checkpoint run/best_model.pt
  sab-omni chat --checkpoint model.gguf --system "You answer in one sentence." --temperature 0
  printf 'What is the capital of France?\\n/exit\\n' | sab-omni chat --checkpoint model.gguf --temperature 0
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="talk to a model (interactive, or prompts from stdin)", description=__doc__,
                       epilog=EXAMPLE)
    add_sampling_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_paths_first(source=args.checkpoint)
    from sab_byon_omni.commands.generate import load_for_sampling
    from sab_byon_omni.core.chat import ChatSession

    sab, sampling = load_for_sampling(args)
    session = ChatSession(sab, args.system, sampling)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {sab.origin} ({sab.config.model.max_seq_len:,} tokens of context); /reset forgets, "
              "/exit leaves, Ctrl-C stops an answer", file=sys.stderr)
    interrupted, refused, asked = False, 0, 0
    while True:
        try:
            line = input("> ") if tty else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            if interrupted:
                break
            interrupted = True
            print("\n(Ctrl-C again or /exit to leave)", file=sys.stderr)
            continue
        if not line and not tty:
            break  # end of input
        interrupted, text = False, line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation forgotten)", file=sys.stderr)
        elif text:
            asked += 1
            refused += not _answer(session, text, tty)
    if refused and not tty:  # a script learns that some answers are missing
        print(f"error: {refused} of {plural(asked, 'message')} refused "
              "(each has an empty answer line)", file=sys.stderr)
        return 2
    return 0


def _answer(session, text: str, tty: bool = True) -> bool:  # type: ignore[no-untyped-def]
    """Answer ``text`` on stdout; False if it was refused (then, reading a script, an empty answer
    line keeps the answers in step with the messages)."""
    from sab_byon_omni.errors import SabError

    try:
        pieces = session.answer(text)
    except SabError as e:  # a message too long for the context: the session goes on
        print(f"error: {e}", file=sys.stderr)
        if not tty:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return False
    if session.last.dropped:
        print(f"(the oldest {plural(session.last.dropped, 'exchange')} dropped to fit the context)", file=sys.stderr)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
        print("\n(answer stopped)", end="", file=sys.stderr)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return True
