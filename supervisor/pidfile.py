"""The pid file: who is running, proven by an fcntl lock held for the master's whole life.

The pid written in the file is only a hint; the lock is the truth. A file nobody holds a
lock on is stale whatever pid it names (that process may be long gone, or the pid reused),
so it is taken over; a file whose lock is held means "already running", and is never
clobbered, whichever process holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

DEFAULT_PIDFILE = "/run/clip-supervisor.pid"


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running (pid {pid})" if pid else "already running")
        self.pid = pid


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, pid: int | None = None) -> None:
        """Create or take over the file, lock it, and write our pid; or AlreadyRunning."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                raise AlreadyRunning(holder) from None
            # A stopping master unlinks the file before unlocking it: if the inode we locked
            # is no longer the one at the path, lock the new one instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid or os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def update(self, pid: int) -> None:
        """Rewrite the pid (after a daemon's forks the lock holder's pid changes)."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            text = fh.read(64).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def holder(path: str) -> tuple[bool, int | None]:
    """(exists, pid of the live lock holder or None)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True, _read(fd) or -1
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True, None
    finally:
        os.close(fd)
