"""Logging shared by the master and its workers.

All processes append to one file (O_APPEND keeps each line whole), and every line names the
process role and pid, so one file tells the story of the whole pool. ``reopen()`` follows a
logrotate rename (the master calls it on USR1 and passes USR1 on to its workers).

The log is opened with O_NOFOLLOW: the daemon may run as root, and a symbolic link planted
at the log's path (its folder may be writable by the service's user) would otherwise have
root append to any file on the host. Such a link stops the start; on a reopen, the old
file is kept and the refusal logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .fsafe import open_nofollow

LOG = "clip-supervisor"
LOG_MODE = 0o640
_state: dict[str, Any] = {"role": "main", "format": "text", "file": None}
_streams: dict[str, str] = {}  # where a daemon's stdout/stderr point (see streams_follow)
# The structured fields of a JSON line, in the order they are written.
FIELDS = ("job_id", "worker_id", "stage", "reason")
_bound: dict[str, str] = {}


def bind(**fields: object) -> None:
    """Name ``job_id``, ``worker_id``, ``stage`` or ``reason`` in every line this process
    logs from now on (JSON format); a value of None or "" removes the field."""
    for name, value in fields.items():
        if name not in FIELDS:
            raise TypeError(f"logs.bind: unknown field {name!r} (known: {', '.join(FIELDS)})")
        if value is None or value == "":
            _bound.pop(name, None)
        else:
            _bound[name] = str(value)


def unbind(*names: str) -> None:
    """Stop naming these fields (all of them when none is given)."""
    for name in names or FIELDS:
        _bound.pop(name, None)


def bound() -> dict[str, str]:
    """The fields bound now (a copy)."""
    return dict(_bound)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(message)s"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _state["role"]
        return True


class _Seconds:
    """``strftime`` of a record's whole second, computed once per second: formatting the
    time anew was an eighth of what a log line cost (a worker writes one per job)."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self.fmt = fmt
        self.convert = convert
        self.second = -1
        self.text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.text = time.strftime(self.fmt, self.convert(second))
            self.second = second
        return self.text


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the time as logging.Formatter writes it (local time, milliseconds
    after a comma)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._seconds = _Seconds(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """logging.Formatter.format with TEXT_FORMAT written out as an f-string (a worker
        writes a line per job: the %-style template through the record's __dict__ cost a
        fifth of a line)."""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        role = record.role  # type: ignore[attr-defined]  # set by _RoleFilter
        line = f"{record.asctime} {record.levelname:<7} {role}[{record.process}] {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}" if line[-1:] != "\n" else line + record.exc_text
        if record.stack_info:
            line = f"{line}\n" if line[-1:] != "\n" else line
            line += self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": getattr(record, "role", _state["role"]),
            "pid": record.process,
        }
        for name in FIELDS:
            value = getattr(record, name, None)  # extra={...} of this one call
            if value is None or value == "":
                value = _bound.get(name)
            if value is not None and value != "":
                entry[name] = str(value)
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)




def open_log(path: str) -> int:
    """An fd appending to the log file ``path``, created 0640 if missing; UnsafePath (an
    OSError) when ``path`` is a symbolic link."""
    return open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE,
                         what="log file")


# How long, and how many, routine lines a worker may hold back while it runs jobs back to
# back (see hold).
HOLD_SECONDS = 0.1
HOLD_LINES = 64


# Routine lines deferred to the worker's next wait for Redis (see defer): the logger, the
# time of the call, the message and its arguments, the fields bound then (JSON lines).
_deferred: list[tuple[logging.Logger, float, str, tuple, dict[str, str] | None]] = []


class LogFile(logging.FileHandler):
    """A FileHandler that never follows a symbolic link at its path, and that can hold
    routine lines back for a moment (see ``hold``)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.holding = False
        self._held: list[str] = []
        self._held_since = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held, from any thread.
        if _deferred:  # lines deferred earlier come first, in order
            write_deferred()
        if not self.holding or record.levelno > logging.INFO:
            if self._held:  # what was held comes first, in order
                self._write_held()
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        now = time.monotonic()
        if not self._held:
            self._held_since = now
        self._held.append(line)
        if len(self._held) >= HOLD_LINES or now - self._held_since >= HOLD_SECONDS:
            self._write_held()

    def _write_held(self) -> None:
        text, self._held = "".join(self._held), []
        try:
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as logging does: a log that cannot be written stops nothing
            if logging.raiseExceptions:
                sys.stderr.write(f"clip-supervisor: lost {text.count(chr(10))} log lines\n")

    def flush(self) -> None:
        self.acquire()
        try:
            write_deferred()
            if self._held:
                self._write_held()
        finally:
            self.release()
        super().flush()

    def _open(self) -> io.TextIOWrapper:
        return open(self.baseFilename, self.mode, encoding=self.encoding,  # noqa: SIM115
                    errors=self.errors, opener=lambda path, _flags: open_log(path))


def hold(on: bool) -> None:
    """Let routine lines (info and below) wait in the log file's handler, or write what
    waits and stop. A worker holds them only while it runs jobs back to back, each taken in
    the same round trip as the previous one's ack (no-op jobs, rejections, outputs already
    stored): a line per job cost it as much CPU again as the line itself in the pool, where
    two workers appending to one file contend for it. What waits is written with the next
    warning or error (in order), after HOLD_SECONDS or HOLD_LINES, and before the worker
    waits for work, starts a clip, or exits; a worker killed outright loses at most that
    much of its lines (the jobs' outcomes are in Redis)."""
    handler = _state.get("file")
    if isinstance(handler, LogFile) and handler.holding != on:
        handler.acquire()
        try:
            write_deferred()
            handler.holding = on
            if not on and handler._held:
                handler._write_held()
        finally:
            handler.release()


def defer(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.info(msg, *args)``, made a moment later while lines are held (see hold): the
    record is built and formatted by ``write_deferred``, which the worker calls while it
    waits for Redis's answer to its next call (the next job's ack), so that this CPU is
    spent while the worker would otherwise sleep. The line keeps the time of this call and
    the fields bound now, and comes out before any later line of this process: every
    write of the log file (a line, a flush, ``hold(False)``) writes deferred lines first.
    Not holding, it is logged at once."""
    handler = _state.get("file")
    if not (isinstance(handler, LogFile) and handler.holding):
        logger.info(msg, *args)
        return
    if _deferred:  # one at a time: a caller that never waits (see write_deferred) gains nothing
        write_deferred()
    if logger.isEnabledFor(logging.INFO):
        bound_now = dict(_bound) if _state["format"] == "json" else None
        _deferred.append((logger, time.time(), msg, args, bound_now))


def write_deferred() -> None:
    """Log the lines ``defer`` put off (they join the held lines, or go to the file)."""
    if not _deferred:  # the usual case: called around every per-job Redis call
        return
    handler = _state.get("file")
    if handler is None:
        _deferred.clear()
        return
    handler.acquire()  # an RLock: emit and flush call this with it held
    try:
        while _deferred:
            logger, created, msg, args, bound_then = _deferred.pop(0)
            record = logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, msg,
                                       args, None, "(unknown function)", bound_then)
            record.created = created  # the time of the call, as logging.LogRecord sets it
            record.msecs = int((created - int(created)) * 1000) + 0.0
            record.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
            logger.handle(record)
    finally:
        handler.release()


def setup(role: str, logfile: str = "", level: str = "INFO", fmt: str = "text") -> None:
    # No line names its thread, its multiprocessing process or the file and line that
    # logged it: not gathering them (logging's documented switches, the last one
    # ``_srcfile``) saves a sixth of a line's cost, and a worker writes a line per job.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    _state["role"] = role
    _state["format"] = fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler: logging.Handler = LogFile(logfile) if logfile else logging.StreamHandler(sys.stderr)
    _state["file"] = handler
    handler.addFilter(_RoleFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # redis-py logs routine connection chatter at DEBUG; keep our debug log about us.
    logging.getLogger("redis").setLevel(max(logging.INFO, logging.getLevelName(level)))


def set_role(role: str) -> None:
    """A new process identity (a worker just forked from the master): nothing the parent
    had bound speaks for it."""
    _state["role"] = role
    _bound.clear()


def role() -> str:
    return _state["role"]


def log_format() -> str:
    return _state["format"]


def streams_follow(path: str) -> None:
    """Record that stdout/stderr were redirected onto ``path`` (a daemon's log file), so
    that ``reopen`` points them at the new file after a rotation."""
    _streams["path"] = path


def reopen_streams(path: str | None = None) -> None:
    """Point stdout and stderr at the log file's current inode again (after logrotate, or a
    HUP that changed the log file). Does nothing unless the streams follow a file."""
    target = path if path is not None else _streams.get("path", "")
    if "path" not in _streams or not target:
        return
    try:
        out = open_log(target)
    except OSError as exc:  # keep the old target rather than fail on a signal
        logging.getLogger(LOG).error("cannot reopen the log file %s for stdout and stderr: "
                                     "%s; keeping the old one", target, exc.strerror)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    _streams["path"] = target


def reopen() -> None:
    """Reopen file handlers onto their path (after logrotate moved the file), and the
    standard streams when they follow the log file (every process does it for itself:
    a worker's stderr is its own file descriptor)."""
    reopen_streams()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            failed = _reopen_handler(handler)
            if failed is not None:  # logged once the handler's lock is released
                logging.getLogger(LOG).error("cannot reopen the log file %s: %s; keeping the "
                                             "old one", handler.baseFilename, failed.strerror)


def _reopen_handler(handler: logging.FileHandler) -> OSError | None:
    """Point ``handler`` at its path's current file; on failure keep the old stream."""
    handler.acquire()
    try:
        if isinstance(handler, LogFile) and handler._held:
            handler._write_held()  # to the file they were written for
        new = handler._open()
    except OSError as exc:
        return exc
    else:
        if handler.stream:
            handler.stream.close()
        handler.stream = new
        return None
    finally:
        handler.release()
