"""``sab-omni``: a thin command line over the library.

Each command lives in ``sab_byon_omni/commands/<name>.py`` with ``register(subparsers)`` (adds its
parser, with help and an example) and ``run(args) -> int``. Command modules import only light
modules at the top (torch is imported when a command runs), so ``--help`` answers at once.

Every long flag is declared as ``--flag-name`` and ``--flag_name`` (--help shows the first); a flag
is never guessed from a prefix; a mistyped one gets a "did you mean". Bad input anywhere ends as one
line ``error: ...`` on stderr and exit status 2; a run stopped by a signal exits with 130.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

from sab_byon_omni import __version__
from sab_byon_omni.commands.common import spellings
from sab_byon_omni.errors import SabError

COMMANDS = ("train", "eval", "generate", "chat", "estimate", "bench", "plot", "export", "consolidate")
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain(text: str | None) -> str | None:
    """Help text without reStructuredText markup (``code``, :func:`name`)."""
    if not text:
        return text
    return _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text).replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text) or "")

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action)) or ""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        """Each flag in the spelling given first: ``--max-new-tokens``, not also ``--max_new_tokens``."""
        shown, seen = copy.copy(action), set()
        shown.option_strings = []
        for o in action.option_strings:
            if o.replace("_", "-") not in seen:
                shown.option_strings.append(o)
                seen.add(o.replace("_", "-"))
        return super()._format_action_invocation(shown)


class Parser(argparse.ArgumentParser):
    """argparse that never guesses a flag from its prefix, declares each long flag in both spellings,
    and reports bad arguments as one ``error:`` line (with a "did you mean") and exit 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._words: list[str] = []  # the words the last parse read (for an unknown flag's report)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        """argparse's, with each long flag in both spellings (:func:`spellings`)."""
        return super().add_argument(*spellings(*names), **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """argparse's, remembering the words it parses (an unknown flag is reported before a missing one)."""
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("the following arguments are required") and (unknown := self._unknown_flags()):
            message = f"unrecognized arguments: {' '.join(unknown)}"  # the cause, more likely than the symptom
        raise SabError(f"{self.prog}: {message}{self._suggestion(message)}")

    def _unknown_flags(self) -> list[str]:
        """The words parsed that look like long flags this parser does not know (``--promt``)."""
        known = self._option_string_actions
        return [w for w in self._words if w[:2] == "--" and len(w) > 2 and w.split("=", 1)[0] not in known]

    def _suggestion(self, message: str) -> str:
        found = re.search(r"unrecognized arguments: (\S+)", message)
        if not found:
            return ""
        word = found.group(1).split("=", 1)[0].replace("-", "_")
        # the flags --help shows (argparse lists its actions only in _actions; read, never written)
        known = [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o[:2] == "--"]
        close = difflib.get_close_matches(word, [k.replace("-", "_") for k in known], n=1, cutoff=0.75)
        return f" (did you mean {known[[k.replace('-', '_') for k in known].index(close[0])]}?)" if close else ""


def build_parser() -> Parser:
    parser = Parser(prog="sab-omni", description="Train and sample causal transformer language models.")
    parser.add_argument("--version", action="version", version=f"sab-omni {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sab_byon_omni.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sab_byon_omni.commands.{name}":
                continue  # command not available in this build
            raise
        p = module.register(sub)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="log warnings and errors only")
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's own parser, which knows its flags (for "did you mean")
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        from sab_byon_omni.training.console import install_handler

        install_handler(level=logging.WARNING if args.quiet else logging.INFO)
        return int(args._run(args) or 0)
    except SabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted" + (": stopped at once; the checkpoints already written are complete"
                                 if getattr(args, "command", None) == "train" else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sab-omni ... | head`: the reader left; not an error of ours
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into the closed pipe is silent."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def entry() -> int:
    """The ``sab-omni`` program: :func:`main`, then deaf to Ctrl-C while the interpreter shuts down,
    so that a late second Ctrl-C cannot turn a clean exit (0, 2 or 130) into a crash."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(entry())
