"""The pid file: who is running, proven by an fcntl lock held for the master's whole life.

The pid written in the file is only a hint; the lock is the truth. A file nobody holds a
lock on is stale whatever pid it names (that process may be long gone, or the pid reused),
so it is taken over; a file whose lock is held means "already running", and is never
clobbered, whichever process holds it.

The file appears atomically: the pid is written into a private temporary file that is
already locked, which is then linked (no file yet) or renamed (stale file, whose lock we
hold meanwhile) into place. So a reader never sees an empty or half-written file, and two
masters starting at once cannot both believe they won.

fcntl locks belong to a process, and closing *any* fd of the file drops them (fcntl(2)):
the master must never call ``holder``, ``read_pid`` or ``remove_stale`` on its own pid file.
Forked workers inherit the fd but not the lock, so they cannot drop or keep it.

The path is never followed through a symbolic link (O_NOFOLLOW): the pid file's folder may
belong to the service's user while the master runs as root, and a link planted there would
have us lock, or ``stop`` signal the pid named in, a file of the attacker's choosing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time

from worker.fsafe import open_nofollow

DEFAULT_PIDFILE = "/run/clip-supervisor.pid"

# A reader (``holder``) probes a stale file with a shared lock for a few microseconds; a
# starting master that meets such a probe tries again instead of reporting "already running".
LOCK_TRIES = 5
LOCK_RETRY_DELAY = 0.02


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running (pid {pid})" if pid else "already running")
        self.pid = pid


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, pid: int | None = None) -> None:
        """Create or take over the file, locked, holding our pid; or AlreadyRunning.

        OSError (a folder that cannot be created, no permission) is left to the caller."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(self.path)}.")
        try:
            os.fchmod(fd, 0o644)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this file yet
            os.write(fd, f"{pid or os.getpid()}\n".encode())
            os.fsync(fd)
            while not self._install(tmp):
                pass
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fd = fd

    def _install(self, tmp: str) -> bool:
        """Put our locked file at the path; False when the path changed under us (retry)."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            pass
        try:
            old = _open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False  # its master just removed it
        try:
            if not _lock(old):
                raise AlreadyRunning(_read(old))
            # A stopping master unlinks the file before unlocking it: the inode we locked
            # must still be the one at the path, or we would rename over a live master's file.
            if not _same_file(old, self.path):
                return False
            os.rename(tmp, self.path)  # stale: replaced while we hold its lock
            return True
        finally:
            os.close(old)  # releases the lock on the old inode only

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _lock(fd: int) -> bool:
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt + 1 < LOCK_TRIES:
                time.sleep(LOCK_RETRY_DELAY)
    return False


def _open(path: str, flags: int) -> int:
    """Open the pid file, never through a symbolic link (UnsafePath, an OSError)."""
    return open_nofollow(path, flags, what="pid file")


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _parse(data: bytes) -> int | None:
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _read(fd: int) -> int | None:
    try:
        return _parse(os.pread(fd, 64, 0))
    except OSError:
        return None


def read_pid(path: str) -> int | None:
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def holder(path: str) -> tuple[bool, int | None]:
    """(exists, pid of the live lock holder or None).

    A held lock whose file names no valid pid gives -1: running, pid unknown. Callers must
    never signal that number. Only read access is needed (a shared lock probes), so any user
    may ask; PermissionError when even that is refused."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, _read(fd) or -1
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True, None
    finally:
        os.close(fd)


def remove_stale(path: str) -> bool:
    """Remove the file if no live process holds its lock; True when removed.

    The lock is taken first, so a master that is starting right now (and renames its own
    file over this one) is never robbed of its file."""
    try:
        fd = _open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        if not _lock(fd) or not _same_file(fd, path):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)
