"""The run's metrics: one definition of each row, written to ``metrics.jsonl`` (and to the trackers
the run reports to), reconciled with the checkpoint a run starts from.

This module is the schema of ``metrics.jsonl``: the writer, the reconciliation on resume, the
trackers and ``sab-omni plot`` all read a row's kind through :func:`row_kind`. Every row carries its
``kind`` and ``time`` (seconds since the epoch):

* ``train`` (:class:`StepRow`) every ``train.log_interval`` steps: step, epoch, loss, lr, grad_norm,
  tokens_per_s, memory_mb, skipped (and muon_lr with ``optimizer: muon``; lr is AdamW's);
* ``eval`` (:class:`EvalRow`) at every validation inside an epoch: step, epoch, val_loss;
* ``epoch_end`` (:class:`EpochRow`) at each epoch's end: step, epoch, train_loss, val_loss.

Files written before rows carried a kind are read by their fields (:func:`row_kind`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from sab_byon_omni.errors import SabError
from sab_byon_omni.estimate import plural
from sab_byon_omni.files.atomic import atomic_write_text, check_own, open_own

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


TRAIN, EVAL, EPOCH_END = "train", "eval", "epoch_end"


@dataclass
class StepRow:
    kind: ClassVar[str] = TRAIN
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    memory_mb: float
    skipped: int
    muon_lr: float | None = None  # the Muon groups' rate (optimizer muon; not written otherwise)
    reserved_mb: float | None = None  # CUDA: max_memory_reserved beside memory_mb's allocated (not written elsewhere)


@dataclass
class EvalRow:
    kind: ClassVar[str] = EVAL
    step: int
    epoch: int
    val_loss: float


@dataclass
class EpochRow:
    kind: ClassVar[str] = EPOCH_END
    step: int
    epoch: int
    train_loss: float
    val_loss: float


Row = StepRow | EvalRow | EpochRow
ROWS: dict[str, type] = {cls.kind: cls for cls in (StepRow, EvalRow, EpochRow)}
# kind -> (the fields every such row has, all its fields): optional ones (StepRow.muon_lr) may be left out
FIELDS = {kind: (frozenset(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING),
                 frozenset(f.name for f in dataclasses.fields(cls))) for kind, cls in ROWS.items()}


def row_kind(row: dict[str, Any]) -> str | None:
    """The kind of a row read back (``train``, ``eval``, ``epoch_end``), or None for a line that is
    none of them. A row written before rows carried their kind has the kind whose fields it holds."""
    kind = row.get("kind")
    if kind is not None:
        return kind if kind in ROWS else None
    keys = frozenset(row) - {"time"}
    return next((k for k, (required, every) in FIELDS.items() if required <= keys <= every), None)


class Tracker(Protocol):
    """Somewhere else the rows go (TensorBoard, Weights & Biases, ...)."""

    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class MetricsLog:
    """``metrics.jsonl`` in the run folder (rank 0 only), plus optional trackers."""

    def __init__(self, directory: Path, enabled: bool, trackers: list[Tracker] | None = None) -> None:
        self.path, self.enabled, self.trackers = Path(directory) / METRICS_FILE, enabled, trackers or []

    def write(self, row: Row) -> None:
        if not self.enabled:
            return
        data = {"kind": row.kind, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)  # no NaN
                                     for k, v in dataclasses.asdict(row).items() if v is not None}}  # None: not in this run
        data["time"] = time.time()
        # appended in place, never through a link (refused with one line, as a full or read-only disk)
        fd = open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the run's metrics")
        try:
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(data) + "\n")
        except OSError as e:  # a full or read-only disk: stop with one line, checkpoints untouched
            raise SabError(f"cannot write {self.path}: {e.strerror or e}") from None
        for t in self.trackers:
            t.log(data)

    def reconcile(self, step: int) -> None:
        """Make the file hold exactly the rows of steps 1..``step`` (the checkpoint this run starts
        from; 0 for a fresh start), each once: rows of work a crash threw away, rows a killed save
        repeated, and a line cut short are dropped."""
        if not self.enabled:
            return
        check_own(self.path, "the run's metrics")  # before the run starts: a link there is refused, never read
        if not self.path.is_file():
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SabError(f"cannot read {self.path}: {e.strerror or e}") from None
        kept: dict[tuple, str] = {}
        dropped = 0
        for line in text.splitlines():
            key = _row_key(line, step)
            if key is None:
                dropped += 1
            else:
                dropped += key in kept
                kept[key] = line  # a repeated row: the last one written wins
        if dropped:
            atomic_write_text(self.path, "".join(line + "\n" for line in kept.values()), what="metrics")
            log.info("%s: dropped %s after step %d or repeated (work lost with an interruption)",
                     METRICS_FILE, plural(dropped, "row"), step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _row_key(line: str, step: int) -> tuple | None:
    """(kind, step) of a row to keep, or None for a row past ``step`` or one that is not a row."""
    try:
        row = json.loads(line)
        s = row["step"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not isinstance(s, int) or isinstance(s, bool) or not 0 < s <= step:
        return None
    return row_kind(row) or "other", s

