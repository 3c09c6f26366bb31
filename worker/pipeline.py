"""One job's path, top to bottom: read the source, clip it, check the clip, store it.

The pipeline knows nothing about Redis. A worker makes one, which owns the host's source
cache for as long as the worker lives; ``run`` takes a parsed Job, works inside a fresh
folder of its own under the worker's folder (removed whatever happens), reports stage
changes and progress through callbacks, and either returns a Result or raises a
JobFailed/Aborted. Everything a step of the job needs (deadline, abort check, waker,
limits, callbacks, the room check) travels in one JobContext, made once per job.

How the source is read is decided in one place, ``_read``, by its scheme and by what its
server answers, trying in turn:

1. cached: the host's kept copy (worker.cache), once the source confirms it is unchanged;
   or, once reading it in place has cost its size, a whole download that is kept;
2. ranges: ffmpeg reads it in place through the job's relay (worker.relay), only the bytes
   of the index and of the clip; a server that does not seek answers the relay's first
   request with the whole file, and that answer is handed to the next step;
3. download: the whole source into the job's folder (from that answer, if one came);
4. local: a ``file://`` source is read where it is.

``http(s)`` and ``gs`` sources go through 1-3 alike (worker.source.HttpSource,
worker.gcs.GcsSource); ``[job] range_requests = false`` skips 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import media, metrics, relay, smartcut, source
from .cache import SourceCache
from .config import Config
from .context import FetchLimits, JobContext
from .errors import JobFailed, Permanent, Transient
from .health import MIN_FREE_BYTES, work_dir_failure
from .job import Job
from .storage import store_for
from .wake import Waker

log = logging.getLogger(__name__)

# A clip shorter than this share of the range asked for means the source was cut short.
MIN_OUTPUT_SHARE = 0.5


@dataclass
class Result:
    output: str
    clip_start: float = 0.0
    clip_end: float = 0.0
    out_time: float = 0.0
    size: int = 0
    bytes_in: int = 0
    read: str = ""  # how the source was read: "ranges", "download", "cache" or "local"
    cut: str = ""  # how the clip was cut: "copy", "smart" or "encode"
    reencoded: float = 0.0  # seconds of the clip re-encoded
    timings: dict[str, float] = field(default_factory=dict)


def _fresh_dir(path: str) -> None:
    """An empty folder at ``path``: made (with its parents, if someone removed them), or
    emptied when a worker killed mid-job left it."""
    try:
        os.mkdir(path)
    except FileExistsError:
        shutil.rmtree(path, ignore_errors=True)
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path)


def _on_frames(cut: media.Cut, times: tuple[float, float | None]) -> media.Cut:
    """``cut`` from the first frame of the clip to the end of its last (see
    ``Pipeline._snapped``): ``times`` are the first frame at or after the start and the
    first at or after the end (None: to the source's end)."""
    first, after = times
    # ffprobe prints times to the microsecond: 1 us before the first frame keeps it, and
    # the frame before it is a whole frame earlier
    return dataclasses.replace(cut, start=max(0.0, first - smartcut.TOLERANCE),
                               length=None if after is None else after - first)


@dataclass(frozen=True)
class _Tools:
    """How the cut's helpers (ffprobe) run for one job: under its context, reading the
    relay when there is one."""

    ctx: JobContext
    feed: relay.Relay | None
    ffprobe: str
    rw_timeout: float | None

    def run(self, cmd: list[str]) -> str:
        return media.capture(cmd, self.ctx, self.feed)

    def fetch_failed(self) -> None:
        """After a failed probe through the relay: its own failure, if it has one, or that
        the server does not seek, which the read plan answers by downloading."""
        if self.feed is not None and self.feed.error is not None:
            raise self.feed.error
        if self.feed is not None and self.feed.no_ranges:
            raise Transient("fetch_failed", "the source's server does not answer Range "
                            "requests")


@dataclass(frozen=True)
class _Read:
    """How the source was read (a step of the plan), how many of its bytes, and the clip."""

    how: str
    nbytes: int
    clip: media.ClipResult


class Pipeline:
    def __init__(self, config: Config, worker_dir: str, waker: Waker,
                 should_abort: Callable[[], bool],
                 on_stage: Callable[[str, bool], None],
                 on_progress: Callable[[float, str], None]) -> None:
        self.config = config
        self.worker_dir = worker_dir
        self.waker = waker
        self.should_abort = should_abort
        self.on_stage = on_stage
        self.on_progress = on_progress
        cfg = config.job
        self.limits = FetchLimits(connect_timeout=cfg.connect_timeout,
                                  stall_timeout=cfg.stall_timeout,
                                  max_bytes=cfg.max_source_bytes,
                                  allow_private=cfg.allow_private_networks)
        # The cache leaves room free in work_dir for one source of the largest size.
        self.cache = SourceCache(cfg.cache_folder,
                                 cfg.cache_max_bytes, keep_free=min(cfg.max_source_bytes, 1 << 40),
                                 work_dir=cfg.work_dir) if cfg.cache_max_bytes else None

    def already_stored(self, job: Job) -> bool:
        """True when an earlier attempt of this job stored its output (by this job id)."""
        store = store_for(job.output, self.worker_dir, self.config.storage)
        return store.exists(job.output, job.id)

    def run(self, job: Job, deadline: float) -> Result:
        job_dir = os.path.join(self.worker_dir, "job")
        try:
            _fresh_dir(job_dir)
        except OSError as exc:  # the host's fault: the worker then probes it (worker.health)
            raise work_dir_failure(exc, f"cannot create {job_dir}") from None
        ctx = JobContext(deadline, self.limits, self.waker, self.should_abort, self.on_stage,
                         self.on_progress, room=lambda size: self._room_for(size, job_dir))
        try:
            return self._run(job, ctx, job_dir)
        finally:
            try:
                os.rmdir(job_dir)  # mostly empty by now: the store took the clip
            except OSError:
                shutil.rmtree(job_dir, ignore_errors=True)

    def _run(self, job: Job, ctx: JobContext, job_dir: str,
             read: Callable[[JobContext, Job, str], _Read] | None = None) -> Result:
        # No separate ffprobe: ffmpeg's own report on its input validates the job (format,
        # video stream, start before the end), which saves a process per job (~0.14 s here).
        ctx.stage("fetch")
        # Only the floor up front (for the clip): what a download needs is checked against
        # the source's own size once its server or bucket has told it (ctx.room).
        ctx.room(0)
        clip_path = os.path.join(job_dir, f"clip.{job.format}")
        # (``read``: a multi-clip job's own plan, which shares one read among its clips)
        read = (read or self._read)(ctx, job, clip_path)
        clip = read.clip
        self._verify(clip, clip_path)
        duration = clip.source_duration
        end = job.end if duration is None else duration if job.end is None else min(
            job.end, duration)
        clip_end = end if end is not None else 0.0
        size = os.path.getsize(clip_path)  # before the store moves it

        store = store_for(job.output, self.worker_dir, self.config.storage)
        ctx.stage("store", at_once=store.remote)
        ctx.check("clipping")
        store.put(clip_path, job.output, {
            "job_id": job.id, "source": job.url, "start": f"{job.start:g}",
            "end": f"{clip_end:g}"}, ctx)
        ctx.stage("")
        return Result(output=job.output, clip_start=job.start, clip_end=clip_end,
                      out_time=clip.out_time, size=size,
                      bytes_in=read.nbytes, read=read.how, cut=clip.cut,
                      reencoded=round(clip.reencoded, 3), timings=ctx.timings)

    # --- the read plan -----------------------------------------------------------------------

    def _read(self, ctx: JobContext, job: Job, clip_path: str) -> _Read:
        """Read the source by the first step of the plan that applies, and clip it."""
        scheme = urlsplit(job.url).scheme.lower()
        if scheme == "file":  # 4. local
            path = source.local_path(job.url, ctx.limits.max_bytes)
            return _Read("local", os.path.getsize(path), self._clip(ctx, job, path, clip_path))
        src = self._remote_source(job.url, scheme)
        dest = os.path.join(os.path.dirname(clip_path), "source")
        step = "ranges" if self.config.job.range_requests else "download"
        answer = None
        with contextlib.ExitStack() as held:
            if self.cache is not None:  # 1. cached
                if self._kept(ctx, job, src, dest):
                    step = "cache"
                elif self.cache.worth_buying(job.url) and \
                        held.enter_context(self.cache.buying(job.url)):
                    # Reading in place has cost the source's size: download it and keep it.
                    # One worker does, holding the right until the copy is kept (the others
                    # go on as before); another may have kept it a moment ago.
                    step = "cache" if self._kept(ctx, job, src, dest) else "download"
            if step == "ranges":  # 2. ranges
                with relay.Relay(src.remote, ctx) as feed:
                    clip = self._clip_in_place(ctx, job, feed, clip_path)
                    if clip is not None:
                        if self.cache is not None:
                            self.cache.rent(job.url, feed.identity, feed.bytes_in)
                        log.debug("job %s: read %d of %s bytes in %d range requests",
                                  job.id, feed.bytes_in, feed.size, feed.requests)
                        return _Read("ranges", feed.bytes_in, clip)
                    log.debug("job %s: %s does not answer Range requests: downloading it",
                              job.id, job.url)
                    answer = feed.take_whole()  # its 200 with the whole file, if it sent one
                step = "download"
            nbytes = 0
            if step == "download":  # 3. download
                nbytes, identity = src.download(dest, ctx, answer)
                if self.cache is not None and self.cache.keep(job.url, dest, identity):
                    log.debug("job %s: %s kept in the source cache", job.id, job.url)
        return _Read(step, nbytes, self._clip(ctx, job, dest, clip_path))

    def _remote_source(self, url: str, scheme: str) -> source.RemoteSource:
        if scheme in ("http", "https"):
            return source.HttpSource(url)
        if scheme == "gs":
            from . import gcs  # not imported by a worker that never sees gs:// (see storage)

            return gcs.GcsSource(url, self.config.storage, self.limits.max_bytes)
        raise Permanent("scheme_not_allowed", f"{scheme}:// sources are not supported")

    def _kept(self, ctx: JobContext, job: Job, src: source.RemoteSource, dest: str) -> bool:
        """Step 1: the source's kept copy linked to ``dest``, once the source confirms it
        is unchanged; False when there is none, or the source changed."""
        assert self.cache is not None
        entry = self.cache.lookup(job.url)
        if entry is None or entry.identity.size > ctx.limits.max_bytes:
            return False
        if src.identify(ctx) != entry.identity:
            log.info("job %s: %s changed since it was kept: reading it afresh", job.id,
                     job.url)
            self.cache.forget(job.url)
            return False
        return self.cache.use(entry, dest)

    def _clip_in_place(self, ctx: JobContext, job: Job, feed: relay.Relay,
                       clip_path: str) -> media.ClipResult | None:
        """Step 2: clip what ffmpeg reads through the relay; None when the source's server
        does not seek (the relay keeps its whole answer, if it sent one)."""
        try:
            clip = self._clip(ctx, job, feed.url, clip_path, feed)
        except JobFailed as exc:
            if feed.error is not None:  # ffmpeg saw a failed read; this is why
                raise feed.error from None
            if feed.no_ranges:
                return None
            # ffmpeg's words name the relay: name the source instead
            raise type(exc)(exc.reason, exc.error.replace(feed.url, job.url)) from None
        if feed.error is not None:  # the clip may look fine, but a read failed
            raise feed.error
        return clip

    def _clip(self, ctx: JobContext, job: Job, src: str, clip_path: str,
              feed: relay.Relay | None = None) -> media.ClipResult:
        """Cut the clip from a local file, or through the job's relay (``feed``), as its
        mode says: smart (worker.smartcut) where the source can be joined, otherwise
        encode; or copy. Clipping starts now for a local file; through the relay, once
        ffmpeg has read the source's index."""
        if feed is None:
            ctx.stage("clip")
        cfg = self.config.job
        # How far before the start to decode depends on whether the source's container has
        # an index (media.preroll): a local file says so by its first bytes, a remote one by
        # its name. A copy decodes nothing.
        cut = media.Cut(job.start, None if job.end is None else job.end - job.start,
                        job.mode, job.muxer, cfg.encode_preset,
                        media.preroll(job.url, src if feed is None and job.mode != "copy"
                                      else None))
        # ffmpeg's own network timeout, after the relay's and ours
        rw_timeout = None if feed is None else ctx.limits.stall_timeout + 5
        tools = _Tools(ctx, feed, cfg.ffprobe, rw_timeout)
        if cut.mode == "smart" and cut.start == 0 and cut.length is None:
            cut = dataclasses.replace(cut, mode="copy")  # the whole source: a copy is exact
        if cut.mode == "smart":
            try:
                return self._smart(tools, cut, src, clip_path)
            except smartcut.Fallback as exc:
                log.info("job %s: cut in encode mode, not smart: %s", job.id, exc.reason)
                metrics.SMART_FALLBACKS.inc()
                cut = dataclasses.replace(cut, mode="encode")
                cut = _on_frames(cut, exc.times) if exc.times else \
                    self._snapped(tools, cut, src)
        elif cut.mode == "encode":
            cut = self._snapped(tools, cut, src)
        cmd = media.clip_command(cfg.ffmpeg, src, clip_path, cut, rw_timeout)
        clip = media.FFmpegRun(cmd, ctx, cut, feed).run()
        clip.cut = cut.mode
        clip.reencoded = clip.out_time if cut.mode == "encode" else 0.0
        return clip

    def _snapped(self, tools: _Tools, cut: media.Cut, src: str) -> media.Cut:
        """``cut`` moved onto the source's frames: from its first frame at or after the
        start, for exactly as long as the frames up to the end last, so that the audio,
        cut to the sample, spans the video's own time (a frame may start up to a frame
        after ``start``). Unchanged when the frames cannot be read: ffmpeg's run says why."""
        try:
            times = smartcut.snap(src, cut.start, cut.length, ffprobe=tools.ffprobe,
                                  preroll=cut.preroll, rw_timeout=tools.rw_timeout,
                                  runner=tools.run)
        except (RuntimeError, ValueError, KeyError, smartcut.Fallback) as exc:
            tools.fetch_failed()
            log.debug("the source's frame times could not be read: %s", exc)
            return cut
        return cut if times is None else _on_frames(cut, times)

    def _smart(self, tools: _Tools, cut: media.Cut, src: str,
               clip_path: str) -> media.ClipResult:
        """Smart cut: probe the source, plan the pieces, cut and join them (see
        worker.smartcut); raises smartcut.Fallback when it cannot be joined safely."""
        if cut.preroll > media.PREROLL:  # known before reading a byte more (smartcut.plan)
            raise smartcut.Fallback("a source without an index (MPEG-TS/PS)")
        try:
            probe = smartcut.probe(src, cut.start, cut.length, ffprobe=tools.ffprobe,
                                   preroll=cut.preroll, rw_timeout=tools.rw_timeout,
                                   runner=tools.run)
        except (RuntimeError, ValueError, KeyError) as exc:
            tools.fetch_failed()
            raise smartcut.Fallback(f"the source could not be probed: {exc}") from None
        try:
            plan = smartcut.plan(probe, cut.start, cut.length, cut.muxer, cut.preroll)
        except smartcut.Fallback as exc:  # encode mode uses what the probe read
            exc.times = smartcut.frame_times([p.pts for p in probe.packets], cut.start,
                                             cut.end)
            raise
        cfg = self.config.job
        pieces = os.path.join(os.path.dirname(clip_path), "pieces")
        os.makedirs(pieces, exist_ok=True)
        cmd = smartcut.cut_command(plan, src, pieces, ffmpeg=cfg.ffmpeg,
                                   preset=cfg.encode_preset, rw_timeout=tools.rw_timeout)
        end = plan.end if plan.end is not None else probe.duration
        length = None if end is None else end - plan.start
        try:
            media.FFmpegRun(cmd, tools.ctx, cut, tools.feed).run()
            # The join reads our own pieces: its input report is the clip's, not the source's
            join = media.FFmpegRun(
                smartcut.join_command(plan, pieces, clip_path, ffmpeg=cfg.ffmpeg), tools.ctx,
                media.Cut(0.0, length, muxer=cut.muxer)).run()
        except Permanent as exc:  # what smart cut did not foresee: encode mode may cope
            raise smartcut.Fallback(f"the smart cut failed ({exc.reason}): "
                                    f"{exc.error[-300:]}") from None
        finally:
            shutil.rmtree(pieces, ignore_errors=True)
        # Never store a clip whose joins a decoder complains about: decode across them
        for check in smartcut.check_commands(plan, clip_path, ffmpeg=cfg.ffmpeg):
            try:
                media.capture(check, tools.ctx, quiet=True)
            except RuntimeError as exc:
                log.warning("a smart cut's joins did not decode cleanly: %s", exc)
                os.unlink(clip_path)
                raise smartcut.Fallback("the joined clip did not decode cleanly") from None
        return media.ClipResult(join.out_time, join.size, probe.duration,
                                expected=join.expected, cut="smart",
                                reencoded=round(plan.reencoded, 3))

    # --- room and checks -----------------------------------------------------------------------

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
    def _verify(clip: media.ClipResult, path: str) -> None:
        # ffmpeg can exit 0 on a broken input with a tiny or empty output (a truncated file
        # whose index is at the front, a start past the end): check what it reports it
        # wrote, and the file itself, before storing anything.
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise Permanent("media_error", "ffmpeg wrote no output file") from None
        if size == 0 or clip.out_time <= 0:
            raise Permanent("media_error", f"ffmpeg wrote an empty clip ({size} bytes)")
        if clip.out_time < clip.expected * MIN_OUTPUT_SHARE:
            raise Permanent("media_error", f"the clip is {clip.out_time:.2f} s long, "
                            f"{clip.expected:.2f} s were asked for: the source is damaged")
