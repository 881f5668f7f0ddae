"""Stopping safely on Ctrl-C (SIGINT) and SIGTERM (SLURM, Kubernetes, Colab).

The first signal prints at once what will happen and sets a flag; the trainer then stops at the
next point where a resume stays exact, saves, and the run exits with status 130. A second signal
stops at once without saving: the checkpoints already on disk are complete files (every save is
atomic), so nothing is lost but the work since the last one.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

EXIT_STOPPED = 130  # the shell's convention for a run ended by SIGINT


class StopRequest:
    """A flag set by the first SIGINT/SIGTERM while installed; the second raises KeyboardInterrupt."""

    def __init__(self, message: Callable[[int], str], write: Callable[[str], None] | None = None) -> None:
        self.signum: int | None = None
        self._message, self._write = message, write or (lambda s: print(s, file=sys.stderr, flush=True))
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signum = signum
        try:
            self._write(self._message(signum))
        except Exception:  # never let a failed print turn a clean stop into a crash
            pass

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
