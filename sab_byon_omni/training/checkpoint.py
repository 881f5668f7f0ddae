"""Checkpoints: one plain dict of tensors and primitives, written atomically, loaded safely.

The dict has the guide's keys (``epoch``, ``model_state_dict``, ``optimizer_state_dict``, ``loss``,
``global_step``, ``config``) plus what an exact resume needs (``scaler_state_dict``,
``scheduler_state_dict``, ``rng_state``, ``data_state``, ``tokenizer``). Everything loads with
``torch.load(path)`` under PyTorch's default ``weights_only=True``: no pickled code is ever run.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from sab_byon_omni.errors import SabError

log = logging.getLogger(__name__)

FORMAT = "sab-byon-omni/1"
REQUIRED = ("epoch", "model_state_dict", "global_step", "config")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


def capture_rng() -> dict[str, Any]:
    """Every RNG the run uses, as tensors and primitives."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`: the previous checkpoint at ``path`` survives any failure."""
    return atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint", kept="earlier checkpoints are intact")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], what: str = "file",
                 kept: str = "the previous file is intact") -> Path:
    """Call ``write(f)`` on a temporary file in the same directory, fsync, then ``os.replace``.

    On any failure (full disk, permissions) the temporary file is removed, the previous file at
    ``path`` is untouched, and a :class:`SabError` names the problem.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SabError(f"cannot write {what} directory {path.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        os_err = _os_error_in(e)
        if os_err is not None:
            why = "disk full" if os_err.errno == errno.ENOSPC else (os_err.strerror or str(os_err))
            raise SabError(f"could not save {path}: {why}; {kept}") from None
        # torch's zip writer can replace the OSError of a full disk by its own RuntimeError
        # ("[enforce fail at inline_container.cc] unexpected pos ...")
        torch_write_error = any(w in str(e).lower() for w in ("write", "inline_container", "unexpected pos"))
        if isinstance(e, RuntimeError) and torch_write_error:
            first = str(e).strip().splitlines()[0][:160]
            raise SabError(f"could not save {path} (disk full?): {first}; {kept}") from None
        raise
    return path


def _os_error_in(e: BaseException) -> OSError | None:
    """The first OSError in an exception's cause/context chain (torch wraps write failures)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporary files an interrupted :func:`atomic_save` left behind (a SIGKILL between
    write and ``os.replace``). Only names of the form ``.<name>.pt.<random>.tmp`` are touched."""
    removed = []
    d = Path(directory)
    if d.is_dir():
        for p in d.glob(".*.pt.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), d)
    return removed


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing, truncated, corrupt, unsafe or foreign file is a
    :class:`SabError` naming it. ``mmap=True`` maps the tensors instead of reading them (cheap
    when only the metadata is needed)."""
    p = Path(path)
    if not p.is_file():
        raise SabError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol note would precede our one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise SabError(f"{p}: refused to load: it is not a plain checkpoint (weights_only): {first[:160]}") from None
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOFError, IndexError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SabError(f"{p}: not a readable checkpoint (truncated or corrupt?): {first[:160]}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
        raise SabError(f"{p}: not a sab-byon-omni checkpoint (missing {', '.join(missing)})")
    return ckpt


def checkpoint_files(directory: str | Path) -> list[Path]:
    """Resumable checkpoints in a directory, oldest first by global step (then epoch)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if _STEP_RE.match(p.name) or _EPOCH_RE.match(p.name):
            found.append(p)
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The resume point: the readable checkpoint with the highest global step (an epoch file beats
    the step file of the same step: it was written after the epoch-end evaluation; then the newer
    file). Ordering by content, not by file times, means a copied or synced folder (file times
    reset) still resumes from the right file. Unreadable files are skipped with a warning."""
    best: tuple[tuple[int, bool, int], Path] | None = None
    for p in checkpoint_files(directory):
        try:
            ck = load_checkpoint(p, mmap=True)
            key = (int(ck["global_step"]), bool(_EPOCH_RE.match(p.name)), p.stat().st_mtime_ns)
        except SabError as e:
            log.warning("skipping %s", e)
            continue
        except (TypeError, ValueError):
            log.warning("skipping %s: its global_step is not a number", p)
            continue
        if best is None or key > best[0]:
            best = (key, p)
    return best[1] if best else None


def prune_step_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` ``step_*.pt`` files (never fewer than one: the newest is the
    resume point); epoch files and best_model.pt stay."""
    steps = sorted((p for p in Path(directory).glob("step_*.pt") if _STEP_RE.match(p.name)),
                   key=lambda p: int(_STEP_RE.match(p.name).group(1)))
    for p in steps[:max(len(steps) - max(keep_last, 1), 0)]:
        p.unlink(missing_ok=True)
