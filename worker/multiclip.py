"""A multi-clip job's source, read once for all of its clips.

A job with ``clips`` cuts many clips of one source (worker.job). Cut as that many jobs, each
clip would read the source on its own: a share of it in place, or all of it where the
server does not seek, ``range_requests`` is off, or the host cache bought it. A
``ClipSession`` holds what the job's clips share, in the job's folder, for as long as the
job runs: the source's remote handle, what reading it in place has cost so far, its size
and duration once a read told them, and, once the job has one, the whole source as a local
file that every later clip is cut from (``source_read`` ``shared``, no byte read).

The plan, per clip (the single-job plan of worker.pipeline, with the job's own copy first):

1. the job's copy, when it has one;
2. the host cache's kept copy (worker.cache), asked once per job;
3. in place through the relay, while that is expected to cost less than the whole source:
   the first clip always (it tells the size and the duration), the next ones while the
   clips still to cut, at OVERHEAD bytes per byte of their share of the source, come to
   less than its size, and the bytes read in place so far do too;
4. else the whole source, once, into the job's folder (and offered to the host cache).

Since every clip of the job is known up front, the choice after the first clip is made on
what is left to cut, not guessed; and reads in place stop once they have cost the size,
so however the estimate errs, the job reads at most about twice the source (plus one
clip's share), never once per clip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from types import TracebackType
from urllib.parse import urlsplit

from . import relay, source
from .context import JobContext
from .health import work_dir_failure
from .job import Job
from .pipeline import Pipeline, Result, _Read

# Bytes read in place per byte of a clip's share of the source: the index, and the GOP
# before the start (copy) or the preroll (encode). bench.long_source measured 2.0-2.1.
OVERHEAD = 2.0


class ClipSession:
    """The source of one multi-clip job, shared by its clips (``clips``: those still to
    cut, in order). A context manager: the job's folder lives while it is open."""

    def __init__(self, pipeline: Pipeline, job: Job, clips: list[Job]) -> None:
        self.pipeline = pipeline
        self.url = job.url
        self.scheme = urlsplit(job.url).scheme.lower()
        self.pending = list(clips)
        self.dir = os.path.join(pipeline.worker_dir, "job")
        self.copy = os.path.join(self.dir, "source")
        self.local = False  # the whole source is in ``copy``
        self.how, self.nbytes = "", 0  # how the copy came, and its bytes (the first user's)
        self.asked_cache = False
        self.in_place = 0  # bytes read through the relay by this job's clips
        self.size: int | None = None  # the source's, once a read in place told it
        self.duration: float | None = None  # the same, from ffmpeg's report
        self._src: source.RemoteSource | None = None

    def __enter__(self) -> ClipSession:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.makedirs(self.dir)
        except OSError as exc:  # the host's fault: the worker then probes it (worker.health)
            raise work_dir_failure(exc, f"cannot create {self.dir}") from None
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, clip: Job, deadline: float) -> Result:
        """Cut and store one clip (by ``deadline``, time.monotonic()), as Pipeline.run does
        for a job of its own, reading the source by the job's plan."""
        p = self.pipeline
        ctx = JobContext(deadline, p.limits, p.waker, p.should_abort, p.on_stage,
                         p.on_progress, room=lambda size: p._room_for(size, self.dir))
        try:
            return p._run(clip, ctx, self.dir, read=self._read)
        finally:
            if clip in self.pending:
                self.pending.remove(clip)
            with contextlib.suppress(FileNotFoundError):  # stored, or failed: not kept
                os.unlink(os.path.join(self.dir, f"clip.{clip.format}"))

    # --- the plan ------------------------------------------------------------------------------

    def _read(self, ctx: JobContext, clip: Job, clip_path: str) -> _Read:
        p = self.pipeline
        if self.scheme == "file":  # read where it is: nothing to share
            path = source.local_path(clip.url, ctx.limits.max_bytes)
            return _Read("local", os.path.getsize(path), p._clip(ctx, clip, path, clip_path))
        if not self.local:
            if self._src is None:
                self._src = p._remote_source(self.url, self.scheme)
            if p.cache is not None and not self.asked_cache:  # 2. the host's kept copy
                self.asked_cache = True
                if p._kept(ctx, clip, self._src, self.copy):
                    self.local, self.how = True, "cache"
        if not self.local and not self._download_first():  # 3. in place
            with relay.Relay(self._src.remote, ctx) as feed:
                cut = p._clip_in_place(ctx, clip, feed, clip_path)
                if cut is not None:
                    self.in_place += feed.bytes_in
                    self.size = feed.size or self.size
                    self.duration = cut.source_duration or self.duration
                    if p.cache is not None:
                        p.cache.rent(self.url, feed.identity, feed.bytes_in)
                    return _Read("ranges", feed.bytes_in, cut)
                answer = feed.take_whole()  # a server that does not seek: its whole answer
            self._download(ctx, answer)
        elif not self.local:
            self._download(ctx, None)  # 4. the whole source, once
        how, nbytes = (self.how, self.nbytes) if self.how else ("shared", 0)
        self.how = ""  # later clips share it: no byte read for them
        return _Read(how, nbytes, p._clip(ctx, clip, self.copy, clip_path))

    def _download_first(self) -> bool:
        """Whether the whole source costs less than reading the rest in place (see above)."""
        if not self.pipeline.config.job.range_requests:
            return True
        if not self.size or not self.duration:
            return False  # nothing known yet: the next read in place tells
        if self.in_place >= self.size:
            return True
        left = sum(self._length(clip, self.duration) for clip in self.pending)
        return OVERHEAD * left >= self.duration

    @staticmethod
    def _length(clip: Job, duration: float) -> float:
        """Seconds of the source a clip covers, within a source of ``duration``."""
        start = min(clip.start, duration)
        end = duration if clip.end is None else min(clip.end, duration)
        return max(0.0, end - start)

    def _download(self, ctx: JobContext, answer: source.Answer | None) -> None:
        assert self._src is not None
        nbytes, identity = self._src.download(self.copy, ctx, answer)
        self.local, self.how, self.nbytes = True, "download", nbytes
        cache = self.pipeline.cache
        if cache is not None:
            cache.keep(self.url, self.copy, identity)
