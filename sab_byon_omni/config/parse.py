"""Reading configs: YAML files (safe, no aliases, bounded), flags and the configs inside checkpoints,
merged into one mapping and built into the dataclasses of :mod:`.schema` by jsonargparse. Flat guide
keys, dotted overrides and the earlier spellings of renamed keys are routed here."""

from __future__ import annotations

import functools
import re
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from sab_byon_omni.config.schema import (
    FIELD_SECTION,
    FIELD_TYPES,
    PRESET_FIELDS,
    PRESETS,
    SECTIONS,
    RunConfig,
    did_you_mean,
    expected,
)
from sab_byon_omni.errors import SabError, bounded, first_line

# Keys renamed to say what they are: old name -> (new name, old value -> new value). The old
# spellings (in configs, flags and the checkpoints of earlier versions) keep working.
RENAMED: dict[str, tuple[str, Any]] = {
    "length_bucketing": ("length_bucket_size", lambda v: v),
    "micro_batch_size": ("auto_micro_batch", lambda v: {"auto": True, "fixed": False}.get(v, v) if isinstance(v, str)
                         else v),
}
# Fields whose words YAML 1.1 reads as booleans (``memory_saving: off`` is False): the words back.
SPELLINGS: dict[str, Any] = {"memory_saving": lambda v: ("on" if v else "off") if isinstance(v, bool) else v}


def renamed(name: str, value: Any) -> tuple[str, Any]:
    """(current name, value) for a possibly old key, with YAML's booleans back as the words meant."""
    new, convert = RENAMED.get(name) or (name, SPELLINGS.get(name, lambda v: v))
    return new, convert(value)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _plain(name: str, value: Any, hint: Any) -> Any:
    """A value as jsonargparse is given it. A string for a number or a switch (a flag, a quoted value,
    YAML 1.1's ``3e-4``) is read here: jsonargparse would read it as YAML with aliases, where a
    short string can expand to gigabytes. Where None is allowed, ``none``, ``null`` and an empty
    string mean None; a whole float (``3.0``) is an integer; a number is the text of a string field."""
    args = typing.get_args(hint)
    optional, base = type(None) in args, next(a for a in (*args, hint) if a is not type(None))
    if value is None or optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "~", ""):
        if optional:
            return None
        raise SabError(f"{name} must not be empty")
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `dataset: 2024`, a folder named 2024
    if isinstance(value, str) and base in (int, float, bool):
        word = value.strip().lower()
        if base is bool and word in (*_TRUE, *_FALSE):
            return word in _TRUE
        try:  # int() first, so that a 20-digit seed stays exact
            value = int(word) if base is int and word.lstrip("+-").replace("_", "").isdigit() else float(word)
        except ValueError:
            if sum(c.isdigit() for c in word) > 100:  # int() refuses over 4,300 digits
                raise SabError(f"{name}={bounded(value)} is too large (a number of "
                               f"{sum(c.isdigit() for c in word):,} digits)") from None
            raise SabError(f"{name}={bounded(value)} {expected(hint)}") from None
    return int(value) if base is int and isinstance(value, float) and value.is_integer() else value


def _route(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    """A sectioned or flat mapping (or both, with earlier spellings) as ``{section: {field: value}}``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SabError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    routed: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in raw.items():
        if key in SECTIONS and not isinstance(value, (dict, type(None))):
            raise SabError(f"{source}: section {bounded(key)} must be a mapping, got {type(value).__name__}")
        for given, v in (value or {}).items() if key in SECTIONS else [(key, value)]:
            name, v = renamed(given, v) if isinstance(given, str) else (given, v)
            section = FIELD_SECTION.get(name) if isinstance(name, str) else None
            if section is None or (key in SECTIONS and section != key):
                where = f"{key}.{given}" if key in SECTIONS else key
                known = [f.name for f in fields(SECTIONS[key])] if key in SECTIONS else [*SECTIONS, *FIELD_SECTION]
                raise SabError(f"{source}: unknown key {bounded(where)}{did_you_mean(given, known)}")
            routed[section][name] = v
    return routed


@functools.cache
def _checker() -> Any:
    """jsonargparse's parser of RunConfig mappings, built once (imported here, not for ``--help``)."""
    from jsonargparse import ArgumentParser

    # parser_mode json: strings it reads itself (those of string fields) are read as JSON, never YAML with aliases
    parser = ArgumentParser(exit_on_error=False, parser_mode="json")
    parser.add_class_arguments(RunConfig, nested_key=None)
    return parser


def build_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a (sectioned or flat) mapping into a RunConfig; unknown keys are errors."""
    from jsonargparse import ArgumentError

    routed = _route(raw, source)
    if isinstance(preset := routed["model"].get("preset"), str) and preset in PRESETS:  # the whole set; given win
        routed["model"] = {**PRESETS[preset], **routed["model"]}
    typed = {s: {k: _plain(f"{s}.{k}", v, FIELD_TYPES[s][k]) for k, v in section.items()} for s, section in routed.items()}
    parser = _checker()
    try:
        built = parser.instantiate(parser.parse_object(typed, defaults=False))  # the dataclasses hold the defaults
    except ArgumentError as e:  # "Parser key "train.epochs":\n  Expected a <class 'int'>. Got value: ..."
        found = re.search(r'key "(\w+)\.(\w+)"', str(e))
        if not found or found[2] not in FIELD_TYPES.get(found[1], {}):
            raise SabError(f"{source}: {first_line(e)}") from None
        section, name = found.groups()
        value = typed[section].get(name)
        raise SabError(f"{section}.{name}={bounded(value)} {expected(FIELD_TYPES[section][name], value)}") from None
    except (RecursionError, OverflowError) as e:
        raise SabError(f"{source}: a value is {'nested too deeply' if isinstance(e, RecursionError) else 'too large'}") \
            from None
    return RunConfig(**{s: built[s] for s in SECTIONS})


MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a config is small and flat, and an alias is how a
    few hundred bytes of YAML expand into gigabytes ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in a config (line {mark.line + 1})")
        return super().compose_node(parent, index)


def config_dirs() -> list[Path]:
    """Where named configs live: inside the installed package, or the repository's configs/."""
    package = Path(__file__).resolve().parents[1]  # sab_byon_omni/
    return [package / "configs", package.parent / "configs"]


def named_configs() -> list[str]:
    return sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def resolve_config(name: str | Path) -> Path:
    """A config file by path, or by name (``lightweight``, ``default``) from the shipped configs."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.parent == Path(".") and not p.exists():
        for d in config_dirs():
            for candidate in (d / p.name, d / f"{p.name}.yaml"):
                if candidate.is_file():
                    return candidate
    raise SabError(f"config file not found: {str(name)[:200]} (a path, or one of the shipped configs: "
                   f"{', '.join(named_configs()) or 'none found'})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config(path)
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise SabError(f"{p}: {p.stat().st_size:,} bytes is too large for a config file")
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        why = str(getattr(e, "problem", None) or e).strip().splitlines() or ["unreadable"]
        raise SabError(f"{p}: invalid YAML{at}: {why[0][:160]}") from None
    except UnicodeDecodeError:
        raise SabError(f"{p}: not a UTF-8 text file") from None
    except ValueError as e:  # PyYAML's int() of 5,000 digits, a date like 2024-13-45: not YAMLErrors
        why = "an integer of more than 4,300 digits" if "digits" in str(e) else first_line(e, 120)
        raise SabError(f"{p}: a value in it cannot be read ({why})") from None
    except RecursionError:
        raise SabError(f"{p}: nested too deeply to be a config") from None
    except OSError as e:
        raise SabError(f"cannot read {p}: {e.strerror or e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise SabError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    return raw or {}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``raw`` sectioned, with ``{"train.learning_rate": 3e-4}`` or ``{"learning_rate": 3e-4}`` merged in."""
    merged = _route(raw, source)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        name, value = renamed(name, value)
        section = section or FIELD_SECTION.get(name, "")
        if FIELD_SECTION.get(name) != section:
            raise SabError(f"unknown option {bounded(key)}{did_you_mean(name, FIELD_SECTION)}")
        merged[section][name] = value
    return merged


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML file (or the defaults) and apply dotted overrides."""
    raw = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    cfg = build_config(apply_overrides(raw, overrides or {}, source), source=source)
    if {"max_seq_len", "model.max_seq_len"} & (overrides or {}).keys() and cfg.model.max_seq_len < cfg.data.seq_len:
        # a model's own max_seq_len (its preset's) is raised to seq_len when it is shorter; a flag is never overruled
        raise SabError(f"model.max_seq_len={cfg.model.max_seq_len} is below data.seq_len={cfg.data.seq_len}: a "
                       "model cannot train on windows longer than its context; raise --max_seq_len or lower --seq_len")
    return cfg


def replace(cfg: RunConfig, **overrides: Any) -> RunConfig:
    """A new validated RunConfig with flat or dotted overrides applied. A new preset brings its whole
    set of dimensions, except those overridden in the same call."""
    base = cfg.to_dict()
    if {"preset", "model.preset"} & overrides.keys():
        base["model"] = {k: v for k, v in base["model"].items() if k not in PRESET_FIELDS}
    return build_config(apply_overrides(base, overrides))


def field_help(cls: type) -> list[tuple[str, Any, str, Any]]:
    """(name, default, help, annotation) for each field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return [(f.name, f.default, f.metadata.get("help", ""), hints[f.name]) for f in fields(cls)]
