"""The run folder's checkpoints: save, load, find the resume point, prune, rewind, and one run per folder.

Names: ``step_<N>`` (every ``train.save_every`` steps, and when a run stops early), ``epoch_<N>``
(each epoch's end) and ``best_model`` (the best validation loss so far); ``.pt`` files, or ``.dcp``
folders for FSDP. One rule orders them, for resuming and pruning alike: the *loadable* checkpoint
with the highest global step wins (an epoch file beats the step file of the same step, then the
newer file); resuming also checks its tensors against their checksum and falls back to the next.
Damaged files are skipped with a warning and never deleted, and pruning never looks past the
step a run has reached.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sab_byon_omni.errors import SabError, first_line
from sab_byon_omni.files import dcp
from sab_byon_omni.files.atomic import check_own, remove_entry, remove_stale_temps
from sab_byon_omni.files.checkpoint import load_checkpoint, save_checkpoint
from sab_byon_omni.files.lock import LOCK_FILE, FolderLock

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(step|epoch)_(\d+)(\.pt|\.dcp)$")
_warned: set[tuple[str, int]] = set()  # (file, mtime): each damaged file is reported once per process


@dataclass(frozen=True)
class Entry:
    """A loadable checkpoint and where it ranks."""

    path: Path
    global_step: int
    is_epoch: bool
    mtime: int

    @property
    def rank(self) -> tuple[int, bool, int]:
        return self.global_step, self.is_epoch, self.mtime


class Checkpointer:
    """Checkpoints of one run folder. ``sharded``: FSDP ``.dcp`` folders instead of ``.pt`` files.
    Only the main process writes single files; every process takes part in a sharded save."""

    def __init__(self, directory: str | Path, *, is_main: bool = True, sharded: bool = False, keep_last: int = 3,
                 barrier: Callable[[], None] = lambda: None) -> None:
        self.dir, self.is_main, self.sharded = Path(directory), is_main, sharded
        self.keep_last, self.barrier = keep_last, barrier
        self.suffix = dcp.SUFFIX if sharded else ".pt"
        self._lock = FolderLock(self.dir)
        self._damaged: set[Path] = set()  # failed their checksum when read in full: never ranked, never pruned

    # ------------------------------------------------------------------------------- finding
    def path(self, name: str) -> Path:
        return self.dir / f"{name}{self.suffix}"

    def existing(self) -> list[Path]:
        """Every checkpoint-like entry of the folder, loadable or not."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _NAME.match(p.name) or p.stem == "best_model")

    def refuse_existing(self) -> None:
        """A new run (``resume: none``) never writes into a folder that already holds a run."""
        existing = self.existing()
        if existing:
            raise SabError(f"{self.dir} already holds checkpoints ({existing[-1].name}); pass --resume auto "
                           "to continue that run, or choose another --checkpoint_dir")

    def entries(self) -> list[Entry]:
        """The loadable step/epoch checkpoints of this run's kind, best resume candidate last."""
        found = []
        for p in self.existing():
            m = _NAME.match(p.name)
            if not m or m.group(3) != self.suffix or p in self._damaged:
                continue
            try:
                meta = dcp.read_meta(p) if self.sharded else load_checkpoint(p, mmap=True)
                found.append(Entry(p, meta["global_step"], m.group(1) == "epoch", p.stat().st_mtime_ns))
            except (SabError, OSError) as e:
                _warn_once(p, f"skipping {first_line(e)}")
        return sorted(found, key=lambda e: e.rank)

    def latest(self) -> Path | None:
        """The loadable checkpoint with the highest global step (its tensors not checked)."""
        entries = self.entries()
        return entries[-1].path if entries else None

    def read_newest(self) -> tuple[Path, dict[str, Any]] | None:
        """What ``--resume auto`` resumes from: the newest loadable checkpoint whose tensors match
        their checksum, and its dict. One that does not is reported, skipped and remembered as
        damaged, so that pruning leaves it alone."""
        for entry in reversed(self.entries()):
            try:
                return entry.path, self.read(entry.path)
            except SabError as e:
                self._damaged.add(entry.path)
                _warn_once(entry.path, f"skipping {first_line(e)}")
        return None

    def newer_than(self, step: int) -> list[Entry]:
        return [e for e in self.entries() if e.global_step > step]

    # ------------------------------------------------------------------------------- the folder
    def lock(self) -> None:
        """One run per folder (the main process locks it for all): a lock that the OS drops when the
        process dies and that deleting ``.lock`` does not release (files/lock.py)."""
        if not self.is_main or self._lock.held:
            return
        self.make_dir()
        holder = self._lock.acquire()
        if holder is not None:
            raise SabError(f"{self.dir} is in use by another training run (pid {holder}); wait for it to finish, "
                           "stop it, or choose another --checkpoint_dir")

    def unlock(self) -> None:
        self._lock.release()

    def make_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SabError(f"cannot create train.checkpoint_dir {self.dir}: {e.strerror or e}") from None

    def clean(self) -> None:
        """Remove what an interrupted save left behind (temporary files and folders only)."""
        if self.is_main:
            remove_stale_temps(self.dir)

    def set_aside(self, entries: list[Entry], why: str, copies: tuple[Path, ...] = ()) -> Path | None:
        """Move checkpoints (never delete them) into a new folder ``rewound-<time>/`` so that
        ``--resume auto`` no longer prefers them; ``copies`` (the metrics of the abandoned branch)
        are copied there as they are now."""
        if not entries or not self.is_main:
            return None
        for p in copies:  # before anything moves: a link there is refused, never read through
            check_own(p, p.name)
        stamp, n = time.strftime("rewound-%Y%m%d-%H%M%S"), 1
        while True:  # a new folder, even for two rewinds in one second
            dest = self.dir / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                dest.mkdir()
                break
            except FileExistsError:
                n += 1
        for p in copies:
            if p.is_file():
                shutil.copy2(p, dest / p.name, follow_symlinks=False)
        for e in entries:
            os.replace(e.path, dest / e.path.name)
        log.warning("moved %d newer checkpoint(s) (%s) to %s: %s", len(entries),
                    ", ".join(e.path.name for e in entries), dest, why)
        return dest

    # ------------------------------------------------------------------------------- saving
    def save(self, name: str, payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
        """Write checkpoint ``name`` (``step_12``, ``epoch_1``, ``best_model``). ``payload`` holds
        everything but the two state dicts, which come from ``model`` and ``optimizer``."""
        path = self.path(name)
        if self.sharded:
            dcp.save(path, model, optimizer, payload, self.is_main, self.barrier)
        else:
            if self.is_main:
                save_checkpoint({**payload, "model_state_dict": model.state_dict(),
                                 "optimizer_state_dict": optimizer.state_dict()}, path)
            self.barrier()
        if name.startswith("step_"):
            self.prune(payload["global_step"])
        return path

    def prune(self, upto: int) -> list[Path]:
        """Keep the newest ``keep_last`` loadable step checkpoints up to step ``upto`` (the one just
        saved) and delete older ones; never the newest loadable checkpoint of any kind up to there
        (the resume point), never a file past ``upto`` (not this run's: damaged, or another branch),
        never a damaged file, never an epoch or best checkpoint."""
        if not self.is_main:
            return []
        entries = [e for e in self.entries() if e.global_step <= upto]
        keep = {e.path for e in entries[-1:]}
        steps = [e for e in entries if not e.is_epoch]
        keep |= {e.path for e in steps[max(len(steps) - self.keep_last, 0):]} if self.keep_last else set()
        removed = [e.path for e in steps if e.path not in keep]
        for p in removed:
            remove_entry(p)
        return removed

    # ------------------------------------------------------------------------------- loading
    def read(self, path: Path) -> dict[str, Any]:
        """The checkpoint dict at ``path``, its tensors checked against their checksum (for a sharded
        one, its meta: the shards load into a model). Mapped, not read into memory first."""
        return dcp.read_meta(path) if dcp.is_sharded(path) else load_checkpoint(path, mmap=True, verify_tensors=True)

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        """The checkpoint dict without reading or checking its tensors (cheap)."""
        return dcp.read_meta(path) if dcp.is_sharded(path) else load_checkpoint(path, mmap=True)


def _warn_once(path: Path, message: str) -> None:
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        key = (str(path), 0)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)
