"""The one atomic writer for every file and folder the project writes.

A write goes to a temporary sibling (``.<name>.<random>.tmp``), is flushed and ``fsync``ed, then
``os.replace``d over the target, and the directory is fsynced. At every moment the target holds
either the old complete content or the new complete content. On any failure the temporary is
removed, the previous target is untouched, and a :class:`SabError` says what happened.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sab_byon_omni.errors import SabError, first_line

log = logging.getLogger(__name__)

TEMP_GLOB = ".*.tmp"  # what atomic_write / atomic_path / atomic_directory leave behind when killed


def _temp_in(path: Path, what: str, directory: bool = False) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(tmp)
    except OSError as e:
        raise SabError(f"cannot write {what} directory {path.parent}: {e.strerror or e}") from None


def _os_error_in(e: BaseException | None) -> OSError | None:
    """The first OSError in an exception's cause/context chain (libraries wrap write failures)."""
    for _ in range(10):
        if e is None:
            return None
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _as_sab_error(e: BaseException, path: Path, kept: str) -> SabError | None:
    """A one-line error for a failed write (full disk, permissions, a library's write error)."""
    os_err = _os_error_in(e)
    if os_err is not None:
        why = "disk full" if os_err.errno == errno.ENOSPC else (os_err.strerror or str(os_err))
        return SabError(f"could not save {path}: {why}; {kept}")
    text = str(e).lower()
    # torch's zip writer and safetensors replace the OSError of a full disk by their own errors
    if any(w in text for w in ("write", "inline_container", "unexpected pos", "no space", "i/o error")):
        return SabError(f"could not save {path} (disk full?): {first_line(e)}; {kept}")
    return None


def fsync_dir(d: Path) -> None:
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


def _fsync_file(p: Path) -> None:
    with open(p, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "file", kept: str = "the previous file is intact") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a library that writes by file name; on success it
    is fsynced and moved over ``path``."""
    path = Path(path)
    tmp = _temp_in(path, what)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        err = _as_sab_error(e, path, kept) if isinstance(e, Exception) and not isinstance(e, SabError) else None
        if err is not None:
            raise err from None
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], what: str = "file",
                 kept: str = "the previous file is intact") -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it over ``path``."""
    path = Path(path)
    with atomic_path(path, what, kept) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
    return path


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), what=what)


@contextlib.contextmanager
def atomic_directory(path: str | Path, what: str = "folder", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success its files are fsynced and it replaces
    ``path`` (an existing ``path`` only with ``overwrite``, moved aside first and removed last)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SabError(f"{path} already exists; choose another path")
    tmp = _temp_in(path, what, directory=True)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.tmp")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _as_sab_error(e, path, "nothing was written") if isinstance(e, Exception) and not isinstance(
            e, SabError) else None
        if err is not None:
            raise err from None
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporaries that a killed atomic write left in ``directory`` (never anything else)."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.glob(TEMP_GLOB):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), d)
    return removed
