"""prometheus-client's multiprocess files, made safe on a full file system.

In multiprocess mode each process keeps its metric values in memory-mapped files that
prometheus-client makes sparse (``truncate``). On a full file system the first write to a
page that has no block yet does not fail: the kernel kills the process with SIGBUS. A
counter would then kill a worker, or the master at start, at the worst moment. Here:

* every such file is allocated for real (``posix_fallocate``) when it is made and before it
  grows, so a full file system is an ``OSError`` at that point instead of a SIGBUS later;
* every metric value swallows that error: the value is dropped and the process logs one
  warning (metrics are never worth a job or a worker);
* ``retire(pid)`` folds the counters and histograms of a process that has exited into one
  file per kind, so a long-lived pool that recycles its workers does not leave a file per
  worker it ever ran (the collector's sums stay the same).

``install()`` must run before the first metric is created (worker.metrics calls it).
"""

from __future__ import annotations

import glob
import logging
import os
import struct
import threading
from typing import Any

from prometheus_client import mmap_dict, multiprocess, values

log = logging.getLogger(__name__)
RETIRED = "retired"  # the "pid" of the files that hold the sums of exited processes
# Held while a retired process's values move into the sums, and while the master's collector
# reads the files: a scrape in between would see them twice or not at all, and a counter
# that goes down reads as a reset to Prometheus.
_FOLDING = threading.Lock()


class _AllocatedDict(mmap_dict.MmapedDict):
    """An MmapedDict whose file blocks exist before they are mapped."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                try:
                    os.posix_fallocate(fd, 0, size or mmap_dict._INITIAL_MMAP_SIZE)
                except OSError:
                    if size == 0:  # ours and empty: an empty file would break the collector
                        os.unlink(filename)
                    raise
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        encoded = key.encode("utf-8")
        padded = len(encoded) + (8 - (len(encoded) + 4) % 8)
        need = self._used + struct.calcsize(f"i{padded}sdd")
        capacity = self._capacity
        while need > capacity:
            capacity *= 2
        if capacity != self._capacity:
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)


_warned = False


def _dropped(exc: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("metrics: cannot write to %s (%s); this process's metric values are "
                    "dropped from now on", os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                    exc.strerror or exc)


def _guarded(cls: Any) -> Any:
    class GuardedValue:
        """A metric value that never raises: on a file-system error it goes quiet."""

        _multiprocess = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner: Any = None
            try:
                self._inner = cls(*args, **kwargs)
            except OSError as exc:
                _dropped(exc)

        def _call(self, name: str, *args: Any) -> Any:
            if self._inner is None:
                return None
            try:
                return getattr(self._inner, name)(*args)
            except OSError as exc:
                self._inner = None
                _dropped(exc)
                return None

        def inc(self, amount: float) -> None:
            self._call("inc", amount)

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._call("set", value, timestamp)

        def set_exemplar(self, exemplar: Any) -> None:
            self._call("set_exemplar", exemplar)

        def get(self) -> float:
            return self._call("get") or 0.0

        def get_exemplar(self) -> Any:
            return self._call("get_exemplar")

    return GuardedValue


def install() -> None:
    """Use allocated files and quiet values (only in multiprocess mode)."""
    if getattr(values.ValueClass, "_multiprocess", False) and \
            not getattr(values, "_clip_guarded", False):
        values.MmapedDict = _AllocatedDict  # type: ignore[attr-defined]
        values.ValueClass = _guarded(values.ValueClass)
        values._clip_guarded = True  # type: ignore[attr-defined]
        collect = multiprocess.MultiProcessCollector.collect

        def collect_whole(self: Any) -> Any:
            with _FOLDING:
                return list(collect(self))

        multiprocess.MultiProcessCollector.collect = collect_whole  # type: ignore[method-assign]


def retire(pid: int) -> None:
    """Add the counters and histograms of exited process ``pid`` to the retired files and
    remove its own. Its gauges are the caller's business (``mark_process_dead``)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for kind in ("counter", "histogram", "summary"):
        path = os.path.join(folder, f"{kind}_{pid}.db")
        if os.path.exists(path):
            with _FOLDING:
                _fold(path, os.path.join(folder, f"{kind}_{RETIRED}.db"))


def _fold(path: str, into: str) -> None:
    try:
        entries = list(mmap_dict.MmapedDict.read_all_values_from_file(path))
        total = _AllocatedDict(into)
        try:
            for key, _value, _timestamp, _pos in entries:
                total.read_value(key)  # every key's place first: only this can fail
            for key, value, _timestamp, _pos in entries:
                old, _ = total.read_value(key)
                total.write_value(key, old + value, 0.0)
        finally:
            total.close()
        os.unlink(path)
    except (OSError, ValueError, struct.error) as exc:  # left as it is: the sums stay right
        log.warning("metrics: cannot fold %s into the retired sums (%s)", path, exc)


def files() -> list[str]:
    """The multiprocess files now in the folder (for tests and diagnostics)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    return sorted(glob.glob(os.path.join(folder, "*.db"))) if folder else []
