"""``sab-omni``: a thin command line over the library.

Each command lives in ``sab_byon_omni/commands/<name>.py`` with ``register(subparsers)`` (adds its
parser, with help and an example) and ``run(args) -> int``. Bad input anywhere ends as one line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sab_byon_omni import __version__
from sab_byon_omni.errors import SabError

COMMANDS = ("train", "eval", "generate", "estimate", "bench", "plot", "export", "consolidate")


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one ``error:`` line with exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SabError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    parser = Parser(prog="sab-omni", description="Train and sample causal transformer language models.",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
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
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                            stream=sys.stderr)
        return int(args._run(args) or 0)
    except SabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
