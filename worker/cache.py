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
the same strong ETag or Last-Modified, asked with a one-byte range request; for a Cloud
Storage object, the same size and generation, from the metadata request every ``gs://`` job
makes). A source that sends neither validator is never kept. The cache holds at most
``cache_max_bytes``, least recently used files go first, and it gives way before the work
folder runs short of space.

Layout of ``cache_dir`` (mode 0700): ``<key>.json`` the record of a source (size, validator,
bytes rented, whether kept), ``<key>.data`` the kept file, ``<key>.buy`` a lock held while
one worker downloads it, ``.lock`` the lock that every change of records is made under,
``.tmp-<pid>-<key>`` a file on its way in, ``.pruned`` when old records were last swept.
Keys are SHA-256 digests of the URL: no URL (it may hold a token) is written down; files are
0600. The folder must be on work_dir's file system (a kept file is hard-linked into the
job's folder, so eviction never pulls it from under ffmpeg); if it is not, or the cache
fails in any way (a full or read-only disk), the cache is off for that worker and says so
once: a cache error never fails a job.

Nothing in the folder is trusted by its path alone: the folder is opened once, without
following a symbolic link, and must be ours and writable by nobody else (worker.fsafe);
every file in it is opened or linked relative to that descriptor with O_NOFOLLOW. A
symbolic link, or a file of another user, found in it is damage: the cache turns off, as
for any other cache error, and never reads or writes through it.
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
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .context import Identity
from .fsafe import UnsafePath, open_nofollow, private_dir
from .protocol import pid_alive

log = logging.getLogger(__name__)

RECORD_TTL = 24 * 3600.0  # a source's rent is forgotten after a day without use
PRUNE_EVERY = 600.0  # seconds between two sweeps of old records (any worker)
_T = TypeVar("_T")


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
        self._fd: int | None = None  # the folder, opened once it was checked

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:40]

    def turn_off(self, exc: BaseException) -> None:
        if not self.off:
            why = str(exc) if isinstance(exc, UnsafePath) else \
                getattr(exc, "strerror", None) or exc
            log.warning("source cache %s is off for this worker: %s", self.directory, why)
        self.off = True

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}{suffix}")

    def _prepare(self) -> int:
        """The folder's descriptor: private to us, and on the work folder's file system."""
        if self._fd is not None:
            return self._fd
        fd = private_dir(self.directory, "cache_dir")
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o777 != 0o700:
                os.fchmod(fd, 0o700)
            if self.work_dir is not None and os.stat(self.work_dir).st_dev != st.st_dev:
                raise ValueError(f"cache_dir is not on work_dir's file system ({self.work_dir})")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def _open(self, name: str, flags: int) -> int:
        """Open the folder's file ``name``: never through a symbolic link, never one of
        another user's (either is damage: UnsafePath, and the cache turns off)."""
        fd = open_nofollow(name, flags, 0o600, dir_fd=self._prepare(), what="cache file",
                           shown=os.path.join(self.directory, name))
        try:
            self._check_owner(os.fstat(fd), name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lstat(self, name: str) -> os.stat_result:
        """stat of ``name`` in the folder (FileNotFoundError if absent); UnsafePath for a
        symbolic link or a file of another user."""
        st = os.stat(name, dir_fd=self._prepare(), follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath("cache file", os.path.join(self.directory, name),
                             "is a symbolic link (not followed)")
        self._check_owner(st, name)
        return st

    def _check_owner(self, st: os.stat_result, name: str) -> None:
        if st.st_uid != os.geteuid():
            raise UnsafePath("cache file", os.path.join(self.directory, name),
                             f"owned by uid {st.st_uid}, not by us")

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._prepare())  # removes a link itself, never its target

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = self._open(".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self, key: str) -> dict | None:
        try:
            with open(self._open(f"{key}.json", os.O_RDONLY)) as f:
                record = json.load(f)
        except UnsafePath:
            raise  # damage, not absence: the cache turns off
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("size"), int) or \
                not isinstance(record.get("validator"), str) or \
                not isinstance(record.get("rent", 0), int):
            return None  # not ours, or damaged: as good as absent
        return record

    def _write(self, key: str, record: dict) -> None:
        tmp = f".tmp-{os.getpid()}-{key}.json"
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(fd, "w") as f:
            json.dump(record, f)
        dfd = self._prepare()
        os.replace(tmp, f"{key}.json", src_dir_fd=dfd, dst_dir_fd=dfd)

    def _drop(self, key: str) -> None:
        for suffix in (".json", ".data"):  # the record first: never "kept" without a file
            self._unlink(f"{key}{suffix}")

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
            name = f"{entry.key}.data"
            try:
                st = self._lstat(name)
                size = st.st_size if stat.S_ISREG(st.st_mode) else -1
            except FileNotFoundError:
                size = -1
            if size != entry.identity.size:  # removed from outside, or cut short
                log.warning("source cache: %s is missing or damaged: dropped", entry.key)
                self._drop(entry.key)
                return False
            # linkat(2) without AT_SYMLINK_FOLLOW, of the regular file just checked (nobody
            # else can swap it: the folder is ours alone)
            os.link(name, dest, src_dir_fd=self._prepare(), follow_symlinks=False)
            os.utime(name, dir_fd=self._prepare(), follow_symlinks=False)  # evicted last
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
                fd = self._open(f"{self.key(url)}.buy", os.O_RDWR | os.O_CREAT)
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
        dfd = self._prepare()
        tmp = f".tmp-{os.getpid()}-{key}.data"
        self._unlink(tmp)
        os.chmod(path, 0o600)  # the job's own download, which becomes the kept file
        os.link(path, tmp, dst_dir_fd=dfd)  # the same file system (checked): no copy
        try:
            with self._locked():
                self._drop(key)  # the record first: a kill from here on leaves nothing kept
                if not self._make_room(identity.size, path):
                    log.info("source cache: no room for %d bytes: %s not kept", identity.size,
                             key)
                    return False
                os.replace(tmp, f"{key}.data", src_dir_fd=dfd, dst_dir_fd=dfd)
                self._write(key, {"size": identity.size, "validator": identity.validator,
                                  "rent": 0, "kept": True})
                self._prune()
            return True
        finally:
            self._unlink(tmp)

    # --- room --------------------------------------------------------------------------

    @_tolerant(None)
    def make_room(self, free_needed: int, path: str) -> None:
        """Evict kept files, least recently used first, until the file system of ``path``
        has ``free_needed`` bytes free, if evicting can get there."""
        if self._fd is None and not os.path.isdir(self.directory):
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
        for name in os.listdir(self._prepare()):
            if name.endswith(".data") and not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    st = self._lstat(name)
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
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            if now - self._lstat(".pruned").st_mtime < PRUNE_EVERY:
                return
        fd = self._open(".pruned", os.O_WRONLY | os.O_CREAT)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
        dfd = self._prepare()
        for name in os.listdir(dfd):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                age = now - st.st_mtime
                if name.startswith(".tmp-"):
                    pid = tmp_owner(name)
                    if age > 3600 or (pid is not None and not pid_alive(pid)):
                        os.unlink(name, dir_fd=dfd)
                elif stat.S_ISLNK(st.st_mode):
                    os.unlink(name, dir_fd=dfd)  # planted: removed, never followed
                elif name.endswith(".json") and age > RECORD_TTL and \
                        not _exists(name[:-5] + ".data", dfd):
                    os.unlink(name, dir_fd=dfd)
                elif name.endswith(".buy") and age > RECORD_TTL:
                    self._unlink_lock(name)

    def _unlink_lock(self, name: str) -> None:
        """Remove a ``.buy`` lock file unless a worker holds it."""
        fd = self._open(name, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._unlink(name)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def remove_left(directory: str, dead: Callable[[int], bool]) -> int:
    """Remove the files that workers now dead left on their way in (``.tmp-<pid>-*`` with
    ``dead(pid)``). The master calls it when a worker it reaps did not exit cleanly, and at
    its start for the workers of a master that was killed, so that a kill during a write
    leaves nothing behind for long (``_prune`` would sweep it only some minutes later). How
    many were removed; a missing or unsafe folder holds nothing of ours to remove. Raises
    OSError when the folder cannot be read."""
    try:
        dfd = private_dir(directory, "cache_dir", create=False)
    except OSError:
        return 0
    removed = 0
    try:
        for name in os.listdir(dfd):
            pid = tmp_owner(name)
            if pid is not None and dead(pid):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)  # a link itself, never its target
                    removed += 1
    finally:
        os.close(dfd)
    return removed


PID_MAX = 1 << 22  # Linux's largest pid_max


def tmp_owner(name: str) -> int | None:
    """The pid in a ``.tmp-<pid>-...`` name, if it is one (a name any user could plant:
    anything else, "1e100", "²" or a number no pid can be, is None)."""
    if not name.startswith(".tmp-"):
        return None
    pid = name.split("-")[1]
    if not (pid.isascii() and pid.isdigit()):
        return None
    return int(pid) if 0 < int(pid) <= PID_MAX else None


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
