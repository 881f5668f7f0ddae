"""Shared CLI plumbing: both spellings of a flag, config-dataclass fields as flags, dotted overrides
from them, and the checks of paths that a command makes before it imports torch."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from sab_byon_omni.config import FIELD_SECTION, RENAMED, SECTIONS, field_help
from sab_byon_omni.errors import SabError

PREFIX = "cfg:"


def spellings(*option_strings: str) -> list[str]:
    """The option strings of one argument with each long flag in both spellings, ``--a-b`` and
    ``--a_b`` (the one given first: --help shows it, argparse names the value after it)."""
    out: list[str] = []
    for opt in option_strings:
        out += [opt, "--" + opt[2:].replace("_", "-"), "--" + opt[2:].replace("-", "_")] if opt[:2] == "--" else [opt]
    return list(dict.fromkeys(out))


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "STR"  # the help text names the choices
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(base, "VALUE")


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS),
                     dotted_only: bool = False) -> None:
    """One flag per config field: ``--train.learning_rate``, also ``--learning_rate`` and
    ``--learning-rate`` (only the dotted form with ``dotted_only``, where the short names are
    taken by the command's own flags). Help text and defaults come from the dataclass."""
    for section in sections:
        group = parser.add_argument_group(f"{section} options", SECTIONS[section].__doc__)
        for name, default, help_text, annotation in field_help(SECTIONS[section]):
            flags = [f"--{section}.{name}"] if dotted_only else [f"--{name}", f"--{section}.{name}"]
            kind = _type_name(annotation)
            extra: dict[str, Any] = {"nargs": "?", "const": "true"} if kind == "BOOL" else {}
            shown = "" if default is None or "default" in help_text else f" (default: {_shown(default)})"
            group.add_argument(*spellings(*flags), dest=f"{PREFIX}{section}.{name}", metavar=kind,
                               default=argparse.SUPPRESS, help=f"{help_text}{shown}", **extra)
    for old, (new, _) in RENAMED.items():  # earlier spellings keep working (hidden from --help)
        section = FIELD_SECTION[new]
        flags = [f"--{section}.{old}"] if dotted_only else [f"--{old}", f"--{section}.{old}"]
        parser.add_argument(*spellings(*flags), dest=f"{PREFIX}{section}.{old}", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def _shown(default: Any) -> str:
    return str(default).lower() if isinstance(default, bool) else str(default)


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, as ``{"section.name": "value"}``."""
    return {k[len(PREFIX):]: v for k, v in vars(args).items() if k.startswith(PREFIX)}


def check_paths_first(source: str | None = None, data: str | None = None) -> None:
    """Stop in milliseconds on a path that cannot be right, before the command imports torch
    (seconds, more on a busy machine), with the loaders' own messages: a model ``source`` that is
    neither a file or folder nor shaped like a Hub id ``user/name`` (which the loader looks up in
    the local cache), and a ``data`` file or folder that does not exist."""
    if source is not None and not Path(source).expanduser().exists() and not _maybe_hub_id(source):
        raise SabError(f"checkpoint not found: {source[:200]} (looked for a checkpoint .pt, a .safetensors or .gguf "
                       "file, a folder written by save_pretrained or `sab-omni export`, or a Hub id user/name in the "
                       "local cache)")  # as io.sources.locate says it
    if data and data != "synthetic":
        from sab_byon_omni.data.readers import check_dataset  # numpy, no torch

        check_dataset(data)


def _maybe_hub_id(text: str) -> bool:
    """Shaped like ``user/name`` (io.sources decides whether it is one)."""
    from sab_byon_omni.files.paths import looks_local

    return text.count("/") == 1 and not looks_local(text)
