"""Stopping safely on Ctrl-C (SIGINT) and SIGTERM (SLURM, Kubernetes, Colab, torchrun).

The first signal prints at once what will happen and sets a flag; the trainer then stops at the
next point where a resume stays exact, saves, and the run exits with status 130. A second signal
stops at once without saving: the checkpoints already on disk are complete files (every save is
atomic), so nothing is lost but the work since the last one.

"At once" holds even while torch is inside one long operation (a forward pass over a very long
sequence can take minutes). Python runs its signal handlers only between bytecodes of the main
thread, so a handler alone would wait for the operation to end. While a :class:`StopRequest` is
installed, the C-level handler also writes each signal's number into a pipe
(``signal.set_wakeup_fd``), and a watchdog thread blocked on that pipe (torch operations release
the GIL) sees every signal when it arrives: it prints the first one's message, and after the
second gives the main thread :data:`GRACE_S` seconds to stop (``KeyboardInterrupt``, which cleans
up a save in progress) before it ends the process itself with ``os._exit(130)``, after calling
``on_hard_exit`` (the trainer's: remove a run folder that this run created and saved nothing in,
as a run that fails before its first checkpoint does).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

EXIT_STOPPED = 130  # the shell's convention for a run ended by SIGINT
GRACE_S = 1.0  # after a second signal: how long the main thread has to stop before the process ends
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_fork_hook_installed = False
_wakeup_pipe: int | None = None  # the write end a StopRequest installed in this process (a forked child drops it)


class StopRequest:
    """A flag set by the first SIGINT/SIGTERM while installed; the second raises KeyboardInterrupt
    in the main thread, or ends the process after :data:`GRACE_S` if the main thread is busy in C."""

    def __init__(self, message: Callable[[int], str], write: Callable[[str], None] | None = None,
                 on_hard_exit: Callable[[], None] | None = None) -> None:
        self.signum: int | None = None
        self._on_hard_exit = on_hard_exit
        self._message, self._write = message, write or (lambda s: print(s, file=sys.stderr, flush=True))
        self._old: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None  # (read, write) ends while the watchdog runs
        self._old_wakeup = -1
        self._watchdog: threading.Thread | None = None
        self._done = threading.Event()  # set when the context exits: the watchdog must not end the process
        self._handled = 0  # signals the Python-level handler has run for (fewer than arrived: the main thread is in C)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may install handlers: the caller's own stay in force
        self._done.clear()
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        self._start_watchdog()
        return self

    def _start_watchdog(self) -> None:
        global _wakeup_pipe
        try:
            r, w = os.pipe()
        except OSError:
            return  # no watchdog: the handler alone (a second signal waits for the main thread)
        try:
            os.set_blocking(w, False)  # the C handler must never block
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return
        self._pipe, _wakeup_pipe = (r, w), w
        _drop_wakeup_fd_in_forked_children()
        self._watchdog = threading.Thread(target=self._watch, args=(r,), name="sab-stop-watchdog", daemon=True)
        self._watchdog.start()

    def _handle(self, signum: int, frame: Any) -> None:
        """The Python-level handler (main thread, between bytecodes)."""
        self._handled += 1
        if self.signum is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self._watchdog is None:  # else the watchdog said it when the signal came
            self._say(signum)

    def _watch(self, r: int) -> None:
        """The watchdog thread: every SIGINT/SIGTERM byte the C handler writes, as it arrives."""
        seen = 0
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:  # the write end closed: the context has exited
                return
            for signum in data:
                if signum not in SIGNALS or self._done.is_set():
                    continue
                seen += 1
                if seen == 1:
                    self._say(signum)
                    continue
                if not self._done.wait(GRACE_S):  # the main thread did not stop: busy in C code, or a slow cleanup
                    _hard_exit(signum, self._on_hard_exit, in_c=self._handled < seen)
                return

    def _say(self, signum: int) -> None:
        try:
            self._write(self._message(signum))
        except Exception:  # never let a failed print turn a clean stop into a crash
            pass

    def __exit__(self, *exc: Any) -> None:
        global _wakeup_pipe
        self._done.set()
        if self._pipe is not None:
            r, w = self._pipe
            try:
                signal.set_wakeup_fd(self._old_wakeup)  # before the pipe closes: the C handler writes to it
            except (ValueError, OSError):
                pass
            _wakeup_pipe = None
            os.close(w)  # the watchdog reads the end of the pipe and returns
            if self._watchdog is not None:
                self._watchdog.join(timeout=5)
            if self._watchdog is None or not self._watchdog.is_alive():  # (else it may read it yet: leave it open)
                os.close(r)
            self._pipe, self._watchdog = None, None
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


def _hard_exit(signum: int, before: Callable[[], None] | None = None, in_c: bool = True) -> None:
    """End the process now, after ``before`` (no other cleanup runs: a save in progress leaves a
    temporary file, which the next run in the folder removes). ``in_c``: Python's handler had not
    run for every signal (the main thread was inside one C call), which the message says only then."""
    if before is not None:
        try:
            before()
        except Exception:  # the process ends whatever the cleanup met
            pass
    why = ("torch was inside one long operation" if in_c else
           f"the interrupted run had not finished stopping within {GRACE_S:g} s")
    text = (f"\n{signal_name(signum)} again: stopped at once without saving ({why}); the checkpoints already "
            "written are complete\n")
    try:
        os.write(2, text.encode())
    except OSError:
        pass
    os._exit(EXIT_STOPPED)


def _drop_wakeup_fd_in_forked_children() -> None:
    """A child forked while a StopRequest is installed must not write its own signals into the
    parent's pipe (one Ctrl-C reaches both: the parent would count two)."""
    global _fork_hook_installed
    if _fork_hook_installed or not hasattr(os, "register_at_fork"):
        return

    def after_fork_in_child() -> None:
        global _wakeup_pipe
        if _wakeup_pipe is not None:
            _wakeup_pipe = None
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError):
                pass

    os.register_at_fork(after_in_child=after_fork_in_child)
    _fork_hook_installed = True


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
