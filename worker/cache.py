"""The host's cache of whole source files, shared by its workers.

Many clips are often cut from one source (the highlights of a match). Reading each of them
in place costs a share of the file per clip; downloading the file once and clipping the rest
from a local copy costs the whole file once. Which is cheaper depends on how many clips are
still to come, which nobody knows, so the cache decides like the ski-rental problem's
classic answer: keep reading in place ("renting") until the bytes read that way for one
source add up to its size, then download it whole ("buying") and keep it. That never reads
more than twice what the best choice in hindsight would have read, and a lone clip from a
long source still reads only its share.

A kept file is used only after the source has confirmed it is unchanged (the same size and
the same strong ETag or Last-Modified, asked with a one-byte range request). A source that
sends neither validator is never kept. The cache holds at most ``cache_max_bytes``, least
recently used files go first, and it gives way before the work folder runs short of space.

Layout of ``cache_dir`` (mode 0700): ``<key>.json`` the record of a source (size, validator,
bytes rented, whether kept), ``<key>.data`` the kept file, ``<key>.buy`` a lock held while
one worker downloads it, ``.lock`` the lock that every change of records is made under,
``.tmp-<pid>-<key>`` a file on its way in, ``.pruned`` when old records were last swept.
Keys are SHA-256 digests of the URL: no URL (it may hold a token) is written down; files are
0600. The folder must be on work_dir's file system (a kept file is hard-linked into the
job's folder, so eviction never pulls it from under ffmpeg); if it is not, or the cache
fails in any way (a full or read-only disk), the cache is off for that worker and says so
once: a cache error never fails a job.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

RECORD_TTL = 24 * 3600.0  # a source's rent is forgotten after a day without use
PRUNE_EVERY = 600.0  # seconds between two sweeps of old records (any worker)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Identity:
    """What a source says it is: its size and a validator (strong ETag, else Last-Modified)."""

    size: int
    validator: str


@dataclass(frozen=True)
class Entry:
    key: str
    path: str
    identity: Identity


def _tolerant(default: Any) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """A cache error is a miss: logged once, then the cache is off for this process."""

    def wrap(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def call(self: SourceCache, *args: Any, **kwargs: Any) -> _T:
            if self.off:
                return default
            try:
                return method(self, *args, **kwargs)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.turn_off(exc)
                return default
        return call
    return wrap


class SourceCache:
    def __init__(self, directory: str, max_bytes: int, keep_free: int,
                 work_dir: str | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep_free = keep_free  # bytes the work folder needs free for a job
        self.work_dir = work_dir  # where jobs link kept files to: the same file system
        self.off = False
        self._ready = False

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:40]

    def turn_off(self, exc: BaseException) -> None:
        if not self.off:
            log.warning("source cache %s is off for this worker: %s", self.directory,
                        getattr(exc, "strerror", None) or exc)
        self.off = True

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}{suffix}")

    def _prepare(self) -> None:
        """The folder: private to us, and on the work folder's file system."""
        if self._ready:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        st = os.stat(self.directory)
        if st.st_mode & 0o777 != 0o700:
            os.chmod(self.directory, 0o700)
        if self.work_dir is not None and os.stat(self.work_dir).st_dev != st.st_dev:
            raise ValueError(f"cache_dir is not on work_dir's file system ({self.work_dir})")
        self._ready = True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._prepare()
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self, key: str) -> dict | None:
        try:
            with open(self._path(key, ".json")) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("size"), int) or \
                not isinstance(record.get("validator"), str) or \
                not isinstance(record.get("rent", 0), int):
            return None  # not ours, or damaged: as good as absent
        return record

    def _write(self, key: str, record: dict) -> None:
        tmp = self._path(f".tmp-{os.getpid()}-{key}", ".json")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self._path(key, ".json"))

    def _drop(self, key: str) -> None:
        for suffix in (".json", ".data"):  # the record first: never "kept" without a file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key, suffix))

    # --- using a kept file -------------------------------------------------------------

    @_tolerant(None)
    def lookup(self, url: str) -> Entry | None:
        """The kept file of ``url``, if any (still to be confirmed with the source)."""
        key = self.key(url)
        record = self._read(key)
        if not record or not record.get("kept"):
            return None
        identity = Identity(record["size"], record["validator"])
        return Entry(key, self._path(key, ".data"), identity)

    @_tolerant(False)
    def use(self, entry: Entry, dest: str) -> bool:
        """Link the kept file to ``dest`` (a link stays valid if the entry is evicted while
        ffmpeg reads it); False if it is gone, damaged or was replaced meanwhile."""
        with self._locked():
            record = self._read(entry.key)
            if not record or not record.get("kept") or \
                    Identity(record["size"], record["validator"]) != entry.identity:
                return False
            try:
                size = os.stat(entry.path).st_size
            except FileNotFoundError:
                size = -1
            if size != entry.identity.size:  # removed from outside, or cut short
                log.warning("source cache: %s is missing or damaged: dropped", entry.key)
                self._drop(entry.key)
                return False
            os.link(entry.path, dest)
            os.utime(entry.path)  # recently used: evicted last
            return True

    @_tolerant(None)
    def forget(self, url: str) -> None:
        """The source changed: its kept file and its rent are worth nothing now."""
        with self._locked():
            self._drop(self.key(url))

    # --- renting and buying ------------------------------------------------------------

    @_tolerant(None)
    def rent(self, url: str, identity: Identity | None, nbytes: int) -> None:
        """Count ``nbytes`` read in place from ``url`` (when the next clip should download
        it whole instead: ``worth_buying``)."""
        if identity is None or not identity.validator or identity.size <= 0:
            return  # a source that cannot be confirmed unchanged is never kept
        key = self.key(url)
        with self._locked():
            record = self._read(key)
            if not record or (record["size"], record["validator"]) != (
                    identity.size, identity.validator):
                if record and record.get("kept"):
                    self._drop(key)  # a kept file of an older version
                record = {"size": identity.size, "validator": identity.validator,
                          "rent": 0, "kept": False}
            record["rent"] = record.get("rent", 0) + nbytes
            self._write(key, record)
            self._prune()

    @_tolerant(False)
    def worth_buying(self, url: str) -> bool:
        record = self._read(self.key(url))
        return bool(record and not record.get("kept")
                    and record.get("rent", 0) >= record["size"] > 0
                    and record["size"] <= self.max_bytes)

    @contextlib.contextmanager
    def buying(self, url: str) -> Iterator[bool]:
        """Hold the right to download ``url`` for the cache: True for one worker at a time
        (the others go on reading in place). The kernel lets go of it if the worker dies."""
        fd = None
        try:
            if not self.off:
                self._prepare()
                fd = os.open(self._path(self.key(url), ".buy"), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        except (OSError, ValueError) as exc:
            self.turn_off(exc)
        else:
            if fd is not None:
                try:
                    yield True
                finally:
                    os.close(fd)
                return
        if fd is not None:
            os.close(fd)
        yield False

    @_tolerant(False)
    def keep(self, url: str, path: str, identity: Identity | None) -> bool:
        """Keep the downloaded ``path`` (which the job goes on using) as ``url``'s file. If it
        cannot be kept, the reads counted for it start over (no download per clip)."""
        key = self.key(url)
        if identity is None or not identity.validator or \
                not 0 < identity.size <= self.max_bytes or os.path.getsize(path) != identity.size:
            with self._locked():
                self._drop(key)
            return False
        self._prepare()
        tmp = self._path(f".tmp-{os.getpid()}-{key}", ".data")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.link(path, tmp)  # the same file system (checked): no copy, no extra space
        try:
            os.chmod(tmp, 0o600)
            with self._locked():
                self._drop(key)  # the record first: a kill from here on leaves nothing kept
                if not self._make_room(identity.size, path):
                    log.info("source cache: no room for %d bytes: %s not kept", identity.size,
                             key)
                    return False
                os.replace(tmp, self._path(key, ".data"))
                self._write(key, {"size": identity.size, "validator": identity.validator,
                                  "rent": 0, "kept": True})
                self._prune()
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # --- room --------------------------------------------------------------------------

    @_tolerant(None)
    def make_room(self, free_needed: int, path: str) -> None:
        """Evict kept files, least recently used first, until the file system of ``path``
        has ``free_needed`` bytes free, if evicting can get there."""
        if not os.path.isdir(self.directory):
            return
        with self._locked():
            free = shutil.disk_usage(path).free
            evictable = [k for k in self._kept() if k[3]]
            if free >= free_needed or free + sum(k[2] for k in evictable) < free_needed:
                return  # nothing to do, or nothing that would do
            for key, _, size, _ in evictable:
                log.info("source cache: evicting %s (%d bytes) for free space", key, size)
                self._drop(key)
                free += size
                if free >= free_needed:
                    return

    def _kept(self) -> list[tuple[str, float, int, bool]]:
        """(key, last use, size, frees space when evicted: no job links it) of the kept
        files, least recently used first."""
        kept = []
        for name in os.listdir(self.directory):
            if name.endswith(".data") and not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(self.directory, name))
                    kept.append((name[:-5], st.st_mtime, st.st_size, st.st_nlink == 1))
        return sorted(kept, key=lambda k: k[1])

    def _make_room(self, size: int, path: str) -> bool:
        """Under the lock: evict until ``size`` more bytes fit in max_bytes and the work
        folder keeps ``keep_free`` (``path``, already on it, is the new file); False, and
        nothing evicted, if that cannot be reached."""
        kept = self._kept()
        used = sum(k[2] for k in kept)
        free = shutil.disk_usage(path).free
        evict, freed = [], 0
        for key, _, old, frees in kept:
            if used + size <= self.max_bytes and free + freed >= self.keep_free:
                break
            evict.append(key)
            used -= old
            freed += old if frees else 0
        if used + size > self.max_bytes or free + freed < self.keep_free:
            return False
        for key in evict:
            log.info("source cache: evicting %s to keep another source", key)
            self._drop(key)
        return True

    def _prune(self) -> None:
        """Under the lock, every PRUNE_EVERY seconds in all: forget old rent records, and
        files left on their way in by workers that died."""
        stamp = os.path.join(self.directory, ".pruned")
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            if now - os.stat(stamp).st_mtime < PRUNE_EVERY:
                return
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT, 0o600))
        os.utime(stamp)
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            with contextlib.suppress(OSError):
                age = now - os.stat(path).st_mtime
                if name.startswith(".tmp-"):
                    pid = name.split("-")[1]
                    if age > 3600 or (pid.isdigit() and not _alive(int(pid))):
                        os.unlink(path)
                elif name.endswith(".json") and age > RECORD_TTL and \
                        not os.path.exists(path[:-5] + ".data"):
                    os.unlink(path)
                elif name.endswith(".buy") and age > RECORD_TTL:
                    _unlink_lock(path)


def _unlink_lock(path: str) -> None:
    """Remove a ``.buy`` lock file unless a worker holds it."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
