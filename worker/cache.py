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
``.tmp-<pid>-<key>`` a file on its way in. Keys are SHA-256 digests of the URL: no URL (it may
hold a token) is written down.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

RECORD_TTL = 24 * 3600.0  # a source's rent is forgotten after a day without use
PRUNE_EVERY = 600.0  # seconds between two sweeps of old records by one worker


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


class SourceCache:
    def __init__(self, directory: str, max_bytes: int, keep_free: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep_free = keep_free  # bytes the work folder needs free for a job
        self._pruned_at = 0.0

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:40]

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}{suffix}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
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
        return record if isinstance(record, dict) else None

    def _write(self, key: str, record: dict) -> None:
        tmp = self._path(f".tmp-{os.getpid()}-{key}", ".json")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self._path(key, ".json"))

    def _drop(self, key: str) -> None:
        for suffix in (".data", ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key, suffix))

    # --- using a kept file -------------------------------------------------------------

    def lookup(self, url: str) -> Entry | None:
        """The kept file of ``url``, if any (still to be confirmed with the source)."""
        key = self.key(url)
        record = self._read(key)
        if not record or not record.get("kept"):
            return None
        identity = Identity(int(record["size"]), str(record["validator"]))
        return Entry(key, self._path(key, ".data"), identity)

    def use(self, entry: Entry, dest: str) -> bool:
        """Link the kept file to ``dest`` (a link stays valid if the entry is evicted while
        ffmpeg reads it); False if it is gone or was replaced meanwhile."""
        with self._locked():
            record = self._read(entry.key)
            if not record or not record.get("kept") or Identity(
                    int(record["size"]), str(record["validator"])) != entry.identity:
                return False
            try:
                os.link(entry.path, dest)
            except OSError as exc:
                log.warning("source cache: cannot link %s: %s", entry.path, exc.strerror)
                return False
            os.utime(entry.path)  # recently used: evicted last
            return True

    def forget(self, url: str) -> None:
        """The source changed: its kept file and its rent are worth nothing now."""
        with self._locked():
            self._drop(self.key(url))

    # --- renting and buying ------------------------------------------------------------

    def rent(self, url: str, identity: Identity | None, nbytes: int) -> bool:
        """Count ``nbytes`` read in place from ``url``; True when they add up to its size,
        so that the next clip from it should download it whole."""
        if identity is None or not identity.validator or identity.size <= 0:
            return False  # a source that cannot be confirmed unchanged is never kept
        key = self.key(url)
        with self._locked():
            record = self._read(key)
            if not record or (record.get("size"), record.get("validator")) != (
                    identity.size, identity.validator):
                if record and record.get("kept"):
                    self._drop(key)  # a kept file of an older version
                record = {"size": identity.size, "validator": identity.validator,
                          "rent": 0, "kept": False}
            record["rent"] = int(record.get("rent", 0)) + nbytes
            self._write(key, record)
            self._prune()
        return record["rent"] >= identity.size and identity.size <= self.max_bytes

    def worth_buying(self, url: str) -> bool:
        record = self._read(self.key(url))
        return bool(record and not record.get("kept")
                    and int(record.get("rent", 0)) >= int(record.get("size", 0)) > 0
                    and int(record["size"]) <= self.max_bytes)

    @contextlib.contextmanager
    def buying(self, url: str) -> Iterator[bool]:
        """Hold the right to download ``url`` for the cache: True for one worker at a time
        (the others go on reading in place). The kernel lets go of it if the worker dies."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self._path(self.key(url), ".buy"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def keep(self, url: str, path: str, identity: Identity | None) -> bool:
        """Keep the downloaded ``path`` (which the job goes on using) as ``url``'s file."""
        if identity is None or not identity.validator or not 0 < identity.size <= self.max_bytes:
            return False
        key = self.key(url)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = self._path(f".tmp-{os.getpid()}-{key}", ".data")
        try:
            try:
                os.link(path, tmp)  # same file system: no copy, no extra space
            except FileExistsError:
                os.unlink(tmp)
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
        except OSError as exc:
            log.warning("source cache: cannot keep a source: %s", exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        with self._locked():
            if not self._make_room(identity.size, exclude=key):
                os.unlink(tmp)
                return False
            os.replace(tmp, self._path(key, ".data"))
            self._write(key, {"size": identity.size, "validator": identity.validator,
                              "rent": 0, "kept": True})
        return True

    # --- room --------------------------------------------------------------------------

    def make_room(self, free_needed: int, path: str) -> None:
        """Evict kept files, least recently used first, until the file system of ``path``
        has ``free_needed`` bytes free (or nothing is left to evict)."""
        if not os.path.isdir(self.directory):
            return
        with self._locked():
            for key, _, _ in self._kept():
                if shutil.disk_usage(path).free >= free_needed:
                    return
                log.info("source cache: evicting %s for free space", key)
                self._drop(key)

    def _kept(self) -> list[tuple[str, float, int]]:
        """(key, last use, size) of the kept files, least recently used first."""
        kept = []
        for name in os.listdir(self.directory):
            if name.endswith(".data") and not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(self.directory, name))
                    kept.append((name[:-5], st.st_mtime, st.st_size))
        return sorted(kept, key=lambda k: k[1])

    def _make_room(self, size: int, exclude: str) -> bool:
        """Under the lock: evict until ``size`` more bytes fit in max_bytes and the work
        folder keeps ``keep_free``; False if they cannot."""
        kept = [k for k in self._kept() if k[0] != exclude]
        used = sum(k[2] for k in kept)
        for key, _, old in kept:
            if used + size <= self.max_bytes and \
                    shutil.disk_usage(self.directory).free >= self.keep_free:
                break
            log.info("source cache: evicting %s (%d bytes)", key, old)
            self._drop(key)
            used -= old
        return used + size <= self.max_bytes and \
            shutil.disk_usage(self.directory).free >= self.keep_free

    def _prune(self) -> None:
        """Under the lock, now and then: forget old rent records, and files left on their
        way in by workers that died."""
        now = time.time()
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            with contextlib.suppress(OSError):
                age = now - os.stat(path).st_mtime
                if name.startswith(".tmp-"):
                    pid = name.split("-")[1]
                    if age > 3600 or (pid.isdigit() and not _alive(int(pid))):
                        os.unlink(path)
                elif name.endswith((".json", ".buy")) and age > RECORD_TTL and \
                        not os.path.exists(path.rsplit(".", 1)[0] + ".data"):
                    os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
