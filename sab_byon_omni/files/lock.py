"""One lock for a folder that one process at a time writes: a run folder (one run per folder) and
a data cache (processes that start together take turns building it).

It is two advisory locks, both dropped by the OS when the process dies: one on the folder itself,
which deleting or replacing ``.lock`` cannot release, and one on the file ``.lock`` in it, which
holds the pid of the process that has the lock (for the message of the one that finds it taken).
Over NFS a folder's lock is seen by its own machine only and a file's by every client, so the two
together hold on both. ``.lock`` is opened without following a link, and a link there is refused:
it is never written through.
"""

from __future__ import annotations

import os
from pathlib import Path

from sab_byon_omni.errors import SabError
from sab_byon_omni.files.atomic import open_own, reason

LOCK_FILE = ".lock"


class FolderLock:
    """The lock of ``directory`` (which must exist); :meth:`release` or the end of the process frees it."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.file = self.dir / LOCK_FILE
        self._fds: list[int] = []

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def acquire(self, wait: bool = False) -> str | None:
        """Take the lock, waiting for it with ``wait``. None when taken (or on a platform without
        locks); else the pid of the process that holds it, or ``"?"`` when that is unknown. A link at
        ``.lock``, a folder that cannot hold it or a full disk: a :class:`SabError`, and no ``.lock``
        left behind that this call created."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return None
        if self._fds:
            return None
        created = not os.path.lexists(self.file)
        fds: list[int] = []
        taken = False
        try:
            fds.append(os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            fds.append(open_own(self.file, os.O_RDWR | os.O_CREAT, "the folder's lock"))
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    created = False  # the holder's (recreated by this call if it was deleted): left as it is
                    return _holder(fds[1])
                except OSError:
                    if fd != fds[0]:
                        raise
                    # a folder that cannot be locked (some network filesystems): the file's lock holds
            os.ftruncate(fds[1], 0)
            os.pwrite(fds[1], str(os.getpid()).encode(), 0)
            taken = True
            self._fds = fds
            return None
        except OSError as e:
            raise SabError(f"cannot lock {self.dir}: {self.file}: {reason(e)}") from None
        finally:
            if not taken:
                for fd in fds:
                    os.close(fd)
                if created:
                    self.file.unlink(missing_ok=True)

    def release(self) -> None:
        """Free the lock (``.lock`` stays, with the pid of its last holder)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "?"
