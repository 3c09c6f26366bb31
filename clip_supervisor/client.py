"""The producer's side of clip-supervisor: enqueue clip jobs, follow them, cancel them, and
read the event stream.

::

    from clip_supervisor import Client, JobDead

    client = Client("redis://127.0.0.1:6379/0")
    job = client.enqueue("https://cdn.example.com/talk.mp4", start=12.5, duration=30)
    try:
        done = job.wait(timeout=300)       # the completion event, as a dict
        print(done["output"])
    except JobDead as exc:                 # JobCancelled too, a kind of JobDead
        print("dead:", exc.reason, exc.error)

    # many clips of one source, read once: each clip ends on its own (done or dead)
    job = client.enqueue("https://cdn.example.com/match.mp4",
                         clips=[{"start": 60, "duration": 20}, {"start": 300, "end": 330}])
    for clip in job.wait(timeout=600)["clips"]:
        print(clip["id"], clip["type"], clip.get("output") or clip.get("reason"))

A job is refused at enqueue, with the reason a worker would dead-letter it with, by the
worker's own intake (``JobRefused``). Validation uses the built-in defaults (with the
client's prefix) unless ``config_file`` names the daemon's configuration: give it when the
daemon allows more than the defaults (``file://`` sources, ``allowed_outputs``, private
addresses), or the client refuses what the daemon would take.

Every state change of every job is appended to a Redis Stream, ``{prefix}:events``:
``queued``, ``started``, ``progress`` (at most one a second per job), ``done``, ``retry``,
``dead``, ``cancelled``. ``Job.wait`` and ``Job.follow`` read it from the job's enqueue; a
service that wants every outcome reads it with a consumer group of its own
(``client.events(group="billing")``) and, after being down, resumes where it stopped (within
the stream's length cap).

Importing this module is cheap (the standard library only); the first ``Client`` loads
clip-supervisor's ``worker`` package (its intake, configuration and queue protocol) and
redis-py, never the daemon's heavy dependencies.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.config import Config
    from worker.queue import CancelOutcome, JobQueue

__all__ = ["Client", "Event", "Job", "JobCancelled", "JobDead", "JobRefused", "message"]

FINAL = ("done", "dead", "cancelled")  # the event types that end a job
READ_BLOCK = 2.0  # seconds one blocking read of the stream waits at most
CHECK_EVERY = 10.0  # seconds without an event of the job before its hash is looked at
SEARCH_BACK = 20_000  # stream entries searched (newest first) for an ended job's event


class JobRefused(ValueError):
    """The job was refused at enqueue, as a worker would dead-letter it: ``reason`` (e.g.
    ``bad_range``, ``scheme_not_allowed``) and ``error`` (what is wrong)."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


class JobDead(Exception):
    """The job ended as a dead letter: ``reason``, ``error``, and ``letter``, the dead letter
    as the event stream carries it (without the original message)."""

    def __init__(self, letter: Mapping[str, Any]) -> None:
        self.letter = dict(letter)
        self.job_id = str(self.letter.get("id", ""))
        self.reason = str(self.letter.get("reason", ""))
        self.error = str(self.letter.get("error", ""))
        super().__init__(f"job {self.job_id} dead ({self.reason}): {self.error[-300:]}")


class JobCancelled(JobDead):
    """The job was cancelled (a dead letter with reason ``cancelled``)."""


@dataclass(frozen=True)
class Event:
    """One entry of the event stream: ``type`` (queued, started, progress, done, retry,
    dead, cancelled), the job's id, the time (ISO 8601 UTC), ``data`` (the entry's JSON
    ``event``: for done the completion event, for dead and cancelled the dead letter without
    its message) and ``callback`` (the job's callback URL, on done, dead and cancelled)."""

    entry_id: str
    type: str
    job_id: str
    time: str
    data: dict[str, Any] = field(default_factory=dict)
    callback: str = ""
    job: str = ""  # a clip's event: the id of its multi-clip job (``job_id`` is the clip's)

    @classmethod
    def of(cls, entry_id: str, fields: Mapping[str, str]) -> Event:
        try:
            data = json.loads(fields.get("event") or "{}")
        except ValueError:
            data = {}
        return cls(entry_id, fields.get("type", ""), fields.get("id", ""),
                   fields.get("time", ""), data if isinstance(data, dict) else {},
                   fields.get("callback", ""), fields.get("job", ""))

    @property
    def final(self) -> bool:
        """The job has ended (done, dead or cancelled)."""
        return self.type in FINAL


def message(url: str, *, start: float | None = None, end: float | None = None,
            duration: float | None = None, output: str | None = None,
            mode: str | None = None, format: str | None = None,  # noqa: A002 - the field
            id: str | None = None, callback: str | None = None,  # noqa: A002
            clips: Iterable[Mapping[str, Any]] | None = None) -> bytes:
    """The queue message of a job (compact JSON; fields left None are left out)."""
    body: dict[str, Any] = {"url": url}
    for key, value in (("id", id), ("start", start), ("end", end), ("duration", duration),
                       ("output", output), ("mode", mode), ("format", format),
                       ("callback", callback),
                       ("clips", None if clips is None else [dict(c) for c in clips])):
        if value is not None:
            body[key] = value
    return json.dumps(body, separators=(",", ":")).encode()


def _worker() -> None:
    """Make our ``worker`` package importable (clip_supervisor.activate, once)."""
    from clip_supervisor import activate

    activate()


class Client:
    """A connection to one clip-supervisor queue: ``redis_url`` (``redis://``,
    ``rediss://``, ``redis+cluster://``, ``redis+sentinel://``, as ``[redis] url``) and the
    daemon's key ``prefix``."""

    def __init__(self, redis_url: str, prefix: str = "clips", *,
                 config_file: str | None = None, validate: bool = True) -> None:
        _worker()
        from worker.config import load

        config = load(config_file, env={}, overrides={"redis.url": redis_url,
                                                      "redis.prefix": prefix})
        self._setup(config, validate)

    @classmethod
    def from_config(cls, config: Config, validate: bool = True) -> Client:
        """A client for the queue of a loaded configuration (``clip-supervisor``'s own)."""
        client = cls.__new__(cls)
        client._setup(config, validate)
        return client

    def _setup(self, config: Config, validate: bool) -> None:
        from worker.queue import JobQueue, connect

        self.config = config
        self.validate = validate
        self.queue: JobQueue = JobQueue(connect(config), config)

    # --- producing ---------------------------------------------------------------------------

    def enqueue(self, url: str, *, start: float | None = None, end: float | None = None,
                duration: float | None = None, output: str | None = None,
                mode: str | None = None, format: str | None = None,  # noqa: A002
                id: str | None = None, callback: str | None = None,  # noqa: A002
                clips: Iterable[Mapping[str, Any]] | None = None) -> Job:
        """Queue one clip of ``url`` (or many, with ``clips``) and return its handle.

        ``start`` (seconds, default 0) and ``end`` or ``duration`` (not both); ``output``
        (``gs://bucket/key``, ``file:///abs/path`` or a key under the daemon's output_base);
        ``mode`` (``copy``, ``smart`` or ``encode``); ``format`` (mp4, mov, mkv, webm, ts);
        ``id`` (1-128 of ``[A-Za-z0-9._-]``; default: the SHA-1 of the message);
        ``callback`` (an https URL the outcome is POSTed to). Raises JobRefused for a job a
        worker would refuse.

        ``clips``: many clips of the one source, read once, each a mapping of ``id``
        (default ``<job id>-<n>``, n from 1), ``start``, ``end`` or ``duration``, ``output``
        (default ``<output_base>/<clip id>.<format>``), ``mode``, ``format``; ``mode`` and
        ``format`` given here are the clips' defaults, ``start``, ``end``, ``duration`` and
        ``output`` may not be. A clip that is wrong on its own (a bad range, say) is not
        refused: it ends as its own dead letter, and the others run. ``Job.wait`` then
        returns every clip's outcome.
        """
        return self.enqueue_many([dict(url=url, start=start, end=end, duration=duration,
                                       output=output, mode=mode, format=format, id=id,
                                       callback=callback, clips=clips)])[0]

    def enqueue_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[Job]:
        """Queue several jobs in one round trip (one MULTI), in order; each is a mapping of
        ``enqueue``'s arguments (``url`` required). Nothing is queued when one is refused
        (JobRefused, naming the job's place in ``jobs``)."""
        prepared = []
        for n, spec in enumerate(jobs):
            raw = message(**{key: value for key, value in spec.items() if value is not None})
            job_id, clips = self._check(raw, n)
            event: dict[str, Any] = {"url": str(spec.get("url", ""))[:2048]}
            if clips:
                event["clips"] = clips
            prepared.append((raw, job_id, event))
        positions = self.queue.enqueue_many(prepared) if prepared else []
        return [Job(self, job_id, position, event.get("clips", ()))
                for (_, job_id, event), position in zip(prepared, positions, strict=True)]

    def _check(self, raw: bytes, n: int) -> tuple[str, list[str]]:
        """The job's id and its clips' ids, or JobRefused."""
        from worker.job import Rejected, intake

        job = intake(raw, self.config)
        if isinstance(job, Rejected):
            if self.validate:
                where = f"job {n}: " if n else ""
                raise JobRefused(job.error.reason, where + job.error.error)
            return job.id, []
        return job.id, [clip.id for clip in job.clips]

    # --- following and cancelling --------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """A handle on a job enqueued earlier (by anyone), to follow or cancel it."""
        return Job(self, job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: see ``Job.cancel``."""
        return self.cancel_job(job_id).cancelled

    def cancel_job(self, job_id: str) -> CancelOutcome:
        """Cancel a job and tell what was done: ``cancelled`` (True: it was queued and is a
        dead letter now, ``removed``; or it runs and its worker aborts it, ``running``),
        and ``state``, the job's state when the cancel came (done or dead: left alone)."""
        return self.queue.cancel(job_id)

    def events(self, *, after: str = "$", group: str | None = None,
               consumer: str | None = None, timeout: float | None = None,
               types: Iterable[str] | None = None, ack: bool = True) -> Iterator[Event]:
        """Iterate over the event stream, oldest first, waiting for new entries.

        Without ``group``: the entries after ``after`` ("$": from now on, "0": all that
        the stream still holds, or an entry id). With ``group``: that consumer group's
        entries (made at the stream's end when new, or at ``after`` when that is not "$"),
        as ``consumer`` (default: host and pid), first those it was given before and never
        acknowledged, then new ones; each entry is acknowledged when the loop asks for the
        next one (``ack``), so one that was being handled when the process died is read
        again. ``timeout``: stop after that many seconds without an entry (None: never).
        ``types``: only entries of these types (the others are acknowledged unseen).
        """
        wanted = frozenset(types) if types is not None else None
        queue = self.queue
        block_ms = int(READ_BLOCK * 1000)
        if group is None:
            position = queue.events_last_id() if after == "$" else after

            def read() -> list[tuple[str, dict[str, str]]]:
                nonlocal position
                entries = queue.events_read(position, count=100, block_ms=block_ms)
                if entries:
                    position = entries[-1][0]
                return entries

            return _stream(read, timeout, wanted, None)
        name = consumer or f"{socket.gethostname()}-{os.getpid()}"
        queue.events_ensure_group(group, after)
        pending: str | None = "0"  # first what it was given before and never acknowledged

        def read_group() -> list[tuple[str, dict[str, str]]]:
            nonlocal pending
            if pending is not None:
                entries = queue.events_pending(group, name, pending, count=100)
                pending = entries[-1][0] if entries else None
                if entries:
                    return entries
            return queue.events_read_group(group, name, count=100, block_ms=block_ms)

        handled = (lambda entry_id: queue.events_ack(group, entry_id)) if ack else None
        return _stream(read_group, timeout, wanted, handled)

    def close(self) -> None:
        """Close the connections to Redis."""
        self.queue.client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream(read: Callable[[], list[tuple[str, dict[str, str]]]], timeout: float | None,
            wanted: frozenset[str] | None,
            handled: Callable[[str], object] | None) -> Iterator[Event]:
    """The events ``read()`` returns, one by one, until ``timeout`` seconds pass without
    one; ``handled(entry_id)`` once the loop asks for the next (and for unwanted ones)."""
    quiet_since = time.monotonic()
    while True:
        entries = read()
        if entries:
            quiet_since = time.monotonic()
        elif timeout is not None and time.monotonic() - quiet_since >= timeout:
            return
        for entry_id, fields in entries:
            event = Event.of(entry_id, fields)
            if wanted is None or event.type in wanted:
                yield event
            if handled is not None:
                handled(entry_id)


class Job:
    """A handle on one job: its ``id``, and where its events start in the stream
    (``position``, the entry id of its ``queued`` event; "" for a handle made from an id);
    ``clips``, a multi-clip job's clip ids (empty for a job of one clip)."""

    def __init__(self, client: Client, job_id: str, position: str = "",
                 clips: Iterable[str] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.position = position
        self._clips = tuple(clips) if clips is not None else None  # None: ask its hash

    @property
    def clips(self) -> tuple[str, ...]:
        """A multi-clip job's clip ids, in order (from its hash for a handle made from an
        id: empty until the job was enqueued by a client, or started)."""
        if self._clips is None:
            raw = self.client.queue.job_fields(self.id, "clips")["clips"]
            try:
                ids = json.loads(raw) if raw else []
            except ValueError:
                ids = []
            if not ids:
                return ()
            self._clips = tuple(str(clip) for clip in ids)
        return self._clips

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict[str, Any]:
        """The job's hash (state, stage, progress, worker, output, reason, error, timings;
        see worker.protocol.JOB_FIELDS), with ``state`` a JobState; {} when Redis knows
        nothing of it (never enqueued with an id, or expired after ``job_ttl``)."""
        from worker.protocol import JobState

        fields: dict[str, Any] = dict(self.client.queue.job(self.id).fields)
        if fields.get("state") in set(JobState):
            fields["state"] = JobState(fields["state"])
        return fields

    def cancel(self) -> bool:
        """Cancel the job. A queued job is taken out of the queue and never runs; a running
        one is aborted by its worker within a second (its ffmpeg killed, nothing stored);
        either ends as a dead letter with reason ``cancelled`` (``wait`` raises
        JobCancelled). False when it had already ended (done or dead: left alone) or is
        unknown. A running job that finishes in the instant before its worker hears of the
        cancel stays done."""
        return self.client.cancel(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job's end; return its completion event (``output``, ``duration``,
        ``elapsed``, ``timings``, ... as on ``{prefix}:done``). Raises JobCancelled or JobDead
        (with the reason) when it ended as a dead letter, TimeoutError after ``timeout``
        seconds (None: no limit).

        A multi-clip job's wait returns ``{"id", "clips"}`` once every clip has ended:
        ``clips`` holds, in the job's order, each clip's completion event or dead letter
        (``id`` the clip's, ``job`` the job's) with ``type`` done, dead or cancelled. It
        raises nothing for dead clips. A job that failed as a whole once it ran (its retries
        spent, poison, cancelled while running) ends each clip left as its own letter; one
        that never ran (cancelled while queued, a message refused as a whole) gives every
        clip the job's letter."""
        final = None
        ended: dict[str, Event] = {}
        for event in self.follow(timeout):
            final = event
            if event.final and event.job == self.id:
                ended[event.job_id] = event
        clips = self.clips
        if clips:
            whole = final if final is not None and final.final and final.job_id == self.id \
                else None
            return {"id": self.id, "clips": [self._outcome(clip, ended.get(clip), whole)
                                             for clip in clips]}
        assert final is not None and final.final
        if final.type == "done":
            return final.data
        letter = {"id": self.id, **final.data}
        if final.type == "cancelled" or letter.get("reason") == "cancelled":
            raise JobCancelled(letter)
        raise JobDead(letter)

    def _outcome(self, clip: str, event: Event | None, whole: Event | None) -> dict[str, Any]:
        """One clip's outcome for ``wait``: its own final event, else the job's."""
        if event is not None:
            return {**event.data, "id": clip, "job": self.id, "type": event.type}
        data = dict(whole.data) if whole is not None else {}
        data.pop("message_sha1", None)
        return {**data, "id": clip, "job": self.id,
                "type": whole.type if whole is not None else "dead"}

    def follow(self, timeout: float | None = None) -> Iterator[Event]:
        """The job's events as they come, from its enqueue (or from now, for a handle made
        from an id: then first its end, if it has ended), until the one that ends it (done,
        dead, cancelled), which is the last one yielded. TimeoutError after ``timeout``
        seconds. A multi-clip job's events include its clips' (``Event.job`` names the
        job); it has ended once each clip has had its final event, or the job one of its
        own (it failed as a whole)."""
        queue = self.client.queue
        deadline = None if timeout is None else time.monotonic() + timeout
        position = self.position
        if not position:
            position = queue.events_last_id()  # first: an end after it is read below
            ended = self._ended()
            if ended:
                yield from ended
                return
        left = set(self.clips)
        checked = time.monotonic()
        while True:
            block = READ_BLOCK
            if deadline is not None:
                block = min(block, deadline - time.monotonic())
                if block <= 0:
                    raise TimeoutError(f"job {self.id} has not ended after {timeout:g} s")
            entries = queue.events_read(position, count=500, block_ms=max(1, int(block * 1000)))
            for entry_id, fields in entries:
                position = entry_id
                if not self._ours(fields):
                    continue
                checked = time.monotonic()
                event = Event.of(entry_id, fields)
                yield event
                if event.type == "started" and not left and event.job_id == self.id:
                    left = set(event.data.get("clips") or ())  # a handle made from an id
                if event.final:
                    if event.job_id == self.id:
                        return  # the job, as a whole
                    left.discard(event.job_id)
                    if not left:
                        return
            if time.monotonic() - checked >= CHECK_EVERY:
                # Silence: make sure the end was not trimmed away or lost with the stream.
                checked = time.monotonic()
                ended = self._ended()
                if ended:
                    yield from ended
                    return

    def _ours(self, fields: Mapping[str, str]) -> bool:
        """Whether a stream entry is this job's: its own (no ``job`` field), or one of its
        clips'. A clip of another job may carry this job's id as its own (ids are the
        producers'): its entry names that job, and is not this one's end."""
        parent = fields.get("job")
        return parent == self.id if parent else fields.get("id") == self.id

    def _ended(self) -> list[Event]:
        """The events that ended the job when its hash says it has ended (for a multi-clip
        job, its clips' final events): found in the stream (newest first, up to SEARCH_BACK
        entries), else made from the hash; [] when it has not ended."""
        from worker.protocol import JobState

        queue = self.client.queue
        fields = queue.job(self.id).fields
        state = fields.get("state")
        if state not in (JobState.DONE, JobState.DEAD):
            return []
        clips = set(self.clips)
        found: dict[str, Event] = {}
        before, searched = "+", 0
        while searched < SEARCH_BACK:
            entries = queue.events_before(before, 1000)
            if not entries:
                break
            for entry_id, entry in entries:
                if entry.get("type") not in FINAL:
                    continue
                if entry.get("id") == self.id and not entry.get("job"):
                    return [*found.values(), Event.of(entry_id, entry)]
                if entry.get("job") == self.id and entry.get("id") in clips:
                    found.setdefault(entry.get("id", ""), Event.of(entry_id, entry))
                    if len(found) == len(clips):
                        return list(found.values())
            before = entries[-1][0]
            searched += len(entries)
        if clips:  # trimmed from the stream: what the job's records still tell
            ended = queue.clips_ended(self.id)
            return [*found.values(), *(
                Event("", ended.get(clip, "dead"), clip, fields.get("finished", ""),
                      {"id": clip, "job": self.id}, job=self.id)
                for clip in sorted(clips - set(found)))]
        if state == JobState.DONE:
            data: dict[str, Any] = {"id": self.id, "output": fields.get("output", ""),
                                    "url": fields.get("url", ""), "time": fields.get(
                                        "finished", "")}
            return [Event("", "done", self.id, data["time"], data)]
        data = {"id": self.id, "reason": fields.get("reason", ""),
                "error": fields.get("error", ""), "attempts": fields.get("attempts", ""),
                "time": fields.get("finished", "")}
        kind = "cancelled" if data["reason"] == "cancelled" else "dead"
        return [Event("", kind, self.id, data["time"], data)]
