"""One worker process: fetch one message when idle, run it, record the outcome, repeat.

Signals: TERM finishes the current job, then exits; QUIT and INT abort the job now, give its
message back to the front of the queue, and exit. The handlers only set flags and wake the
blocked call (see worker.wake); the loop does the rest. When the supervisor dies the kernel
sends us SIGUSR2 (PR_SET_PDEATHSIG), which aborts like QUIT.

Cancellation: a thread of the worker listens for cancels (JobQueue.watch_cancels, pub/sub).
When one names the current job it records it and sends CANCEL_SIGNAL to the main thread,
whose handler wakes the blocked call as QUIT's does; the job's next abort check (``_poll``)
then stops it (ffmpeg killed, the job's folder removed, nothing stored), and its message is
dead-lettered with reason ``cancelled`` instead of being given back. A job cancelled before
it started is refused by the START script and dead-lettered the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import logging
import mmap
import os
import select
import shutil
import signal
import threading
import time
from typing import Any

import psutil
import redis
import setproctitle

from . import health, logs, metrics
from .config import Config
from .errors import Aborted, HostFault, JobFailed, Permanent, Transient
from .job import BadClip, Job, Rejected, dead_letter, intake
from .media import set_parent_death_signal
from .multiclip import ClipSession
from .pipeline import Pipeline, Result
from .protocol import (
    EXIT_ABORTED,
    EXIT_BOOT_ERROR,
    EXIT_OK,
    EXIT_PARENT_GONE,
    EXIT_RECYCLE,
    EventType,
    JobState,
    Stage,
    worker_dir_name,
    worker_id_for,
)
from .queue import CANCELLED, REDIS_ERRORS, Held, JobQueue, connect, now_iso, outage, sha1
from .wake import Waker

log = logging.getLogger("clip-supervisor.worker")

# A job's hash is written at most this often (seconds) while it runs: a change within that
# time of the last write waits for the job's next step after it (see _note). A copy clip's
# stages, over in milliseconds after START, cost no round trip of their own; a long job's
# progress is written at each of ffmpeg's reports (every 0.5 s, give or take its jitter);
# the hash is never more than this (or a step) behind.
HASH_WRITE_INTERVAL = 0.4
REDIS_BACKOFF_MAX = 5.0
PAUSE_FIRST, PAUSE_MAX = 1.0, 60.0  # seconds between probes of a host fault (doubling)
PARENT_DEATH_SIGNAL = signal.SIGUSR2
# Sent by the worker's cancel listener to its own main thread (a real-time signal: no terminal
# or operator sends it).
CANCEL_SIGNAL = signal.SIGRTMIN + 1
PROGRESS_EVENT_INTERVAL = 1.0  # seconds between a job's progress events on the stream


class Worker:
    def __init__(self, config: Config, slot: int = 0, started_ms: int | None = None,
                 parent_pid: int | None = None, liveness: LoopClock | None = None) -> None:
        self.config = config
        self.slot = slot
        self.pid = os.getpid()
        self.started_ms = started_ms if started_ms is not None else int(time.time() * 1000)
        self._started_mono = time.monotonic()
        self.parent_pid = parent_pid
        self.worker_id = worker_id_for(config.host_id, self.pid, self.started_ms)
        self.dir = os.path.join(config.job.work_dir, worker_dir_name(self.pid, self.started_ms))
        self.stopping = False  # TERM: finish the job, then exit
        self.aborting = False  # QUIT/INT/parent gone: abandon the job now
        self.parent_gone = False
        self.reopen_logs = False
        self.current: Job | None = None
        self.busy = False
        self.stage = "idle"
        self.progress = 0.0
        self.jobs_done = 0
        self.fault: tuple[str, str, float] | None = None  # (reason, error, since): paused
        self._tokens = 0  # outcomes recorded (see _token)
        self._stage_written = ""  # the stage the current job's hash holds (see _note)
        self._unwritten: dict[str, str | int | float] | None = None  # not in the hash yet
        self._written_at = 0.0  # when the current job's hash was last written
        self._shown_title = ""  # the process title set last (see _title)
        self._jobs_done_metric = metrics.JOBS.labels("done")  # looked up once, not per job
        # The main loop's last sign of life (see _alive), shared with the master when given.
        self.liveness = liveness
        self.alive_at = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._withheld = False  # heartbeats withheld: the main loop has been silent too long
        self._fetch_failures = 0
        self._next: bytes | None = None  # taken by the ack of the previous job (DONE script)
        # A job ended back to back, counted in the metrics a moment later (see _catch_up).
        self._uncounted: tuple[float, Result] | None = None
        self._heartbeat_stop = threading.Event()
        self._cancel_id: str | None = None  # a cancel named this job (the listener's note)
        self._listener_stop = threading.Event()
        self._last_event = 0.0  # when the current job's last progress event was appended
        self._event_due = False  # a stage or progress change not on the stream yet
        self._clip_share: tuple[int, int] | None = None  # (clips ended, clips) of the job
        self.waker = Waker()
        self.client: Any = None
        self.queue: JobQueue | None = None

    # --- signals --------------------------------------------------------------------------

    def install_signals(self) -> None:
        self.waker.install()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGQUIT, self._on_abort)
        signal.signal(signal.SIGINT, self._on_abort)
        signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_gone)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(CANCEL_SIGNAL, self._on_cancel)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True
        if not self.busy:
            self.waker.interrupt()

    def _on_abort(self, signum: int, frame: object) -> None:
        self.aborting = True
        self.waker.interrupt()

    def _on_parent_gone(self, signum: int, frame: object) -> None:
        self.parent_gone = True
        self.aborting = True
        self.waker.interrupt()

    def _on_usr1(self, signum: int, frame: object) -> None:
        self.reopen_logs = True

    def _on_cancel(self, signum: int, frame: object) -> None:
        if self._cancelled():  # wake the blocked call; the next abort check stops the job
            self.waker.interrupt()

    def _cancelled(self) -> bool:
        """True while a cancel names the current job."""
        job = self.current
        return job is not None and self._cancel_id == job.id

    def _current_id(self) -> str | None:
        job = self.current
        return job.id if job is not None else None

    def _cancel_heard(self, job_id: str) -> None:
        """The listener thread heard a cancel of the current job: note it, wake the loop."""
        self._cancel_id = job_id
        signal.pthread_kill(self._loop_thread, CANCEL_SIGNAL)

    def _poll(self) -> bool:
        """Housekeeping between steps; True when the current job must be abandoned. Every
        step of a job calls it (each chunk read, each second of ffmpeg): a sign of life."""
        self._alive()
        if self._unwritten is not None:
            self._write_due()
        if self.reopen_logs:
            self.reopen_logs = False
            logs.reopen()
        if self.parent_pid is not None and not self.parent_gone \
                and os.getppid() != self.parent_pid:
            self.parent_gone = self.aborting = True
        return self.aborting or self._cancelled()

    # --- life cycle ---------------------------------------------------------------------------

    def run(self) -> int:
        logs.bind(worker_id=self.worker_id)  # a field of every JSON log line of this worker
        self.install_signals()
        if self.parent_pid is not None:
            set_parent_death_signal(PARENT_DEATH_SIGNAL)
            if os.getppid() != self.parent_pid:  # the parent died before prctl took effect
                return EXIT_PARENT_GONE
        self._title("starting")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            log.error("cannot create work folder %s: %s", self.dir, exc.strerror)
            return EXIT_BOOT_ERROR
        self.client = connect(self.config, single=True)
        self.queue = JobQueue(self.client, self.config)
        self.queue.while_waiting = self._catch_up
        code = EXIT_OK
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        listener = threading.Thread(target=self.queue.watch_cancels, name="cancels",
                                    args=(self._current_id, self._cancel_heard,
                                          self._listener_stop), daemon=True)
        clean = False
        try:
            self._persist(self._beat, "register")
            heartbeat.start()
            listener.start()
            log.info("worker %s ready (%s)", self.slot, self.worker_id)
            code = self._loop()
            clean = True
        except Aborted:  # told to stop while Redis was unreachable
            code = EXIT_ABORTED if self.aborting else EXIT_OK
            clean = True
        finally:
            self._unhold()
            self._heartbeat_stop.set()
            self._listener_stop.set()
            if heartbeat.is_alive():
                heartbeat.join(timeout=2)
            # After a crash (an exception escaping the loop) what we hold stays put: the
            # supervisor recovers it and counts the attempt, so a crasher becomes poison.
            self._shutdown(release=clean)
        if self.parent_gone:
            code = EXIT_PARENT_GONE
        log.info("worker %s exits (code %d)", self.slot, code)
        return code

    def _loop(self) -> int:
        max_jobs = self.config.supervisor.max_jobs_per_worker
        max_rss = self.config.supervisor.max_worker_memory_mb * 1024 * 1024
        me = psutil.Process()
        while True:
            if self._poll():
                return EXIT_ABORTED
            if self.stopping:
                return EXIT_OK
            self._title("idle")
            message, self._next = self._next, None
            if message is None:
                self._unhold()  # nothing in hand: held lines go out before waiting
                message = self._next_message()
            if message is None:
                continue
            if self.aborting:
                # Taken in the instant an abort arrived: give it back untouched. (A TERM in
                # that instant finishes it: the worker holds it, so it is its current job.)
                self._persist(lambda: self.queue.release(self.worker_id), "release")
                continue
            try:
                self._handle(message)
            except Aborted:  # Redis was down when the abort came: the supervisor recovers
                return EXIT_ABORTED
            # Recycling is decided between jobs, never in the middle of one.
            if max_jobs and self.jobs_done >= max_jobs:
                log.info("recycling after %d jobs", self.jobs_done)
                return EXIT_RECYCLE
            rss = me.memory_info().rss if max_rss else 0
            if rss > max_rss:
                log.info("recycling: RSS %d MiB above max_worker_memory_mb", rss >> 20)
                return EXIT_RECYCLE

    def _shutdown(self, release: bool = True) -> None:
        """Give back anything still held, leave the registry, remove our folder."""
        if self.queue is not None and release:
            with contextlib.suppress(*REDIS_ERRORS):
                held = self.queue.release(self.worker_id)
                if held:
                    log.info("gave back %d message(s) on exit", held)
                self.queue.unregister(self.worker_id)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- fetching --------------------------------------------------------------------------

    def _next_message(self) -> bytes | None:
        """The next message (in our processing list), or None: none came, a signal, or a
        Redis outage (retried at once the first time, with backoff after that)."""
        assert self.queue is not None
        try:
            message = self.queue.take(self.worker_id, self.config.redis.block_timeout,
                                      self.waker, lambda: self.stopping or self.aborting)
        except redis.RedisError as exc:
            if not outage(exc):
                raise
            # A connection that died with a restarted server fails once and reconnects on
            # the next call: retry at once the first time, back off after that.
            self._fetch_failures += 1
            if self._fetch_failures > 1:
                delay = min(0.1 * 2 ** (self._fetch_failures - 2), REDIS_BACKOFF_MAX)
                self._redis_down(exc, "fetch", delay)
            return None
        self._fetch_failures = 0
        return message

    # --- one job ------------------------------------------------------------------------------

    def _handle(self, raw: bytes) -> None:
        assert self.queue is not None
        self.busy = True
        self._alive()
        self.progress = 0.0
        started = time.monotonic()
        try:
            self._run_job(raw, started)
        except Aborted:
            raise
        except Exception as exc:
            # A bug outside the pipeline (recording the outcome, say): count an attempt
            # against this message and go on. Should even that fail, the worker exits and
            # the supervisor counts the crash under the same message SHA-1, so a message
            # that always does this ends as poison, never as a crash loop.
            log.exception("job in message %s: unexpected error", sha1(raw)[:12])
            job_id = self.current.id if self.current is not None else sha1(raw)
            self._retry(raw, job_id, Transient("internal_error",
                                               f"{type(exc).__name__}: {exc}"))
        finally:
            self.current = None
            self._unwritten = None  # the job's outcome wrote its hash last
            self._clip_share = None
            self._cancel_id = None
            self.busy = False
            self._alive()
            self.stage = "idle"
            logs.unbind("job_id", "stage", "reason")
            if self.stopping and not self.aborting:
                self.waker.interrupt()

    def _run_job(self, raw: bytes, started: float) -> None:
        assert self.queue is not None
        job = intake(raw, self.config)
        logs.bind(job_id=job.id, stage="fetch")
        if isinstance(job, Rejected):
            self._dead(raw, job.id, job.error, attempts=0)
            return
        self._last_event, self._event_due = 0.0, False
        self.current = job
        for warning in job.warnings:
            log.warning("job %s: %s", job.id, warning)
        if self.config.job.pipeline == "noop":
            self._done(job, Result(output=job.output), started)
            return
        self._unhold()  # a real job may take a while: held lines go out first
        started_fields: dict[str, str | int | float] = {
            "state": JobState.RUNNING, "worker": self.worker_id, "url": job.url,
            "output": job.output, "mode": job.mode, "progress": 0, "stage": "fetch",
            "started": now_iso(), "error": "", "message_sha1": sha1(raw)}
        if job.clips:
            started_fields["clips"] = json.dumps([clip.id for clip in job.clips])
        attempts = self._persist(lambda: self.queue.start(job.id, sha1(raw), started_fields),
                                 "start")
        if attempts == CANCELLED:
            self._dead(raw, job.id, Permanent("cancelled", "cancelled before it started"),
                       attempts=0, cancelled=True)
            return
        self._last_event = self._written_at = time.monotonic()  # START wrote both
        self._stage_written = Stage.FETCH  # in START's fields above
        if attempts >= self.config.job.max_attempts:
            poison = Permanent("poison", f"the job crashed its worker {attempts} times")
            if job.clips:  # each clip left ends on its own: never a letter of the job's
                self._end_clips_left(raw, job, poison, attempts)
            else:
                self._dead(raw, job.id, poison, attempts=attempts)
            return
        pipeline: Pipeline | None = getattr(self, "pipeline", None)
        if pipeline is None:  # one per worker, made at its first job: it owns the source cache
            pipeline = self.pipeline = Pipeline(self.config, self.dir, self.waker, self._poll,
                                                self._on_stage, self._on_progress)
        if job.clips:
            self._run_clips(raw, job, pipeline, attempts)
            return
        if attempts > 0 and self._already_stored(pipeline, job):
            log.info("job %s: output %s already stored by an earlier attempt", job.id,
                     job.output)
            self._done(job, Result(output=job.output), started, reused=True)
            return
        deadline = started + self.config.job.timeout
        try:
            result = pipeline.run(job, deadline)
        except Permanent as exc:
            self._dead(raw, job.id, exc, attempts=attempts + 1)
        except Transient as exc:
            self._transient(raw, job, exc)
        except Aborted:
            if self._cancelled() and not self.aborting:
                self._dead(raw, job.id, Permanent("cancelled", "cancelled while running, in "
                                                  f"stage {self.stage}"),
                           attempts=attempts, cancelled=True)
                return
            given = self._persist(lambda: self.queue.release(self.worker_id), "release")
            metrics.JOBS.labels("aborted").inc()
            log.info("job %s aborted, message given back (%d)", job.id, given)
        except Exception as exc:  # a bug: keep the message, retry it, show the traceback
            log.exception("job %s: unexpected error", job.id)
            self._retry(raw, job.id, Transient("internal_error", f"{type(exc).__name__}: {exc}"))
        else:
            self._done(job, result, started)

    def _transient(self, raw: bytes, job: Job, exc: Transient, output: str | None = None,
                   attempts: int = 0) -> None:
        """A transient failure: the job's (retried, counted), or this host's (given back
        uncounted, and the host pauses). ``output``: where the failed clip was going;
        ``attempts``: a multi-clip job's attempts before this one."""
        fault = self._host_fault(exc, output)
        if fault is None:
            if job.clips:
                self._retry_clips(raw, job, exc, attempts)
            else:
                self._retry(raw, job.id, exc)
            return
        queued = {"state": JobState.QUEUED, "stage": "", "progress": 0, "worker": "",
                  "reason": exc.reason,
                  "error": f"given back by a paused host: {exc.error[-400:]}"}
        given = self._persist(
            lambda: self.queue.release(self.worker_id, job.id, queued), "release")
        log.info("job %s given back (%d) uncounted: %s", job.id, given, exc)
        self.current = None
        self._pause(*fault)

    def _host_fault(self, exc: Transient, output: str | None = None,
                    ) -> tuple[str, str] | None:
        """Whether a failure was this host's rather than the job's: (reason, error) or None."""
        if not isinstance(exc, HostFault) and exc.reason not in health.HOST_REASONS:
            return None
        if output is None:
            output = self.current.output if self.current is not None else None
        try:  # the host, and the very folder this job's output goes to
            return health.probe(self.config, self.dir, output=output, reason=exc.reason)
        except Exception:  # a probe that fails cannot prove a fault: the job pays, counted
            log.exception("host probe failed")
            return None

    def _pause(self, reason: str, error: str) -> None:
        """Stop fetching while this host cannot run jobs; probe it with backoff and resume
        by ourselves once it can. The heartbeat carries the fault, so /healthz, stats and
        the dashboard show it."""
        self.fault = (reason, error, time.time())
        self.stage, self.progress = "paused", 0.0
        metrics.HOST_FAULTS.labels(reason).inc()
        metrics.PAUSED.set(1)
        log.error("host fault (%s): %s; fetching paused until it clears", reason, error,
                  extra={"reason": reason})
        self._title(f"paused ({reason})")
        with contextlib.suppress(*REDIS_ERRORS, redis.RedisError):
            self._beat()
        delay = PAUSE_FIRST
        try:
            while not (self._poll() or self.stopping):
                self._sleep(delay)
                if self._poll() or self.stopping:
                    break
                try:
                    found = health.probe(self.config, self.dir)
                except Exception:  # cannot tell: still at fault, probe again later
                    log.exception("host probe failed")
                    found = self.fault[:2]
                if found is None:
                    log.warning("host fault cleared (%s) after %.0f s: fetching again",
                                reason, time.time() - self.fault[2], extra={"reason": reason})
                    break
                if found[0] != self.fault[0]:
                    log.error("host fault (%s): %s", *found, extra={"reason": found[0]})
                    self.fault = (*found, self.fault[2])
                delay = min(delay * 2, PAUSE_MAX)
        finally:
            self.fault = None
            self.stage = "idle"
            metrics.PAUSED.set(0)
            with contextlib.suppress(*REDIS_ERRORS, redis.RedisError):
                self._beat()

    def _already_stored(self, pipeline: Pipeline, job: Job) -> bool:
        try:
            return pipeline.already_stored(job)
        except JobFailed as exc:
            # Unknown is treated as "not stored": clipping again rewrites the same object.
            log.warning("job %s: cannot tell whether %s is stored (%s); clipping again",
                        job.id, job.output, exc)
            return False

    # --- many clips per job -------------------------------------------------------------------

    def _run_clips(self, raw: bytes, job: Job, pipeline: Pipeline, attempts: int) -> None:
        """A multi-clip job: cut its clips one by one from one read of the source
        (worker.multiclip), record each clip's end as it comes (CLIP_END: its own done event
        or dead letter, once), and acknowledge the message when every clip has ended.

        A copy of the message run again (a crash, a retry, a given-back job) skips the clips
        that ended before, and records a clip stored just before a crash as done without
        cutting it again. A transient failure retries the message (the clips left); a bad
        clip, or one the source cannot give (past its end, damaged there), is dead-lettered
        alone; a failure of the source itself ends every clip left alike."""
        assert self.queue is not None
        ended = set(self._persist(lambda: self.queue.clips_ended(job.id), "clips"))
        todo = [clip for clip in job.clips if clip.id not in ended]
        total = len(job.clips)
        clip: Job | BadClip | None = None
        try:
            with ClipSession(pipeline, job, [c for c in todo if isinstance(c, Job)]) as session:
                for n, clip in enumerate(todo):
                    self._clip_share = (total - len(todo) + n, total)
                    if isinstance(clip, BadClip):
                        self._clip_dead(raw, job, clip, clip.error, attempts=0)
                        continue
                    failed = self._run_clip(raw, job, clip, session, pipeline, attempts)
                    if failed is not None and failed.reason in SOURCE_REASONS:
                        # The source itself: the clips left would fail alike, reading it again.
                        for rest in todo[n + 1:]:
                            self._clip_dead(raw, job, rest, rest.error if isinstance(
                                rest, BadClip) else failed, attempts + 1)
                        break
                clip = None
        except _Fenced:
            return
        except Transient as exc:
            self._transient(raw, job, exc, clip.output if isinstance(clip, Job) else None,
                            attempts=attempts)
            return
        except Aborted:
            if not (self._cancelled() and not self.aborting):
                given = self._persist(lambda: self.queue.release(self.worker_id), "release")
                metrics.JOBS.labels("aborted").inc()
                log.info("job %s aborted, message given back (%d)", job.id, given)
                return
            # the clips that had not ended are cancelled; the others stay as they ended
            self._end_clips_left(raw, job, Permanent(
                "cancelled", f"cancelled while running, in stage {self.stage}"), attempts,
                kind=EventType.CANCELLED)
            return
        except Exception as exc:  # a bug: keep the message, retry it, show the traceback
            log.exception("job %s: unexpected error", job.id)
            self._retry_clips(raw, job, Transient("internal_error",
                                                  f"{type(exc).__name__}: {exc}"), attempts)
            return
        self._clips_ack(raw, job)

    def _retry_clips(self, raw: bytes, job: Job, exc: Transient, attempts: int) -> None:
        """A multi-clip job's transient failure (``attempts``: those used before this one):
        retry the message for the clips left, or, when this was its last attempt, end each
        of them as its own dead letter. RETRY would dead-letter the message as a whole,
        leaving the clips left without an end of their own and making the job's letter,
        once replayed, cut again the clips that were stored."""
        if attempts + 1 < self.config.job.max_attempts:
            self._retry(raw, job.id, exc)
            return
        log.warning("job %s failed (%s) on its last attempt (%d): its clips left are dead",
                    job.id, exc.reason, attempts + 1)
        self._end_clips_left(raw, job, exc, attempts + 1)

    def _end_clips_left(self, raw: bytes, job: Job, error: JobFailed, attempts: int,
                        kind: EventType = EventType.DEAD) -> None:
        """End every clip of the job that has not ended (``kind`` dead: with ``error``, or
        a bad clip's own; cancelled: with ``error``), then acknowledge the message. So a
        message that fails as a whole (poison, its retries spent, a cancel) still ends as
        one terminal event per clip, and the clips that ended stay as they ended."""
        assert self.queue is not None
        ended = set(self._persist(lambda: self.queue.clips_ended(job.id), "clips"))
        try:
            for clip in job.clips:
                if clip.id in ended:
                    continue
                own = clip.error if isinstance(clip, BadClip) and kind == EventType.DEAD \
                    else error
                self._clip_dead(raw, job, clip, own, attempts, kind)
        except _Fenced:
            return
        self._clips_ack(raw, job)

    def _run_clip(self, raw: bytes, job: Job, clip: Job, session: ClipSession,
                  pipeline: Pipeline, attempts: int) -> Permanent | None:
        """Cut, store and record one clip; its Permanent failure (recorded) or None."""
        started = time.monotonic()
        logs.bind(job_id=clip.id)
        try:
            if attempts > 0 and self._already_stored(pipeline, clip):
                log.info("job %s clip %s: output %s already stored by an earlier attempt",
                         job.id, clip.id, clip.output)
                self._clip_done(raw, job, clip, Result(output=clip.output), started,
                                reused=True)
                return None
            try:
                result = session.run(clip, started + self.config.job.timeout)
            except Permanent as exc:
                self._clip_dead(raw, job, clip, exc, attempts + 1)
                return exc
            self._clip_done(raw, job, clip, result, started)
            return None
        finally:
            logs.bind(job_id=job.id)

    def _clip_done(self, raw: bytes, job: Job, clip: Job, result: Result, started: float,
                   reused: bool = False) -> None:
        """Record that a clip was stored (``reused``: by an earlier attempt). Raises _Fenced
        when the message is no longer ours."""
        entry = self._completion(clip, result, started, reused)
        self._clip_record(raw, job, clip.id, EventType.DONE, entry)
        metrics.JOBS.labels("done").inc()
        metrics.JOB_SECONDS.observe(float(entry["elapsed"]))
        metrics.BYTES_IN.inc(result.bytes_in)
        metrics.BYTES_OUT.inc(result.size)
        if result.cut:
            metrics.CUTS.labels(result.cut).inc()
            metrics.REENCODED_SECONDS.inc(result.reencoded)
        log.info("job %s clip %s done in %.2f s -> %s%s", job.id, clip.id,
                 entry["elapsed"], entry["output"], " (already stored)" if reused else
                 f" ({entry['source_read']}, {entry['source_bytes']} source bytes)"
                 if "source_read" in entry else "")

    def _clip_dead(self, raw: bytes, job: Job, clip: Job | BadClip, error: JobFailed,
                   attempts: int, kind: EventType = EventType.DEAD) -> None:
        """Record a clip's dead letter (``kind`` cancelled for a cancel). Raises _Fenced when
        the message is no longer ours."""
        entry = self._letter(clip.raw, clip.id, error, attempts)
        self._clip_record(raw, job, clip.id, kind, entry)
        metrics.JOBS.labels("dead").inc()
        metrics.DEAD.labels(error.reason).inc()
        log.warning("job %s clip %s dead (%s): %s", job.id, clip.id, error.reason,
                    _one_line(error.error), extra={"reason": error.reason})

    def _clip_record(self, raw: bytes, job: Job, clip_id: str, kind: EventType,
                     entry: dict) -> None:
        """CLIP_END: one clip's end, ``entry`` its completion or its letter."""
        assert self.queue is not None
        entry["job"] = job.id
        held = Held(self.worker_id, raw, job.id, job.callback)
        recorded = self._persist(lambda: self.queue.clip_end(held, clip_id, kind, entry),
                                 "clip end")
        if not recorded:
            self._fenced(job.id, f"end of clip {clip_id}")
            raise _Fenced()
        if self._clip_share is not None:
            self._clip_share = (self._clip_share[0] + 1, self._clip_share[1])

    def _clips_ack(self, raw: bytes, job: Job) -> None:
        """Every clip has ended: acknowledge the message (and take the next one)."""
        assert self.queue is not None
        self.jobs_done += 1
        max_jobs = self.config.supervisor.max_jobs_per_worker
        take_next = not (self.stopping or self.aborting
                         or (max_jobs and self.jobs_done >= max_jobs))
        token = self._token()
        fields = {"progress": 100, "finished": now_iso(), "error": "", "reason": ""}
        held = Held(self.worker_id, raw, job.id)
        acked, self._next = self._persist(lambda: self.queue.clips_ack(
            held, fields, take_next=take_next, token=token), "ack")
        if not acked:
            self._fenced(job.id, "acknowledgement")
            return
        log.info("job %s: its %d clips have ended", job.id, len(job.clips))

    def _completion(self, job: Job, result: Result, started: float,
                    reused: bool = False) -> dict:
        """A finished job's (or clip's) completion event, as {prefix}:done holds it."""
        event = {"id": job.id, "output": result.output, "url": job.url,
                 "start": result.clip_start, "end": result.clip_end,
                 "duration": round(result.out_time, 3),
                 "elapsed": round(time.monotonic() - started, 3),
                 "timings": result.timings, "worker": self.worker_id, "time": now_iso(),
                 "reused": reused}
        if result.read:  # how the source was read, and how much of it
            event.update(source_read=result.read, source_bytes=result.bytes_in)
        if result.cut:  # how it was cut (a smart job may have been encoded), re-encoding how much
            event.update(cut=result.cut, reencoded_seconds=result.reencoded)
        return event

    def _done(self, job: Job, result: Result, started: float, reused: bool = False) -> None:
        logs.bind(stage="done")
        assert self.queue is not None
        event = self._completion(job, result, started, reused)
        elapsed = event["elapsed"]
        fields = {"progress": 100, "stage": "done", "finished": event["time"],
                  "elapsed": elapsed, "output": result.output, "error": "", "reason": "",
                  **{f"time_{stage}": seconds for stage, seconds in result.timings.items()}}
        if result.cut:
            fields.update(cut=result.cut, reencoded_seconds=result.reencoded)
        self.jobs_done += 1
        max_jobs = self.config.supervisor.max_jobs_per_worker
        take_next = not (self.stopping or self.aborting
                         or (max_jobs and self.jobs_done >= max_jobs))
        token = self._token()  # one per ack, so a retry after a lost reply is recognised
        held = Held(self.worker_id, job.raw, job.id, job.callback)
        acked, self._next = self._persist(lambda: self.queue.done(
            held, event, fields, take_next=take_next, token=token), "ack")
        if not acked:
            self._fenced(job.id, "done")
            return
        if self._uncounted is not None:  # no wait came since (not on the direct path)
            self._catch_up()
        if self._next is not None:  # counted while the worker waits for the next ack
            self._uncounted = (elapsed, result)
        else:
            self._count_done(elapsed, result)
        logs.hold(self._next is not None)  # see logs.hold: only while jobs run back to back
        # Held, the line is made while the worker waits for the next job's ack (logs.defer).
        logs.defer(log, "job %s done in %.2f s -> %s%s", job.id, elapsed, result.output,
                   " (already stored)" if reused else
                   f" ({result.read}, {result.bytes_in} source bytes)" if result.read else "")

    def _count_done(self, elapsed: float, result: Result) -> None:
        self._jobs_done_metric.inc()
        metrics.JOB_SECONDS.observe(elapsed)
        for stage, seconds in result.timings.items():
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
        if result.bytes_in:  # none for a no-op job or an output already stored
            metrics.BYTES_IN.inc(result.bytes_in)
        if result.size:
            metrics.BYTES_OUT.inc(result.size)
        if result.cut:
            metrics.CUTS.labels(result.cut).inc()
            metrics.REENCODED_SECONDS.inc(result.reencoded)

    def _catch_up(self) -> None:
        """What a job ended back to back left for a moment when the worker has nothing
        else to do (see _done): its log line (logs.defer) and its counts. The queue calls
        it while Redis runs the worker's next per-job call; the worker, before it waits for
        work, starts a clip, or exits."""
        logs.write_deferred()
        uncounted, self._uncounted = self._uncounted, None
        if uncounted is not None:
            self._count_done(*uncounted)

    def _unhold(self) -> None:
        """No job runs back to back any more: what waits is written and counted."""
        self._catch_up()
        logs.hold(False)

    def _token(self) -> str:
        """A name for one outcome, unique across workers and jobs: this worker's id and a
        count (a uuid4 per job cost the no-op queue ~2 us a job)."""
        self._tokens += 1
        return f"{self.worker_id}#{self._tokens}"

    def _letter(self, raw: bytes, job_id: str, exc: JobFailed, attempts: int) -> dict:
        return dead_letter(raw, job_id, exc.reason, exc.error, attempts, now_iso(),
                           self.config.job.dead_message_bytes)

    def _fenced(self, job_id: str, outcome: str) -> None:
        """The message was recovered and requeued while we ran it (this worker was taken for
        dead: a stall, a partition): our outcome is not recorded; the copy decides."""
        metrics.FENCED.inc()
        log.warning("job %s: its message was requeued while this worker ran it (taken for "
                    "dead); this %s is not recorded, the requeued copy decides", job_id,
                    outcome)

    def _dead(self, raw: bytes, job_id: str, exc: JobFailed, attempts: int,
              cancelled: bool = False) -> None:
        logs.bind(job_id=job_id, stage="dead", reason=exc.reason)
        assert self.queue is not None
        letter = self._letter(raw, job_id, exc, attempts)
        fields = {"stage": "dead", "reason": exc.reason, "error": exc.error[-500:],
                  "finished": str(letter["time"]), "attempts": attempts}
        token = self._token()  # one per outcome: a retry after a lost reply is known
        held = Held(self.worker_id, raw, job_id,
                    self.current.callback if self.current is not None else "")
        removed = self._persist(
            lambda: self.queue.dead(held, letter, fields, token, cancelled=cancelled),
            "dead-letter")
        if not removed:
            self._fenced(job_id, f"dead letter ({exc.reason})")
            return
        metrics.JOBS.labels("dead").inc()
        metrics.DEAD.labels(exc.reason).inc()
        log.warning("job %s dead (%s): %s", job_id, exc.reason, _one_line(exc.error))

    def _retry(self, raw: bytes, job_id: str, exc: Transient) -> None:
        logs.bind(job_id=job_id, stage="waiting", reason=exc.reason)
        assert self.queue is not None
        letter = self._letter(raw, job_id, exc, attempts=0)
        fields = {"reason": exc.reason, "error": exc.error[-500:], "stage": "waiting"}
        token = self._token()
        held = Held(self.worker_id, raw, job_id,
                    self.current.callback if self.current is not None else "")
        attempts, delay = self._persist(
            lambda: self.queue.retry(held, letter, fields, token), "retry")
        if attempts < 0:
            self._fenced(job_id, f"retry ({exc.reason})")
            return
        metrics.JOBS.labels("retried" if delay is not None else "dead").inc()
        if delay is None:
            metrics.DEAD.labels(exc.reason).inc()
            log.warning("job %s dead (%s) after %d attempts: %s", job_id, exc.reason, attempts,
                        _one_line(exc.error))
        else:
            log.info("job %s failed (%s), attempt %d, retry in %.1f s: %s", job_id, exc.reason,
                     attempts, delay, _one_line(exc.error))

    # --- progress and liveness ---------------------------------------------------------------

    def _on_stage(self, stage: str, at_once: bool = False) -> None:
        logs.bind(stage=stage)
        self.stage = stage
        self._alive()  # after: the stage says how long the loop may be silent now
        self._title(stage)
        self._event_due = True
        self._note({"stage": stage}, at_once)

    def _on_progress(self, percent: float, speed: str) -> None:
        self._alive()
        if self._clip_share is not None:  # a multi-clip job's: the job's share done so far
            ended, total = self._clip_share
            percent = (ended + percent / 100) / total * 100
        if percent != self.progress:
            self._event_due = True
        self.progress = percent
        self._note({"progress": round(percent, 1), "speed": speed})

    def _note(self, fields: dict[str, str | int | float], at_once: bool = False) -> None:
        """The current job's hash is to hold ``fields``: written with the rest of what it
        lacks now (``at_once``, or when its last write is HASH_WRITE_INTERVAL old), else at
        the first step of the job (_poll) when it is, or never, when the job's outcome
        overwrites it first (its script writes the final stage and progress)."""
        if self.current is None or self.queue is None:
            return
        if self._unwritten is None:
            self._unwritten = dict(fields)
        else:
            self._unwritten.update(fields)
        self._write_due(at_once)

    def _write_due(self, at_once: bool = False) -> None:
        fields = self._unwritten
        now = time.monotonic()
        if fields is None or (now - self._written_at < HASH_WRITE_INTERVAL and not at_once) \
                or threading.get_ident() != self._loop_thread or self.current is None \
                or self.queue is None:
            return
        self._unwritten, self._written_at = None, now
        if fields.get("stage") == self._stage_written:
            del fields["stage"]  # the hash says so already (START wrote "fetch")
        else:
            self._stage_written = str(fields.get("stage", self._stage_written))
        self._title(self.stage)
        event = self._progress_event(str(fields.get("speed", "")))
        if fields or event is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                self.queue.update(self.current.id, fields, event)

    def _progress_event(self, speed: str = "") -> dict | None:
        """The job's stage and progress for the event stream when they changed since the
        last progress event and that was PROGRESS_EVENT_INTERVAL ago (None otherwise): at
        most one a second per job, written with the hash update that goes anyway."""
        now = time.monotonic()
        if not self._event_due or now - self._last_event < PROGRESS_EVENT_INTERVAL:
            return None
        self._last_event, self._event_due = now, False
        event: dict[str, str | float] = {"stage": self.stage,
                                         "progress": round(self.progress, 1)}
        if speed:
            event["speed"] = speed
        return event

    def _title(self, state: str) -> None:
        if self.current is None:
            title = f"clip-supervisor: worker {self.slot} {state}"
        else:
            title = (f"clip-supervisor: worker {self.slot} job {self.current.id[:12]} {state} "
                     f"{self.progress:.0f}%")
        if title != self._shown_title:  # the loop says "idle" again after every job
            setproctitle.setproctitle(title)
            self._shown_title = title

    def _activity(self) -> Activity:
        if self.fault:
            return Activity.PAUSED
        if not self.busy:
            return Activity.IDLE
        return Activity.STORING if self.stage == Stage.STORE else Activity.BUSY

    def _alive(self) -> None:
        """Record a sign of life of the main loop: a turn, a step of a job (_poll), a stage
        change, a progress line of ffmpeg, a wait for Redis. Only the main thread's count:
        the heartbeat thread beats on while the loop is stuck in a call that never returns
        (a DNS lookup, a lock, a read without timeout), so the beat alone proves nothing."""
        if threading.get_ident() != self._loop_thread:
            return
        now = time.monotonic()
        self.alive_at = now
        if self.liveness is not None:
            self.liveness.mark(now, self._activity())

    def _beat(self) -> None:
        assert self.queue is not None
        job, fault = self.current, self.fault
        self.queue.heartbeat(self.worker_id, {
            "host": self.config.host_id, "pid": self.pid, "slot": self.slot,
            "started": self.started_ms / 1000.0, "job": job.id if job else None,
            # Uptime as this worker measures it: another host's clock may be off.
            "uptime": round(time.monotonic() - self._started_mono, 1),
            "stage": self.stage, "progress": round(self.progress, 1),
            "jobs_done": self.jobs_done, "fault": fault[0] if fault else None,
            "fault_error": fault[1] if fault else None,
            "fault_since": fault[2] if fault else None,
            # Seconds since the main loop's last sign of life (see _alive).
            "loop_silent": round(time.monotonic() - self.alive_at, 1)},
            self.config.supervisor.heartbeat_ttl)

    def _heartbeat_loop(self) -> None:
        interval = self.config.supervisor.heartbeat_interval
        failing = False
        while not self._heartbeat_stop.wait(interval):
            if self.parent_pid is not None and os.getppid() != self.parent_pid \
                    and not self.parent_gone:
                os.kill(self.pid, PARENT_DEATH_SIGNAL)
            if self._loop_wedged():
                continue
            try:
                self._beat()
                if failing:
                    log.info("heartbeat: Redis is back")
                failing = False
            except (*REDIS_ERRORS, redis.RedisError) as exc:  # this thread must not die
                if not failing:
                    log.warning("heartbeat: Redis unavailable (%s)", exc)
                failing = True

    def _loop_wedged(self) -> bool:
        """True while the main loop has been silent longer than it ever legitimately is
        (silence_limit): then no heartbeat is sent, so that once it expires the message we
        hold is recovered even if our supervisor is gone (ours kills us first: see
        supervisor.master.check_liveness)."""
        silent = time.monotonic() - self.alive_at
        limit = silence_limit(self.config, self._activity())
        if silent <= limit:
            if self._withheld:
                log.warning("main loop alive again after %.0f s of silence: heartbeat resumed",
                            silent)
                self._withheld = False
            return False
        if not self._withheld:
            log.error("main loop silent for %.0f s (limit %.0f s, %s): heartbeat withheld so "
                      "that what this worker holds is recovered", silent, limit,
                      self._activity().name.lower())
            self._withheld = True
        return True

    # --- Redis outages ----------------------------------------------------------------------

    def _persist(self, operation: Any, what: str) -> Any:
        """Run a Redis operation until it succeeds: a finished job's ack is never dropped."""
        delay = 0.1
        while True:
            try:
                try:
                    return operation()
                except redis.ResponseError as exc:
                    if outage(exc):  # MASTERDOWN, LOADING, OOM, READONLY, ...
                        raise redis.ConnectionError(str(exc)) from exc
                    raise
            except REDIS_ERRORS as exc:
                # Give up when told to abort, or to stop while holding nothing: what a job
                # holds stays in its processing list, and the supervisor recovers it.
                if self.aborting or (self.stopping and not self.busy):
                    raise Aborted() from exc
                self._redis_down(exc, what, delay)
                delay = min(delay * 2, REDIS_BACKOFF_MAX)

    def _redis_down(self, exc: Exception, what: str, delay: float = 1.0) -> None:
        metrics.REDIS_ERRORS.labels("worker").inc()
        log.warning("Redis unavailable during %s (%s); retrying in %.1f s", what, exc, delay)
        self._alive()
        self._sleep(delay)
        self._alive()

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on a signal (the wake-up pipe gets a byte per signal)."""
        with contextlib.suppress(InterruptedError):
            select.select([self.waker.fileno()], [], [], seconds)
        self.waker.drain()


class _Fenced(Exception):  # noqa: N818 - a signal between two methods, not an error
    """A clip's end was not recorded: the message is no longer this worker's."""


# A failure of the source itself, not of one clip's range: every clip of the job would meet it.
SOURCE_REASONS = frozenset({"not_found", "forbidden", "http_error", "not_video",
                            "source_too_large", "private_address", "scheme_not_allowed",
                            "bad_url"})


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# --- liveness -------------------------------------------------------------------------------

LIVENESS_MARGIN = 5.0  # seconds above 1.5 x the longest legitimate silence of the main loop


class Activity(enum.IntEnum):
    """What the main loop was doing at its last sign of life: how long it may be silent."""

    IDLE = 0  # waiting for a message (BLMOVE), or for Redis to come back
    BUSY = 1  # running a job
    PAUSED = 2  # a host fault: sleeping between probes
    STORING = 3  # storing a job's clip


def silence_limit(config: Config, activity: Activity) -> float:
    """Seconds the main loop may go without a sign of life before it counts as wedged.

    The longest legitimate silences: idle, a BLMOVE that blocks ``block_timeout`` and a
    Redis call (connect, then the reply: each up to ``socket_timeout``), or the wait of
    up to REDIS_BACKOFF_MAX before the next try; paused, a sleep of up to PAUSE_MAX between
    probes; busy, a read that waits ``stall_timeout`` for a byte, resolving and connecting
    to a source (``connect_timeout`` each, and its answer), a Cloud Storage request retried
    until ``gcs_retry_deadline``. The job's timeout is no bound there: each step returns to
    the loop long before it (a download after each chunk, ffmpeg's watch every second), and
    a long job is a series of short silences. Storing is the exception: a clip copied to an
    output folder on another file system, then synced, takes as long as that disk takes,
    with nothing to interrupt it; the job's timeout is what it may take. Half as much
    again plus LIVENESS_MARGIN covers a loaded machine.
    """
    wait = max(config.redis.block_timeout + 2 * config.redis.socket_timeout,
               REDIS_BACKOFF_MAX)
    if activity is Activity.PAUSED:
        wait += PAUSE_MAX
    elif activity is not Activity.IDLE:
        job, storage = config.job, config.storage
        wait = max(wait, job.stall_timeout, 3 * job.connect_timeout,
                   storage.gcs_connect_timeout + storage.gcs_timeout
                   + storage.gcs_retry_deadline)
        if activity is Activity.STORING:
            wait = max(wait, job.timeout)
    return 1.5 * wait + LIVENESS_MARGIN


class LoopClock:
    """A worker's last sign of life, in memory shared with its supervisor (an anonymous
    mapping made before the fork), so the supervisor sees a wedged worker without asking
    Redis: neither a supervisor cut off from Redis nor a worker stuck in a Redis call
    hides it. One 64-bit word, written and read in one access (never torn): the
    monotonic time in milliseconds (the clock is the machine's, the same in every
    process), shifted left by 2, with the Activity in the low bits."""

    def __init__(self, now: float) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        self._word = ctypes.c_int64.from_buffer(self._map)
        self.mark(now, Activity.IDLE)

    def mark(self, now: float, activity: Activity) -> None:
        self._word.value = int(now * 1000) << 2 | int(activity)

    def read(self) -> tuple[float, Activity]:
        word = self._word.value
        return (word >> 2) / 1000.0, Activity(word & 3)

    def close(self) -> None:
        del self._word
        self._map.close()
