"""Logging shared by the master and its workers.

All processes append to one file (O_APPEND keeps each line whole), and every line names the
process role and pid, so one file tells the story of the whole pool. ``reopen()`` follows a
logrotate rename (the master calls it on USR1 and passes USR1 on to its workers).
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOG = "clip-supervisor"
_state = {"role": "main", "format": "text"}


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _state["role"]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": getattr(record, "role", _state["role"]),
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(message)s"


def setup(role: str, logfile: str = "", level: str = "INFO", fmt: str = "text") -> None:
    _state["role"] = role
    _state["format"] = fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile, mode="a", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # redis-py logs routine connection chatter at DEBUG; keep our debug log about us.
    logging.getLogger("redis").setLevel(max(logging.INFO, logging.getLevelName(level)))


def set_role(role: str) -> None:
    _state["role"] = role


def reopen() -> None:
    """Reopen file handlers onto their path (after logrotate moved the file)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
