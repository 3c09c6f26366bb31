"""One job's stages: fetch the source, probe it, clip it, check the clip, store it.

The pipeline knows nothing about Redis: it takes a parsed Job, works inside a fresh folder of
its own under the worker's folder (removed whatever happens), reports stage changes and
progress through callbacks, and either returns a result or raises a JobFailed/Aborted.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import media, relay, source
from .cache import Identity, SourceCache
from .config import Config
from .errors import JobFailed, Permanent, Transient
from .health import MIN_FREE_BYTES, is_disk_error, work_dir_failure
from .job import Job
from .storage import store_for
from .wake import Waker

log = logging.getLogger(__name__)
_Answer = tuple[source.PinnedConnection, http.client.HTTPResponse]  # an unread HTTP answer

# A clip shorter than this share of the range asked for means the source was cut short.
MIN_OUTPUT_SHARE = 0.5


@dataclass
class Result:
    output: str
    source_duration: float = 0.0
    clip_start: float = 0.0
    clip_end: float = 0.0
    out_time: float = 0.0
    size: int = 0
    bytes_in: int = 0
    read: str = ""  # how the source was read: "ranges", "download", "cache" or "local"
    timings: dict[str, float] = field(default_factory=dict)


_caches: dict[tuple[str, int, int, str], SourceCache] = {}


def _source_cache(config: Config) -> SourceCache:
    """The worker's one SourceCache for this configuration (a pipeline is made per job)."""
    cfg = config.job
    key = (cfg.cache_dir or os.path.join(cfg.work_dir, "cache"), cfg.cache_max_bytes,
           _free_needed(config), cfg.work_dir)
    if key not in _caches:
        _caches[key] = SourceCache(key[0], key[1], keep_free=key[2], work_dir=key[3])
    return _caches[key]


def _free_needed(config: Config) -> int:
    # What the cache leaves free for the jobs: room for one source of the largest size.
    return min(config.job.max_source_bytes, 1 << 40)


class Pipeline:
    def __init__(self, config: Config, worker_dir: str, waker: Waker,
                 should_abort: Callable[[], bool],
                 on_stage: Callable[[str], None],
                 on_progress: Callable[[float, str], None]) -> None:
        self.config = config
        self.worker_dir = worker_dir
        self.waker = waker
        self.should_abort = should_abort
        self.on_stage = on_stage
        self.on_progress = on_progress
        self.cache = _source_cache(config) if config.job.cache_max_bytes else None

    def already_stored(self, job: Job) -> bool:
        """True when an earlier attempt of this job stored its output (by this job id)."""
        store = store_for(job.output, self.worker_dir, self.config.storage)
        return store.exists(job.output, job.id)

    def run(self, job: Job, deadline: float) -> Result:
        job_dir = os.path.join(self.worker_dir, "job")
        shutil.rmtree(job_dir, ignore_errors=True)
        try:
            os.makedirs(job_dir)
        except OSError as exc:  # the host's fault: the worker then probes it (worker.health)
            raise work_dir_failure(exc, f"cannot create {job_dir}") from None
        try:
            return self._run(job, job_dir, deadline)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _stage(self, result: Result, name: str, started: float) -> float:
        now = time.monotonic()
        result.timings[name] = round(now - started, 3)
        return now

    def _run(self, job: Job, job_dir: str, deadline: float) -> Result:
        result = Result(output=job.output)
        clip_path = os.path.join(job_dir, f"clip.{job.format}")
        started = time.monotonic()

        # No separate ffprobe: ffmpeg's own report on its input validates the job (format,
        # video stream, start before the end), which saves a process per job (~0.14 s here).
        self.on_stage("fetch")
        scheme = urlsplit(job.url).scheme.lower()
        # Only the floor up front (for the clip): what a download needs is checked against
        # the source's own size once its server or bucket has told it (_room_for).
        self._room_for(0, job_dir)
        outcome, whole, local = None, None, None
        if self.cache is not None and scheme in ("http", "https", "gs"):
            local = self._cached(self.cache, job, job_dir, deadline, result)
        if local is None and self.config.job.range_requests and scheme in ("http", "https"):
            # "fetch" until ffmpeg has read the source's index through the relay, then "clip"
            def opened() -> None:
                nonlocal started
                started = self._stage(result, "fetch", started)
                self.on_stage("clip")

            outcome, whole = self._clip_in_place(job, clip_path, deadline, result, opened)
        if outcome is None:  # a local copy first: cached, not http(s), or no seeking
            if local is None:
                local = self._fetch(job, job_dir, deadline, result, whole)
            started = self._stage(result, "fetch", started)
            self.on_stage("clip")
            outcome = self._clip(job, local, clip_path, deadline)
        clip, expected = outcome
        result.source_duration = clip.source_duration or 0.0
        end = job.end if clip.source_duration is None else (
            clip.source_duration if job.end is None else min(job.end, clip.source_duration))
        result.clip_start, result.clip_end = job.start, end if end is not None else 0.0
        self._verify(clip, clip_path, expected)
        result.out_time, result.size = clip.out_time, os.path.getsize(clip_path)
        started = self._stage(result, "clip", started)

        self.on_stage("store")
        if time.monotonic() > deadline:
            raise Transient("timeout", "the job exceeded its timeout before storing")
        store = store_for(job.output, self.worker_dir, self.config.storage)
        store.put(clip_path, job.output, {
            "job_id": job.id, "source": job.url, "start": f"{job.start:g}",
            "end": f"{result.clip_end:g}"})
        self._stage(result, "store", started)
        return result

    def _clip(self, job: Job, src: str, clip_path: str, deadline: float,
              read: relay.Relay | None = None, on_input: Callable[[], None] | None = None,
              ) -> tuple[media.ClipResult, float]:
        """Run ffmpeg on a local file, or on the job's relay (``read``)."""
        cfg = self.config.job
        length = None if job.end is None else job.end - job.start
        cmd = media.clip_command(cfg.ffmpeg, src, clip_path, job.start, length, job.mode,
                                 job.muxer, cfg.encode_preset,
                                 # ffmpeg's own network timeout, after the relay's and ours
                                 rw_timeout=None if read is None else cfg.stall_timeout + 5)
        run = media.FFmpegRun(cmd, job.start, job.end, deadline, cfg.stall_timeout, self.waker,
                              self.should_abort, self.on_progress,
                              env=None if read is None else read.ffmpeg_env(),
                              on_input=on_input,
                              activity=None if read is None else lambda: read.last_activity)
        try:
            return run.run(), run.length
        except JobFailed as exc:
            if read is None:
                raise
            if read.error is not None:  # ffmpeg saw a failed read; this is why
                raise read.error from None
            # ffmpeg's words name the relay: name the source instead
            raise type(exc)(exc.reason, exc.error.replace(read.url, job.url)) from None

    def _limits(self) -> source.FetchLimits:
        cfg = self.config.job
        return source.FetchLimits(connect_timeout=cfg.connect_timeout,
                                  stall_timeout=cfg.stall_timeout,
                                  max_bytes=cfg.max_source_bytes,
                                  allow_private=cfg.allow_private_networks)

    def _clip_in_place(self, job: Job, clip_path: str, deadline: float, result: Result,
                       opened: Callable[[], None],
                       ) -> tuple[tuple[media.ClipResult, float] | None, _Answer | None]:
        """Clip an http(s) source that ffmpeg reads through the job's relay, if its server
        seeks. If not: (None, the server's 200 answer with the whole file, if it sent one)."""
        with relay.Relay(job.url, self._limits(), deadline) as read:
            try:
                outcome = self._clip(job, read.url, clip_path, deadline, read, opened)
            except JobFailed:
                if read.no_ranges and read.error is None:
                    log.debug("job %s: %s does not answer Range requests: downloading it",
                              job.id, job.url)
                    return None, read.take_whole()
                raise
        if read.error is not None:  # the clip may look fine, but a read failed
            raise read.error
        result.bytes_in, result.read = read.bytes_in, "ranges"
        if self.cache is not None and read.size:
            self.cache.rent(job.url, Identity(read.size, read.validator), read.bytes_in)
        log.debug("job %s: read %d of %s bytes in %d range requests", job.id, read.bytes_in,
                  read.size, read.requests)
        return outcome, None

    def _fetch(self, job: Job, job_dir: str, deadline: float, result: Result,
               whole: _Answer | None = None) -> str:
        """The source as a local file: downloaded (``whole``: from that answer), or in place
        for ``file://``."""
        cfg = self.config.job
        scheme = urlsplit(job.url).scheme.lower()
        if scheme == "file":
            path = source.local_path(job.url, cfg.max_source_bytes)
            result.bytes_in = os.path.getsize(path)
            result.read = "local"
            return path
        if scheme in ("http", "https"):
            dest = os.path.join(job_dir, "source")
            room = functools.partial(self._room_for, job_dir=job_dir)
            if whole is None:
                result.bytes_in, identity = source.fetch_http(
                    job.url, dest, self._limits(), deadline, self.should_abort, self.waker,
                    room=room)
            else:
                result.bytes_in, identity = source.download(
                    *whole, job.url, dest, self._limits(), deadline, self.should_abort,
                    self.waker, room=room)
            result.read = "download"
            self._keep(job, dest, identity)
            return dest
        if scheme == "gs":
            from . import gcs  # not imported by a worker that never sees gs:// (see storage)

            dest = os.path.join(job_dir, "source")
            # The object's size first (one metadata request), so that a download that cannot
            # fit is not started: filling the disk would fail the other workers' jobs too.
            now = gcs.identify(job.url, self.config.storage)
            if now is not None and now.size <= cfg.max_source_bytes:
                self._room_for(now.size, job_dir)
            try:
                result.bytes_in, identity = gcs.download(job.url, dest, self.config.storage,
                                                         cfg.max_source_bytes, deadline,
                                                         self.should_abort)
            except OSError as exc:
                if not is_disk_error(exc):
                    raise
                raise work_dir_failure(exc, f"writing {job.url} into {dest}") from None
            result.read = "download"
            self._keep(job, dest, identity)
            return dest
        raise Permanent("scheme_not_allowed", f"{scheme}:// sources are not supported")

    def _keep(self, job: Job, path: str, identity: Identity | None) -> None:
        if self.cache is not None and self.cache.keep(job.url, path, identity):
            log.debug("job %s: %s kept in the source cache", job.id, job.url)

    def _cached(self, cache: SourceCache, job: Job, job_dir: str, deadline: float,
                result: Result) -> str | None:
        """The source from the host's cache (see worker.cache): its kept copy once the source
        confirms it is unchanged, or a whole download that is kept, once reading it in
        place has cost its size. None: read it as usual."""
        local = self._from_cache(cache, job, job_dir, deadline, result)
        if local is None and cache.worth_buying(job.url):
            with cache.buying(job.url) as mine:  # one worker downloads; the others go on
                if mine:
                    local = self._from_cache(cache, job, job_dir, deadline, result) or \
                        self._fetch(job, job_dir, deadline, result)
        return local

    def _from_cache(self, cache: SourceCache, job: Job, job_dir: str, deadline: float,
                    result: Result) -> str | None:
        entry = cache.lookup(job.url)
        if entry is None or entry.identity.size > self.config.job.max_source_bytes:
            return None
        if urlsplit(job.url).scheme.lower() == "gs":
            from . import gcs  # lazily, as in _fetch

            now = gcs.identify(job.url, self.config.storage)
        else:
            now = source.identify(job.url, self._limits(), deadline, self.should_abort,
                                  self.waker)
        if now != entry.identity:
            log.info("job %s: %s changed since it was kept: reading it afresh", job.id,
                     job.url)
            cache.forget(job.url)
            return None
        dest = os.path.join(job_dir, "source")
        if not cache.use(entry, dest):
            return None
        result.bytes_in, result.read = 0, "cache"
        return dest

    def _room_for(self, size: int, job_dir: str) -> None:
        """Room in work_dir for a source of ``size`` bytes about to be written (0: none, the
        check every job passes first), plus MIN_FREE_BYTES for the clip and the other
        workers; the source cache gives way first. Measured against the source's real size:
        a small source runs on a nearly full disk, a large one waits for room."""
        needed = size + MIN_FREE_BYTES
        usage = shutil.disk_usage(job_dir)
        if size and needed > usage.total:
            # No amount of waiting makes it fit here: the job's problem, retried (another
            # host may have a larger disk) and counted.
            raise Transient("source_too_large_for_disk",
                            f"the source is {size} bytes; work_dir's file system holds "
                            f"{usage.total} bytes in all, and jobs keep {MIN_FREE_BYTES} free")
        if usage.free < needed and self.cache is not None:
            self.cache.make_room(needed, job_dir)  # the cache gives way first
            usage = shutil.disk_usage(job_dir)
        if usage.free < needed:
            wanted = (f"{needed} needed ({size} for the source, {MIN_FREE_BYTES} besides)"
                      if size else f"less than the {MIN_FREE_BYTES} every job needs")
            raise Transient("disk_full", f"{usage.free} bytes free in work_dir, {wanted}")

    @staticmethod
    def _verify(clip: media.ClipResult, path: str, expected: float) -> None:
        # ffmpeg can exit 0 on a broken input with a tiny or empty output (FIELD-NOTES): check
        # what it reports it wrote, and the file itself, before storing anything.
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise Permanent("media_error", "ffmpeg wrote no output file") from None
        if size == 0 or clip.out_time <= 0:
            raise Permanent("media_error", f"ffmpeg wrote an empty clip ({size} bytes)")
        if clip.out_time < expected * MIN_OUTPUT_SHARE:
            raise Permanent("media_error", f"the clip is {clip.out_time:.2f} s long, "
                            f"{expected:.2f} s were asked for: the source is damaged")
