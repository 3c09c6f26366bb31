"""Waking a worker that is blocked, when a signal arrives.

Python runs a signal handler between bytecodes and then restarts an interrupted ``recv``
(PEP 475), so a worker blocked in BLMOVE or in a slow download would only see its stop flag
when the call returns. The handler records the signal and calls ``interrupt()``, which shuts
down the one socket the worker declared it is blocked on: the call returns at once with a
connection error, and the loop looks at its flags. Loops that wait with ``select`` (the
ffmpeg runner) watch ``fileno()``, the read end of the signal wake-up pipe, instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator


class Waker:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        """Make every signal delivered to this process write a byte to our pipe."""
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass

    @contextlib.contextmanager
    def watching(self, sock: socket.socket | None) -> Iterator[None]:
        self._sock = sock
        try:
            yield
        finally:
            self._sock = None

    def interrupt(self) -> None:
        """Called from a signal handler: unblock the declared socket, if any."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
