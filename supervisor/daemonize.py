"""Becoming a classic daemon, as a flat list of small named steps (see python-daemon).

The launching process waits on a pipe until the daemon reports that it holds its pid file
lock and serves ("ok") or why it could not start; only then does it exit, 0 or 1. Init
scripts and operators therefore see a real start result, not a guess after a sleep.
"""

from __future__ import annotations

import os
import select
import sys
import time

READY_TIMEOUT = 30.0


def fork_and_wait_for_ready() -> int:
    """Fork; the launcher waits for the daemon's report and exits; the child returns the
    write end of the report pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        sys.exit(_launcher_wait(read_fd, pid))
    os.close(read_fd)
    return write_fd


def _launcher_wait(read_fd: int, child: int) -> int:
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        data += chunk
    os.waitpid(child, 0)  # the intermediate child exits right after the second fork
    text = data.decode("utf-8", "replace").strip()
    if text.startswith("ok"):
        return 0
    print(text or "clip-supervisor: the daemon did not report a start", file=sys.stderr)
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
    os.chdir(path)


def redirect_streams(logfile: str) -> None:
    """stdin from /dev/null; stdout and stderr onto the log file (or /dev/null)."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 416) if logfile else null
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def daemonize(logfile: str) -> int:
    """Run every step; returns the report pipe's write end (see ``report``)."""
    report_fd = fork_and_wait_for_ready()
    detach_session()
    second_fork()
    set_umask()
    change_directory()
    redirect_streams(logfile)
    return report_fd


def report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode() + b"\n")
    finally:
        os.close(fd)
