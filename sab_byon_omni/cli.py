"""``sab-omni``: a thin command line over the library.

Each command lives in ``sab_byon_omni/commands/<name>.py`` with ``register(subparsers)`` (adds its
parser, with help and an example) and ``run(args) -> int``. Command modules import only light
modules at the top (torch is imported when a command runs), so ``--help`` answers at once.

Every long flag is accepted as ``--flag-name`` and ``--flag_name``; a flag is never guessed from a
prefix; a mistyped one gets a "did you mean". Bad input anywhere ends as one line ``error: ...``
on stderr and exit status 2; a run stopped by a signal exits with 130.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import signal
import sys
import threading

from sab_byon_omni import __version__
from sab_byon_omni.errors import SabError

COMMANDS = ("train", "eval", "generate", "estimate", "bench", "plot", "export", "consolidate")
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


class Parser(argparse.ArgumentParser):
    """argparse that never guesses a flag from its prefix, accepts ``-``/``_`` spellings alike, and
    reports bad arguments as one ``error:`` line (with a "did you mean") and exit 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SabError(f"{self.prog}: {message}{self._suggestion(message)}")

    def _suggestion(self, message: str) -> str:
        found = re.search(r"unrecognized arguments: (\S+)", message)
        if not found:
            return ""
        word = found.group(1).split("=", 1)[0]
        known = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(word.replace("-", "_"), [k.replace("-", "_") for k in known], n=1,
                                          cutoff=0.75)
        return f" (did you mean {known[[k.replace('-', '_') for k in known].index(close[0])]}?)" if close else ""

    def alias(self, old: str, new: str) -> None:
        """Accept ``old`` as an earlier spelling of the flag ``new`` (not shown in --help)."""
        self._option_string_actions[old] = self._option_string_actions[new]

    def accept_both_spellings(self) -> None:
        """Register ``--a_b`` for every ``--a-b`` (and the reverse), without showing both in --help."""
        for action in list(self._actions):
            for opt in list(action.option_strings):
                if not opt.startswith("--"):
                    continue
                for alt in ("--" + opt[2:].replace("-", "_"), "--" + opt[2:].replace("_", "-")):
                    if alt not in self._option_string_actions:
                        self._option_string_actions[alt] = action


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


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
        p.set_defaults(_run=module.run)
        p.accept_both_spellings()
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's own parser, which knows its flags (for "did you mean")
            command = _subparsers(parser).choices.get(getattr(args, "command", None) or "", parser)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
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
        print("\ninterrupted: stopped without saving; the checkpoints already written are complete", file=sys.stderr)
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
