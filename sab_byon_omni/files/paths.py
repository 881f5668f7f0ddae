"""What a name given on the command line looks like, before anything is opened."""

from __future__ import annotations

from pathlib import Path

LOCAL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".gguf", ".json", ".yaml", ".yml")


def looks_local(text: str) -> bool:
    """Whether ``text`` names a local file rather than a Hub id ``user/name``: a model file's suffix
    (``runs/nope.pt``), a path that starts with ``./``, ``../``, ``/`` or ``~``, or one whose folder
    exists here (``runs/nope`` beside ``runs/``). Such a name that is missing is not in the Hub's
    cache either, and gets no download hint."""
    if text.lower().endswith(LOCAL_SUFFIXES) or text.startswith((".", "/", "~")):
        return True
    parent = Path(text).parent
    return str(parent) not in ("", ".") and parent.is_dir()
