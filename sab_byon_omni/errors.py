"""The one exception type that user-facing entry points turn into ``error: ...`` and exit 2."""

from __future__ import annotations


class SabError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI): one clear line, no traceback."""
