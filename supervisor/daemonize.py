"""Becoming a classic daemon, as a flat list of small named steps (see python-daemon).

    ensure_standard_fds   fds 0-2 open, so no file we open later lands on them
    preflight             the checks that can fail on the operator's terminal
    fork_and_wait         the launcher waits here for the daemon's start report
    detach_session        setsid: no controlling terminal, own session
    second_fork           a non-leader can never reacquire a terminal
    set_umask, change_directory, close_inherited_fds, redirect_streams
    (pid file last: the caller takes its lock, then reports ready)

The launching process waits on a pipe until the daemon reports that it holds its pid file
lock and serves ("ok") or why it could not start; only then does it exit, 0 or 1. Init
scripts and operators therefore see a real start result, not a guess after a sleep.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time

from worker import logs

from .pidfile import holder

READY_TIMEOUT = 30.0


class StartFailed(Exception):
    """The daemon cannot start; the message is one line for the operator."""


def ensure_standard_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed (init may start us that way);
    otherwise the next file opened (a pid file, a log) would become our stdout or stderr."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    _rebind_std_streams()


def _rebind_std_streams() -> None:
    # Python leaves sys.stdout etc. as None when their fd was closed at start-up.
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, encoding="utf-8",  # noqa: SIM115
                                    errors="backslashreplace"))


def preflight(pidfile: str, logfile: str) -> None:
    """What can be checked before detaching, so most mistakes show on the terminal.

    The daemon checks the pid file again, atomically, when it takes the lock."""
    if pidfile:
        try:
            _, pid = holder(pidfile)
        except OSError as exc:
            raise StartFailed(f"cannot read pid file {pidfile}: {exc.strerror}") from exc
        if pid is not None:
            raise StartFailed(f"already running (pid {pid})" if pid > 0 else "already running")
    if logfile:
        try:
            os.close(logs.open_log(logfile))  # never through a symbolic link
        except OSError as exc:
            raise StartFailed(f"cannot open log file {logfile}: {exc.strerror}") from exc


def fork_and_wait() -> int:
    """Fork; the launcher waits for the daemon's report and exits with its verdict; the
    child returns the write end of the report pipe."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        code = _launcher_wait(read_fd, pid)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the launcher has nothing of its own to clean up
    os.close(read_fd)
    return write_fd


def _launcher_wait(read_fd: int, child: int) -> int:
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    timed_out = True
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        chunk = os.read(read_fd, 4096)
        if not chunk:
            timed_out = False
            break
        data += chunk
    os.waitpid(child, 0)  # the intermediate child exits right after the second fork
    text = data.decode("utf-8", "replace").strip()
    if text == "ok":
        return 0
    if not text:
        text = "clip-supervisor: " + (
            f"the daemon did not report a start within {READY_TIMEOUT:g} s" if timed_out
            else "the daemon exited before it could start (see its log file)")
    print(text, file=sys.stderr)
    return 1


def detach_session() -> None:
    os.setsid()


def second_fork() -> None:
    """The session leader forks once more, so the daemon can never reacquire a terminal."""
    if os.fork() > 0:
        os._exit(0)


def set_umask(mask: int = 0o022) -> None:
    os.umask(mask)


def change_directory(path: str = "/") -> None:
    """Off whatever folder we were started in, so it can be unmounted or removed."""
    os.chdir(path)


def close_inherited_fds(keep: int) -> None:
    """Close every fd above 2 but ``keep``: an fd inherited from the launcher's parent (a
    pipe of the shell that runs an init script, say) would keep it waiting for us."""
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def redirect_streams(logfile: str) -> None:
    """stdin from /dev/null; stdout and stderr onto the log file (or /dev/null), so stray
    output (a C library warning, a crash) still lands in the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = null
    if logfile:
        out = logs.open_log(logfile)
    logs.streams_follow(logfile)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def daemonize(logfile: str) -> int:
    """Run every step; returns the report pipe's write end (see ``ReadyPipe``)."""
    report_fd = fork_and_wait()
    detach_session()
    second_fork()
    set_umask()
    change_directory()
    close_inherited_fds(report_fd)
    try:
        redirect_streams(logfile)
    except OSError as exc:  # the log path changed since preflight (a link planted there)
        ReadyPipe(report_fd).failed(f"clip-supervisor: cannot open log file {logfile}: "
                                    f"{exc.strerror}")
        os._exit(1)
    return report_fd


class ReadyPipe:
    """The daemon's end of the start handshake: one report, "ok" or the reason it failed.

    Without a pipe (a foreground run) every call does nothing."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ready(self) -> None:
        self._send("ok")

    def failed(self, message: str) -> None:
        self._send(message)

    def _send(self, text: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(BrokenPipeError):  # the launcher was killed: no one asks
                os.write(fd, text.encode() + b"\n")
        finally:
            os.close(fd)
