"""The one atomic writer for every file and folder the project writes.

A write goes to a temporary sibling (``.<name>.<random>.tmp``), is flushed and ``fsync``ed, then
``os.replace``d over the target, and the directory is fsynced. At every moment the target holds
either the old complete content or the new complete content. On any failure the temporary is
removed, the previous target is untouched, and a :class:`SabError` says what happened.

Nothing is ever written through a link: a replace swaps a symbolic link itself for the new file
(its target is untouched), the few files written in place (``metrics.jsonl``, a lock) are opened
with ``O_NOFOLLOW`` and refused when they are a link (:func:`open_own`, :func:`check_own`), and
removing a temporary removes a link, never what it points to (:func:`remove_entry`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sab_byon_omni.errors import SabError, first_line

log = logging.getLogger(__name__)

TEMP_GLOB = ".*.tmp"  # what atomic_write / atomic_path / atomic_directory leave behind when killed
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the platform has none (Windows has no such links)


def umask() -> int:
    """This process's umask (Linux: read from ``/proc/self/status``; elsewhere set and put back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_plain_open(tmp: Path, directory: bool = False) -> None:
    """Give a temporary from mkstemp/mkdtemp (0600/0700) the mode a plain ``open()`` or ``mkdir``
    would have given the final file or folder: 0666 (0777) less the umask."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask())


def cannot_write(directory: Path, e: OSError) -> str:
    """Why no file can be made in ``directory``, in a few words: the system's reason, except that a
    folder that exists yet answers 'No such file or directory' (``/proc``, ``/sys``) is named as one
    that takes no new files."""
    if e.errno == errno.ENOENT and directory.is_dir():
        return f"{directory} exists but takes no new files (a virtual file system such as /proc or /sys?)"
    return reason(e)


def _temp_in(path: Path, what: str, directory: bool = False) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        _as_plain_open(tmp, directory)
        return tmp
    except OSError as e:
        raise SabError(f"cannot write {what} directory {path.parent}: {cannot_write(path.parent, e)}") from None


def open_temp(path: str | Path, what: str = "file") -> tuple[BinaryIO, Path]:
    """A new temporary file next to ``path``, open for writing (``O_EXCL``: never an existing file or
    link), and its name, for a writer that streams into it and ``os.replace``s it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _as_plain_open(Path(tmp))
    except OSError as e:
        raise SabError(f"cannot write {what} directory {path.parent}: {cannot_write(path.parent, e)}") from None
    return os.fdopen(fd, "wb"), Path(tmp)


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
    """A one-line error for a failed write (full disk, permissions, a library's write error). A
    Ctrl-C that interrupted the library's writing (torch's zip writer turns the KeyboardInterrupt
    raised in its write callback into "unexpected pos") is raised again as itself: a stop, not an
    error of the disk."""
    cause: BaseException | None = e
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        cause = cause.__cause__ or cause.__context__
    os_err = _os_error_in(e)
    if os_err is not None:
        return SabError(f"could not save {path}: {reason(os_err)}; {kept}")
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
    fd = os.open(p, os.O_RDONLY | NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_entry(p: Path) -> None:
    """Delete ``p``: a folder with what it holds, a file, or a link (the link only, never its target)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _link_kind(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        return "a hard link (a file with other names)"
    return None


def _refuse(path: Path, kind: str, what: str) -> SabError:
    return SabError(f"{path} is {kind}: the project writes {what} only to a plain file of its own, never "
                    "through a link (it could change a file elsewhere); move it away or choose another folder")


def check_own(path: str | Path, what: str) -> None:
    """Refuse a link where the project is about to write ``what`` in place (a missing path is fine)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SabError(f"cannot use {path}: {e.strerror or e}") from None
    kind = _link_kind(st)
    if kind:
        raise _refuse(path, kind, what)


def open_own(path: str | Path, flags: int, what: str) -> int:
    """A descriptor on ``path`` to write ``what`` in place (``flags``: ``os.O_WRONLY | os.O_APPEND``,
    ``os.O_RDWR``, ..., plus ``os.O_CREAT`` to create it), never through a link: a symbolic link is
    not followed (``O_NOFOLLOW``) and, like a hard link or anything but a plain file, is refused
    with a :class:`SabError` that names it. Other failures (a full disk) are one line too."""
    path = Path(path)
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):  # a link (ELOOP), a FIFO without a reader (ENXIO), a folder
            raise _refuse(path, "a symbolic link" if stat.S_ISLNK(mode) else "not a plain file", what) from None
        raise SabError(f"cannot write {path}: {reason(e)}") from None
    st = os.fstat(fd)
    kind = _link_kind(st) or (None if stat.S_ISREG(st.st_mode) else "not a plain file")
    if kind:
        os.close(fd)
        raise _refuse(path, kind, what)
    return fd


def reason(e: OSError) -> str:
    """An OSError in a few words ("disk full", "Permission denied")."""
    return "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))


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
    ``path`` (an existing ``path`` only with ``overwrite``, moved aside first and removed last).
    Which folders ``overwrite`` may replace is the caller's to decide (see ``hf_export.check_replaceable``)."""
    path = Path(os.path.abspath(path))  # "." or "dir/.." has no name of its own to put a temporary beside
    if path == path.parent:
        raise SabError(f"cannot write {what} as {path}: choose a new folder")
    if os.path.lexists(path) and not overwrite:
        raise SabError(f"{path} already exists; choose another path")
    tmp = _temp_in(path, what, directory=True)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                _fsync_file(p)
        old = None
        if os.path.lexists(path):  # a link is moved aside and removed itself, never followed
            old = path.with_name(f".{path.name}.old.tmp")
            remove_entry(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            remove_entry(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _as_sab_error(e, path, "nothing was written") if isinstance(e, Exception) and not isinstance(
            e, SabError) else None
        if err is not None:
            raise err from None
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporaries that a killed atomic write left in ``directory`` (never anything else; a
    link named like one is removed itself, never followed)."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.glob(TEMP_GLOB):
            remove_entry(p)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file%s left by an interrupted save in %s", len(removed),
                 "" if len(removed) == 1 else "s", d)
    return removed


def missing_folders(directory: str | Path) -> list[Path]:
    """``directory`` and its parents up to the first that exists, deepest first (none if it
    exists): what ``mkdir(parents=True)`` would create, so a failure can remove exactly that."""
    made: list[Path] = []
    d = Path(directory).absolute()
    while not os.path.lexists(d) and d != d.parent:
        made.append(d)
        d = d.parent
    return made


def check_can_create(directory: str | Path, what: str) -> None:
    """Stop with one line now, before long work that writes elsewhere (a corpus's cache), when
    ``directory`` is neither a folder that takes new files nor one that can be made (``/proc/x``, a
    file in the way, a read-only disk). Leaves nothing behind: a probe file and the folders this
    call made are removed again."""
    d = Path(directory)
    made = missing_folders(d)  # deepest first
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        existing = made[-1].parent if made else d
        raise SabError(f"cannot create {what} {d}: {cannot_write(existing, e)}") from None
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
