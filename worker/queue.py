"""The Redis side of a job's life: enqueue, fetch, record, ack, retry, dead-letter, cancel,
recover, and the event stream.

One object per process (``JobQueue``) wraps a redis-py client, our key names
(``worker.keys``) and the Lua scripts of ``worker.scripts``. It is the only module that
speaks Redis: the worker's loop, the master's recovery and host claim, the CLI, the demo,
the metrics, the dashboard, the webhook deliverer and the producers' client
(clip_supervisor.client) all read and write keys through its methods, and a test holds
every other module to it. So a key's layout, a command or a script changes here and
nowhere else.

The event stream ``{prefix}:events`` gets one entry per state change of a job, written in
the same step as the change (a script's XADD, or the MULTI of an enqueue): fields ``type``
(worker.protocol.EventType), ``id``, ``time``, ``event`` (a JSON object) and, on entries
that end a job, ``callback``. It is capped near ``events_max`` entries (XADD MAXLEN ~), so
a consumer group that is down longer than it takes the pool to write that many loses the
oldest. Readers use the ``events_*`` methods: consumer groups (read, ack, claim what a dead
consumer held, its own pending ones after a restart) or a plain read from a position.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import json.encoder
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError
from redis.sentinel import Sentinel

try:  # a dependency of the package (redis[hiredis]); redis-py packs without it
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - the pure-Python fallback
    _pack_command = None

from . import scripts
from .config import Config
from .job import Job, dead_letter, intake, job_id_of
from .keys import Keys
from .protocol import EventType, JobState

log = logging.getLogger("clip-supervisor.queue")

if TYPE_CHECKING:
    from .wake import Waker

# Errors that mean "Redis is not serving us right now" (down, restarting, failing over,
# loading, out of memory): retried with backoff, never fatal. BusyLoadingError is a
# ConnectionError already.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError,
                redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)
# Any failure of a Redis call, for callers that must never fail on one (``status``).
ANY_REDIS_ERROR = (redis.RedisError, redis.exceptions.RedisClusterException, ConnectionError,
                   TimeoutError)
# Error replies of the same nature that redis-py reports as a plain ResponseError: a
# failover, a server loading or short of replicas (NOREPLICAS), one that cannot save to
# its disk (MISCONF), one busy with another client's slow script (BUSY). A refusal of the
# server's is never the message's fault.
TRANSIENT_REPLIES = ("UNBLOCKED", "MASTERDOWN", "LOADING", "TRYAGAIN", "CLUSTERDOWN",
                     "MISCONF", "NOREPLICAS", "BUSY ")
# The same inside a script's error ("ERR Error running script ... OOM command not allowed").
_TRANSIENT_IN_SCRIPT = ("OOM command not allowed", "READONLY", "MISCONF ", "NOREPLICAS ",
                        "BUSY Redis is busy", "You can't write against a "
                        "read only replica", "-MASTERDOWN", "-LOADING")


def outage(exc: BaseException) -> bool:
    """True when a Redis error means "not serving us right now": retry with backoff."""
    if isinstance(exc, REDIS_ERRORS):
        return True
    if isinstance(exc, redis.ResponseError):
        text = str(exc)
        return text.startswith(TRANSIENT_REPLIES) or any(
            marker in text for marker in _TRANSIENT_IN_SCRIPT)
    return False


def connect(config: Config, *, socket_timeout: float | None = None, single: bool = False) -> Any:
    """A client for ``[redis] url``: plain, TLS, Cluster or Sentinel, chosen by the scheme.

    ``redis://`` and ``rediss://`` (TLS) name one server; ``redis+cluster://host:port`` any
    node of a Redis Cluster (our keys share one hash slot, see worker.keys);
    ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` the Sentinels
    that know the current master of ``service``.

    ``single`` (a worker's client, plain or TLS): commands go over one connection kept by
    the client instead of a pool checkout and release around each (~5-10 % of a no-op
    job's CPU); pipelines and the blocking BLMOVE still take connections of the pool. If
    Redis cannot be reached now, a pooled client is returned (it connects when it can).
    """
    url = config.redis.url
    timeouts = {"socket_timeout": socket_timeout or config.redis.socket_timeout,
                "socket_connect_timeout": min(socket_timeout or config.redis.socket_timeout,
                                              5.0)}
    scheme = urlsplit(url).scheme
    if scheme.endswith("+cluster"):
        plain = scheme.removesuffix("+cluster") + url[len(scheme):]
        return RedisCluster.from_url(plain, **timeouts)
    if scheme.endswith("+sentinel"):
        return _sentinel_master(url, scheme.removesuffix("+sentinel") == "rediss", timeouts)
    if single:
        try:
            return redis.Redis.from_url(url, health_check_interval=30,
                                        single_connection_client=True, **timeouts)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass  # it connects at once: not now, so the pool's lazy connections
    return redis.Redis.from_url(url, health_check_interval=30, **timeouts)


def _sentinel_master(url: str, tls: bool, timeouts: dict[str, float]) -> redis.Redis:
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.partition(":")[2]) or None
    sentinels = []
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":")
        sentinels.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("a redis+sentinel URL names the service: .../mymaster")
    sentinel = Sentinel(sentinels, sentinel_kwargs=dict(timeouts), **timeouts)
    return sentinel.master_for(service, db=int(db or 0), password=password, ssl=tls,
                               **timeouts)


_NOW_ISO: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """The time now, ISO 8601 UTC to the second; formatted once a second (a worker stamps
    every job it ends: formatting it each time was a microsecond of a no-op job)."""
    global _NOW_ISO
    second = int(time.time())
    cached = _NOW_ISO  # one read: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _NOW_ISO = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return cached[1]


def _event_encoder() -> Callable[[dict], str]:
    """json.dumps with its defaults, for the completion event: the C encoder json.dumps
    ends in, made once instead of at every call. Its check for circular references is left
    out: an event is a new dict of plain values."""
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # pragma: no cover - CPython without its _json accelerator
        return json.dumps
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii,
                  None, ": ", ", ", False, False, True)
    return lambda obj: "".join(encode(obj, 0))


_event_json = _event_encoder()


@dataclass(frozen=True)
class Held:
    """The message a worker holds in its processing list, as the outcome scripts (DONE,
    DEAD, RETRY, CLIP_END, CLIPS_ACK) act on it: the worker, the message's bytes (its
    SHA-1 finds it there; a message no longer there fences the call), the job it is, and
    the job's webhook URL, which its outcome events carry ("" = none)."""

    worker_id: str
    message: bytes
    job_id: str
    callback: str = ""


class JobQueue:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self.client = client
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self._fetch = client.register_script(scripts.FETCH)
        self._start = client.register_script(scripts.START)
        self._done = client.register_script(scripts.DONE)
        self._dead = client.register_script(scripts.DEAD)
        self._retry = client.register_script(scripts.RETRY)
        self._release = client.register_script(scripts.RELEASE)
        self._recover = client.register_script(scripts.RECOVER)
        self._replay = client.register_script(scripts.REPLAY_DEAD)
        self._mark_cancel = client.register_script(scripts.MARK_CANCEL)
        self._cancel = client.register_script(scripts.CANCEL)
        self._clip_end = client.register_script(scripts.CLIP_END)
        self._clips_ack = client.register_script(scripts.CLIPS_ACK)
        self.hosts = HostClaims(client, self.keys)
        # A worker's client (one kept connection, see connect): its per-job scripts go
        # straight onto that connection (see _script).
        conn = getattr(client, "connection", None)
        lock = getattr(client, "single_connection_lock", None)
        self._direct = ((conn, lock) if conn is not None and lock is not None
                        and not isinstance(client, RedisCluster) else None)
        # Work the caller gives a per-job script call to do between sending it and reading
        # its answer, while Redis runs it (the worker: its deferred log line, logs.defer).
        self.while_waiting: Callable[[], None] | None = None
        self._has_blmove: bool | None = None
        self._blocking: tuple[Any, Any] | None = None  # (pool, connection) for BLMOVE

    # --- fetching -------------------------------------------------------------------------

    def take(self, worker_id: str, wait: float, waker: Waker,
             stopping: Callable[[], bool]) -> bytes | None:
        """The next message, moved into this worker's processing list; None when none came
        within ``wait`` seconds (less when a delayed retry falls due sooner), or when
        ``stopping()`` says the worker was told to stop.

        A queued or due message is taken without blocking. Otherwise the worker blocks in
        BLMOVE on a connection of its own, whose socket ``waker`` shuts down when a signal
        arrives, so a stop never waits for the block to time out. Redis errors go to the
        caller (``outage`` tells which to retry), after a cluster client has relearnt where
        our slot lives.
        """
        try:
            got = self.fetch_nowait(worker_id)
            if isinstance(got, bytes):
                return got
            return self._block(worker_id, min(wait, got), waker, stopping)
        except redis.RedisError as exc:
            if outage(exc):
                with contextlib.suppress(*REDIS_ERRORS, redis.RedisError):
                    self.topology_changed()
            raise

    def fetch_nowait(self, worker_id: str) -> bytes | float:
        """The next message, or the seconds until a delayed retry is due (inf: none)."""
        k = self.keys
        found, *rest = self._script(self._fetch, [k.queue, k.retry, k.delayed,
                                                  k.processing(worker_id)], [100])
        if found == 1:
            return rest[0]
        return math.inf if rest[0] < 0 else rest[0] / 1000.0

    def _block(self, worker_id: str, timeout: float, waker: Waker,
               stopping: Callable[[], bool]) -> bytes | None:
        command = self._blocking_command(worker_id, timeout)
        if self._blocking is None:
            self._blocking = self._blocking_connection()
        conn = self._blocking[1]
        conn.connect()  # a no-op when connected
        # redis-py's private ``_sock``, here only: shutting the socket down is the one way to
        # make a blocked recv return at once (Python restarts it after a signal, PEP 475),
        # and redis-py has no public handle on it.
        with waker.watching(conn._sock):
            if stopping():  # checked while watched: a signal from now on wakes the read
                return None
            try:
                conn.send_command(*command)
                return conn.read_response()
            except (*REDIS_ERRORS, OSError, redis.ResponseError) as exc:
                # A broken or moved connection is dropped; the next call takes a fresh one
                # (on a cluster, after relearning which node holds our slot).
                self._drop_blocking_connection()
                if stopping():
                    return None
                if not isinstance(exc, redis.ResponseError):
                    raise
                if outage(exc):  # UNBLOCKED by a failover, OOM, READONLY, ...
                    raise redis.ConnectionError(str(exc)) from exc
                if "MOVED" not in str(exc) and "ASK" not in str(exc):
                    raise
                self.topology_changed()
                return None

    def _blocking_command(self, worker_id: str, timeout: float) -> list:
        """BLMOVE (or BRPOPLPUSH before Redis 6.2) from the queue into our processing list."""
        if self._has_blmove is None:
            info = self.client.info("server")
            if "redis_version" not in info:  # a cluster answers per node
                info = next(iter(info.values()))
            major, minor = (int(x) for x in str(info["redis_version"]).split(".")[:2])
            self._has_blmove = (major, minor) >= (6, 2)
        if self._has_blmove:
            return ["BLMOVE", self.keys.queue, self.keys.processing(worker_id), "RIGHT", "LEFT",
                    f"{max(timeout, 0.01):.3f}"]
        return ["BRPOPLPUSH", self.keys.queue, self.keys.processing(worker_id),
                max(1, math.ceil(timeout))]

    def _blocking_connection(self) -> tuple[Any, Any]:
        """(pool, connection) on the node that holds our keys, kept for BLMOVE alone."""
        client = self.client
        if isinstance(client, RedisCluster):
            client = client.get_redis_connection(client.get_node_from_key(self.keys.queue))
        pool = client.connection_pool
        return pool, pool.get_connection()

    def _drop_blocking_connection(self) -> None:
        if self._blocking is not None:
            pool, conn = self._blocking
            self._blocking = None
            conn.disconnect()
            with contextlib.suppress(Exception):
                pool.release(conn)

    def topology_changed(self) -> None:
        """After MOVED or a dead node: let a cluster client learn the new slot owners."""
        if isinstance(self.client, RedisCluster):
            self.client.nodes_manager.initialize()

    def release(self, worker_id: str, job_id: str = "",
                fields: dict[str, str | int | float] | None = None) -> int:
        """Give back whatever this worker holds, to the front of the queue, uncounted; with
        ``job_id``, set ``fields`` in that job's hash in the same step (and append a
        ``queued`` event naming its reason)."""
        keys = [self.keys.processing(worker_id), self.keys.queue]
        args: list[Any] = []
        if job_id:
            keys += [self.keys.job(job_id), self.keys.events]
            fields = fields or {}
            body = {"given_back": True, "reason": fields.get("reason", "")}
            args = [job_id, now_iso(), json.dumps(body), self.events_max, *_pairs(fields)]
        return int(self._release(keys=keys, args=args))

    # --- recording --------------------------------------------------------------------------

    def start(self, job_id: str, message_sha1: str,
              fields: dict[str, str | int | float]) -> int:
        """Mark a job running; return the attempts its message already used, or CANCELLED
        (nothing written) when the job was cancelled before it could start."""
        body = {"worker": str(fields.get("worker", "")), "message_sha1": message_sha1}
        if "clips" in fields:  # a multi-clip job's: its clip ids, for whoever follows it
            body["clips"] = json.loads(fields["clips"])
        return int(self._script(
            self._start, [self.keys.job(job_id), self.keys.attempts, self.keys.events,
                          self.keys.clips(job_id)],
            [message_sha1, int(self.config.job.job_ttl), job_id, now_iso(), _json(body),
             self.events_max, *_pairs(fields)]))

    def update(self, job_id: str, fields: dict[str, str | int | float],
               event: dict | None = None) -> None:
        """Set fields of a running job's hash; with ``event``, append it to the stream as a
        ``progress`` entry in the same round trip."""
        if event is None:
            self.client.hset(self.keys.job(job_id), mapping=_safe(fields))
            return
        pipe = self.client.pipeline(transaction=True)
        if fields:
            pipe.hset(self.keys.job(job_id), mapping=_safe(fields))
        self._add_event(pipe, EventType.PROGRESS, job_id, _json(event))
        pipe.execute()

    def done(self, held: Held, event: dict, fields: dict[str, str | int | float],
             take_next: bool = False, token: str = "") -> tuple[bool, bytes | None]:
        """Ack a finished job: (acked, next message). ``acked`` is False when the message
        was no longer in this worker's processing list (recovered and requeued while this
        worker was taken for dead): then nothing was recorded, and the requeued copy
        decides. With ``take_next``, the next queued message (or None) is already in this
        worker's processing list when this returns. ``token`` names this ack: a call made
        again with the same token after a lost reply answers as the first run did. The
        ``done`` event (``event`` itself, with the callback) is appended to the stream."""
        k = self.keys
        reply = self._script(
            self._done, [k.processing(held.worker_id), k.job(held.job_id), k.done, k.attempts,
                         k.queue, k.events],
            [sha1(held.message), _event_json(event), int(self.config.job.job_ttl),
             self.config.job.done_max - 1, "1" if take_next else "0", token or uuid.uuid4().hex,
             held.job_id, str(event.get("time") or now_iso()), held.callback, self.events_max,
             *_pairs(fields)])
        return bool(reply[0]), (reply[1] if len(reply) > 1 else None)

    def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run one of our scripts (the worker's per-job ones: FETCH, START, DONE).

        On a worker's client (one kept connection, see ``connect``) the EVALSHA goes
        straight onto that connection, under the lock redis-py takes around it: redis-py's
        path around a command (its retry wrapper, observability hooks and per-argument
        checks) cost more CPU than the call itself, about a quarter of a no-op job's
        instructions. Whatever is not the plain case takes redis-py's own path for the
        same call, with its reconnects and retries: a broken connection (already closed
        by the failed send or read), a server that lost its scripts (NOSCRIPT: redis-py
        loads it again), and every other client (Cluster, Sentinel, pooled)."""
        direct = self._direct
        if direct is not None and self.client.connection is direct[0]:  # None once closed
            conn, lock = direct
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
            with lock:
                try:
                    conn.send_packed_command([_pack_command(command)] if _pack_command
                                             else conn.pack_command(*command))
                    if self.while_waiting is not None:
                        self._meanwhile()
                    return conn.read_response()
                except (redis.ConnectionError, redis.TimeoutError, NoScriptError):
                    pass  # redis-py's path below: reconnect, or load the script again
        return script(keys=keys, args=args)

    def _meanwhile(self) -> None:
        assert self.while_waiting is not None
        try:
            self.while_waiting()
        except Exception:  # its own failure must not cost the call's answer
            log.exception("while waiting for Redis")

    def dead(self, held: Held, letter: dict, fields: dict[str, str | int | float],
             token: str = "", cancelled: bool = False) -> int:
        """Dead-letter the message; 0 when it was no longer ours (fenced). ``token`` as for
        ``done``: a call made again after a lost reply answers as the first run did. The
        stream gets a ``dead`` entry (``cancelled`` with ``cancelled``) holding the letter
        without its message."""
        k = self.keys
        kind = EventType.CANCELLED if cancelled else EventType.DEAD
        return int(self._dead(
            keys=[k.processing(held.worker_id), k.job(held.job_id), k.dead, k.attempts,
                  k.events],
            args=[sha1(held.message), _letter_json(letter), int(self.config.job.job_ttl),
                  self.config.job.dead_max, token or uuid.uuid4().hex, str(kind), held.job_id,
                  str(letter.get("time") or now_iso()), _letter_json(_unsent(letter)),
                  held.callback, self.events_max, *_pairs(fields)]))

    def retry(self, held: Held, letter: dict, fields: dict[str, str | int | float],
              token: str = "") -> tuple[int, float | None]:
        """Count a failed attempt; delay the message, or dead-letter it at max_attempts.

        Returns (attempts, seconds until the retry is due, or None when dead-lettered);
        attempts is -1 when the message was no longer ours (fenced). ``token`` as for
        ``done``. The stream gets a ``retry`` entry (attempts, delay_ms, reason, error) or
        a ``dead`` one.
        """
        k = self.keys
        cfg = self.config.job
        without = {key: value for key, value in letter.items() if key != "attempts"}
        retry_event = {"reason": letter.get("reason", ""),
                       "error": str(letter.get("error", ""))[-500:]}
        attempts, delay = self._retry(
            keys=[k.processing(held.worker_id), k.delayed, k.attempts, k.job(held.job_id),
                  k.dead, k.events],
            args=[sha1(held.message), cfg.max_attempts, int(cfg.retry_backoff * 1000),
                  int(cfg.retry_backoff_max * 1000), token or uuid.uuid4().hex,
                  _letter_json(without), int(cfg.job_ttl), cfg.dead_max, held.job_id,
                  str(letter.get("time") or now_iso()), _letter_json(retry_event),
                  _letter_json(_unsent(without)), held.callback, self.events_max,
                  *_pairs(fields)])
        return int(attempts), (None if delay < 0 else delay / 1000.0)

    # --- many clips per job (see worker.scripts: CLIP_END, CLIPS_ACK) -------------------------

    def clips_ended(self, job_id: str) -> dict[str, str]:
        """A multi-clip job's clips that have ended: clip id -> done, dead or cancelled."""
        return {_str(clip): _str(outcome)
                for clip, outcome in self.client.hgetall(self.keys.clips(job_id)).items()}

    def clip_end(self, held: Held, clip_id: str, kind: str, entry: dict) -> int:
        """Record that clip ``clip_id`` of the job whose message this worker holds ended:
        ``kind`` done (``entry``, its completion event, goes onto the done list and the
        stream), dead or cancelled (``entry`` is its dead letter, onto the dead list; the
        stream gets it without its message). Returns 1 (recorded), 2 (it had ended before:
        nothing written) or 0 (fenced: the message is no longer this worker's, whether or
        not the clip has ended)."""
        k = self.keys
        cfg = self.config.job
        done = kind == EventType.DONE
        event = entry if done else _unsent(entry)
        return int(self._clip_end(
            keys=[k.processing(held.worker_id), k.clips(held.job_id), k.job(held.job_id),
                  k.done if done else k.dead, k.events],
            args=[sha1(held.message), clip_id, str(kind), _letter_json(entry),
                  cfg.done_max if done else cfg.dead_max, _letter_json(event), held.job_id,
                  str(entry.get("time") or now_iso()), held.callback, self.events_max,
                  int(cfg.job_ttl)]))

    def clips_ack(self, held: Held, fields: dict[str, str | int | float],
                  take_next: bool = False, token: str = "") -> tuple[bool, bytes | None]:
        """Acknowledge a multi-clip job whose every clip has ended: (acked, next message), as
        ``done`` answers; its hash's state becomes done (a clip was stored) or dead."""
        k = self.keys
        reply = self._clips_ack(
            keys=[k.processing(held.worker_id), k.job(held.job_id), k.clips(held.job_id),
                  k.attempts, k.queue],
            args=[sha1(held.message), token or uuid.uuid4().hex, int(self.config.job.job_ttl),
                  "1" if take_next else "0", *_pairs(fields)])
        return bool(reply[0]), (reply[1] if len(reply) > 1 else None)

    def _add_event(self, pipe: Any, kind: str, job_id: str, body: str | bytes,
                   callback: str | None = None) -> None:
        fields: dict[str, Any] = {"type": str(kind), "id": job_id, "time": now_iso(),
                                  "event": body}
        if callback is not None:
            fields["callback"] = callback
        pipe.xadd(self.keys.events, fields, maxlen=self.events_max, approximate=True)

    # --- liveness and recovery ----------------------------------------------------------------

    def heartbeat(self, worker_id: str, info: dict, ttl: float) -> None:
        payload = json.dumps(info)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.heartbeat(worker_id), payload, px=int(ttl * 1000))
        pipe.hset(self.keys.workers, worker_id, payload)
        pipe.execute()

    def unregister(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.heartbeat(worker_id))
        pipe.hdel(self.keys.workers, worker_id)
        pipe.execute()

    def recover(self, worker_id: str, *, only_if_expired: bool, count_attempt: bool) -> int:
        """Requeue a dead worker's messages; -1 if its heartbeat says it is alive."""
        k = self.keys
        return int(self._recover(
            keys=[k.processing(worker_id), k.queue, k.attempts, k.heartbeat(worker_id),
                  k.workers],
            args=[worker_id, "1" if only_if_expired else "0", "1" if count_attempt else "0"]))

    def registered_workers(self) -> dict[str, dict]:
        """Worker id -> its last heartbeat's info, every host's."""
        return _registry(self.client.hgetall(self.keys.workers))

    def orphan_processing_lists(self) -> list[str]:
        """Worker ids with a processing list but no registry entry (start-up only: SCAN)."""
        registered = set(self.registered_workers())
        found = []
        for key in self.client.scan_iter(match=self.keys.processing_pattern, count=500):
            wid = self.keys.worker_id_of(key.decode())
            if wid not in registered:
                found.append(wid)
        return found

    def replay_dead(self, entry: bytes, message: bytes, job_id: str = "") -> bool:
        """Put a dead letter's message back on the queue, once (a ``queued`` event)."""
        k = self.keys
        job_id = job_id or job_id_of(message, self.config.job.max_message_bytes)
        return bool(self._replay(keys=[k.dead, k.queue, k.attempts, k.events],
                                 args=[entry, message, job_id, now_iso(),
                                       _json({"replayed": True}), self.events_max]))

    # --- producing and operating ----------------------------------------------------------

    def enqueue(self, message: bytes, job_id: str | None = None,
                event: dict | None = None) -> str | None:
        """LPUSH a message as a producer does. With ``job_id``, its hash says "queued" from
        this moment, so a watcher never mistakes an earlier run's "done" for this one, and a
        ``queued`` event (``event``, a small JSON object) is appended to the stream in the
        same step: its entry id is returned, the place to follow the job from."""
        if job_id is None:
            self.client.lpush(self.keys.queue, message)
            return None
        return self.enqueue_many([(message, job_id, event or {})])[0]

    def enqueue_many(self, jobs: list[tuple[bytes, str, dict]]) -> list[str]:
        """``enqueue`` several (message, job id, event) in one round trip (MULTI), in order;
        returns the entry id of each one's ``queued`` event. A multi-clip job's event names
        its clip ids (``clips``): they go into its hash as well."""
        ttl = int(self.config.job.job_ttl)
        pipe = self.client.pipeline(transaction=True)
        for message, job_id, event in jobs:
            key = self.keys.job(job_id)
            # A new submission: neither an earlier one's cancel nor its completion counts.
            # (and what a multi-clip job's clips did then: see worker.scripts, START)
            pipe.hdel(key, "cancel", "completed", "clips_done", "clips_dead")
            pipe.delete(self.keys.clips(job_id))
            fields = {"state": JobState.QUEUED, "progress": 0, "stage": "",
                      "queued": now_iso(), "error": "", "reason": ""}
            if event.get("clips"):  # a multi-clip job's clip ids, for a handle on its id
                fields["clips"] = json.dumps(event["clips"])
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl)
            pipe.lpush(self.keys.queue, message)
            self._add_event(pipe, EventType.QUEUED, job_id, _json(event))
        replies = pipe.execute()
        return [_str(entry_id) for entry_id in replies[5::6]]

    # --- cancelling -------------------------------------------------------------------------

    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job: a queued one (the queue, the retries due or delayed) is taken out
        and dead-lettered with reason ``cancelled`` now; a running one is marked and its
        worker told at once (pub/sub), and it aborts its job and dead-letters it the same
        way; a job that has ended (done, dead) is left alone.

        The mark comes first: a message this scan does not find because a worker took it
        meanwhile is refused by START; a running job's worker also finds the mark when it
        (re)subscribes. Queued messages are found by their job id (``job_id_of``, as the
        worker names them), reading the lists in chunks in Python; no script decodes a
        message."""
        k = self.keys
        before = _str(self._mark_cancel(keys=[k.job(job_id)],
                                        args=[now_iso(), CANCEL_MARK_TTL]))
        if before in (JobState.DONE, JobState.DEAD):
            return CancelOutcome(False, before)
        self.client.publish(k.cancels, job_id)
        removed = 0
        # Delayed first, then the retries, then the queue: a retry promoted in the middle
        # of the scan moves to a list read later.
        for key, kind in ((k.delayed, "zset"), (k.retry, "list"), (k.queue, "list")):
            for entry, message in self._queued_messages(key, kind, job_id):
                removed += self._cancel_queued(key, kind, entry, message, job_id)
        if removed:
            return CancelOutcome(True, JobState.QUEUED, removed=removed)
        return CancelOutcome(bool(before), before or "")

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel marks this job (see ``cancel``)."""
        return bool(self.client.hexists(self.keys.job(job_id), "cancel"))

    def _queued_messages(self, key: str, kind: str, job_id: str,
                         ) -> Iterator[tuple[bytes, bytes]]:
        """(entry, message) of each message of ``job_id`` in a list or the delayed zset."""
        wanted = job_id.encode()
        by_digest = len(job_id) == 40 and all(c in "0123456789abcdef" for c in job_id)
        max_bytes = self.config.job.max_message_bytes

        def ours(message: bytes) -> bool:
            # Cheap tests first: the id in its bytes (or escaped), or the SHA-1 it is.
            if wanted not in message and b"\\u" not in message and not (
                    by_digest and hashlib.sha1(message).hexdigest() == job_id):
                return False
            return job_id_of(message, max_bytes) == job_id

        if kind == "zset":
            for member, _ in self.client.zscan_iter(key, count=CANCEL_SCAN_CHUNK):
                message = member.partition(b"\n")[2]
                if ours(message):
                    yield member, message
            return
        start = 0
        while True:
            chunk = self.client.lrange(key, start, start + CANCEL_SCAN_CHUNK - 1)
            for entry in chunk:
                if ours(entry):
                    yield entry, entry
            if len(chunk) < CANCEL_SCAN_CHUNK:
                return
            start += CANCEL_SCAN_CHUNK - 1  # one of overlap: a removal shifts entries left

    def _cancel_queued(self, key: str, kind: str, entry: bytes, message: bytes,
                       job_id: str) -> int:
        k = self.keys
        now = now_iso()
        error = "cancelled while queued"
        parsed = intake(message, self.config)
        clips = parsed.clips if isinstance(parsed, Job) else ()
        letters = []  # (the id it names, the letter): each clip's, or the message's
        for clip in clips or (None,):
            letter = dead_letter(message if clip is None else clip.raw,
                                 job_id if clip is None else clip.id, "cancelled", error, 0,
                                 now, self.config.job.dead_message_bytes)
            letter.pop("attempts")
            if clip is not None:
                letter["job"] = job_id
            letters.append((letter["id"], letter))
        fields = {"stage": "dead", "reason": "cancelled", "error": error,
                  "finished": now, "progress": 0, "message_sha1": sha1(message)}
        return int(self._cancel(
            keys=[key, k.job(job_id), k.dead, k.attempts, k.events],
            args=[kind, entry, sha1(message), int(self.config.job.job_ttl), now,
                  _callback_of(message), self.config.job.dead_max, self.events_max,
                  len(letters),
                  *(part for name, letter in letters for part in (
                      name, _letter_json(letter), _letter_json(_unsent(letter)),
                      str(letter.get("job", "")))),
                  *_pairs(fields)]))

    def watch_cancels(self, current: Callable[[], str | None],
                      on_cancel: Callable[[str], None], stop: threading.Event) -> None:
        """Until ``stop`` is set, call ``on_cancel(job_id)`` whenever a cancel names the job
        ``current()`` returns (a worker's listening thread). Subscribed to the cancel
        channel on a connection of its own; after each (re)subscription it also looks at
        the current job's mark, so a cancel published while it was cut off is not lost.
        Redis errors are retried with backoff, never raised."""
        delay = 0.1
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub()
                pubsub.subscribe(self.keys.cancels)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=CANCEL_LISTEN_TICK)
                    if message is None:
                        continue
                    job_id = current()
                    if message["type"] == "subscribe":
                        delay = 0.1
                        if job_id and self.cancel_requested(job_id):
                            on_cancel(job_id)
                    elif message["type"] == "message" and job_id \
                            and _str(message["data"]) == job_id:
                        on_cancel(job_id)
            except (*ANY_REDIS_ERROR, OSError):
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def purge_dead(self) -> int:
        """Delete every dead letter; returns how many there were."""
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.dead)
        pipe.delete(self.keys.dead)
        return int(pipe.execute()[0])

    def clear(self) -> None:
        """Empty the queue, retries, events, dead letters and attempt counts of this prefix
        (the demo's fresh start; job hashes expire by themselves)."""
        k = self.keys
        self.client.delete(k.queue, k.retry, k.delayed, k.done, k.dead, k.attempts, k.events,
                           k.webhook_failures, k.webhook_failure_counts)

    # --- reading ----------------------------------------------------------------------------

    def ping(self) -> bool:
        return bool(self.client.ping())

    def overview(self) -> tuple[dict[str, int], dict[str, dict]]:
        """The length of each list (``LISTS``) and the registry, in one round trip."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(k.queue)
        pipe.llen(k.retry)
        pipe.zcard(k.delayed)
        pipe.llen(k.dead)
        pipe.llen(k.done)
        pipe.hgetall(k.workers)
        *lengths, registry = pipe.execute()
        return dict(zip(LISTS, lengths, strict=True)), _registry(registry)

    def activity(self, workers: dict[str, str | None]) -> dict[str, Activity]:
        """For each worker id (with the job its heartbeat names, or None): is its heartbeat
        alive, how many messages it holds, and its job's stage and progress."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        for worker_id, job_id in workers.items():
            pipe.pttl(k.heartbeat(worker_id))
            pipe.llen(k.processing(worker_id))
            if job_id:
                pipe.hmget(k.job(job_id), "stage", "progress")
        replies = iter(pipe.execute())
        result = {}
        for worker_id, job_id in workers.items():
            ttl, holding = next(replies), next(replies)
            stage = progress = None
            if job_id:
                stage_raw, progress_raw = next(replies)
                stage = stage_raw.decode() if stage_raw is not None else None
                progress = float(progress_raw) if progress_raw is not None else None
            result[worker_id] = Activity(ttl is not None and ttl > 0, int(holding), stage,
                                         progress)
        return result

    def heartbeats_alive(self, worker_ids: list[str]) -> dict[str, bool]:
        """Whether each worker's heartbeat key still exists (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.exists(self.keys.heartbeat(worker_id))
        return {wid: bool(alive) for wid, alive in zip(worker_ids, pipe.execute(), strict=True)}

    def job_fields(self, job_id: str, *names: str) -> dict[str, str]:
        """Some fields of a job's hash, decoded; a missing field reads as ""."""
        values = self.client.hmget(self.keys.job(job_id), *names)
        return {name: value.decode("utf-8", "replace") if value is not None else ""
                for name, value in zip(names, values, strict=True)}

    def job(self, job_id: str) -> JobHash:
        """A job's whole hash, its time to live, and its message's attempt count."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(k.job(job_id))
        pipe.ttl(k.job(job_id))
        raw, ttl = pipe.execute()
        digest = raw.get(b"message_sha1")
        attempts = self.client.hget(k.attempts, digest) if digest else None
        fields = {key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
                  for key, value in raw.items()}
        return JobHash(fields, ttl if ttl and ttl > 0 else None,
                       int(attempts) if attempts is not None else None)

    # --- the event stream ---------------------------------------------------------------------

    @property
    def events_key(self) -> str:
        """The stream every job's state changes are appended to: ``{prefix}:events``."""
        return self.keys.events

    @property
    def events_max(self) -> int:
        """Its approximate length cap (XADD MAXLEN ~): ``[job] events_max``."""
        return self.config.job.events_max

    def events_ensure_group(self, group: str, start_id: str = "$") -> bool:
        """Make sure consumer group ``group`` exists on the stream (made with the stream if
        there is none yet), first reading after ``start_id`` ("$": only entries added from
        now, "0": everything the stream holds). True when it was made now, False when it
        existed (its position is then left as it is)."""
        try:
            self.client.xgroup_create(self.keys.events, group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    def events_read_group(self, group: str, consumer: str, count: int = 100,
                          block_ms: int = 0, pending_after: str | None = None,
                          ) -> list[StreamEntry]:
        """Entries never delivered to ``group`` before, now delivered to ``consumer`` (and
        pending for it until ``events_ack``): at most ``count``, oldest first. With
        ``block_ms`` > 0 it waits up to that long for one when there is none (capped below
        the client's socket timeout); 0 answers at once. With ``pending_after``, instead,
        the entries delivered to this consumer before and not acknowledged, after that id
        ("0": from the first; a restarted consumer's first reads). A group that does not
        exist (the stream was deleted with it) is made again, reading from the start, and
        this call answers []."""
        block = None if pending_after else self._block_ms(block_ms)
        try:
            reply = self.client.xreadgroup(group, consumer,
                                           {self.keys.events: pending_after or ">"},
                                           count=count, block=block)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.events_ensure_group(group, "0")
            return []
        return _read_entries(reply)

    def events_pending(self, group: str, consumer: str, after: str = "0",
                       count: int = 100) -> list[StreamEntry]:
        """Entries delivered to ``consumer`` of ``group`` before and not acknowledged, after
        ``after`` ("0": from the first), oldest first: what a restarted consumer handles
        again before it reads new ones."""
        return self.events_read_group(group, consumer, count, pending_after=after or "0")

    def events_ack(self, group: str, *entry_ids: str) -> int:
        """Acknowledge entries of ``group`` (XACK): they leave its pending list. Returns how
        many were pending."""
        if not entry_ids:
            return 0
        return int(self.client.xack(self.keys.events, group, *entry_ids))

    def events_claim_stale(self, group: str, consumer: str, min_idle_ms: int,
                           count: int = 100) -> list[StreamEntry]:
        """Entries delivered to a consumer of ``group`` that has not acknowledged them for
        ``min_idle_ms`` (it died, or hangs), now delivered to ``consumer`` instead
        (XAUTOCLAIM, Redis >= 6.2): at most ``count``, oldest first. Entries the length cap
        trimmed away meanwhile are dropped from the pending list by Redis, not returned."""
        found: list[StreamEntry] = []
        cursor: Any = "0-0"
        try:
            while len(found) < count:
                reply = self.client.xautoclaim(self.keys.events, group, consumer,
                                               min_idle_ms, start_id=cursor,
                                               count=count - len(found))
                cursor = reply[0]
                found += _stream_entries(reply[1])
                if _str(cursor) == "0-0":
                    break
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.events_ensure_group(group, "0")
        return found

    def events_read(self, after: str, count: int = 100, block_ms: int = 0,
                    ) -> list[StreamEntry]:
        """Entries after ``after`` (an entry id; "$": from now), without a group (XREAD):
        at most ``count``, oldest first, waiting up to ``block_ms`` (0: not at all)."""
        block = self._block_ms(block_ms)
        return _read_entries(self.client.xread({self.keys.events: after}, count=count,
                                               block=block))

    def events_last_id(self) -> str:
        """The id of the newest entry ("0-0": the stream is empty or does not exist)."""
        newest = self.client.xrevrange(self.keys.events, count=1)
        return _str(newest[0][0]) if newest else "0-0"

    def events_before(self, before: str, count: int) -> list[StreamEntry]:
        """Up to ``count`` entries older than ``before`` ("+": the newest), newest first."""
        if before != "+":
            before = "(" + before
        return _stream_entries(self.client.xrevrange(self.keys.events, max=before,
                                                     count=count))

    def _block_ms(self, block_ms: int) -> int | None:
        """A BLOCK argument that ends before the client's socket timeout does (None: do not
        block: BLOCK 0 would wait for ever)."""
        if block_ms <= 0:
            return None
        pool = getattr(self.client, "connection_pool", None)
        timeout = (getattr(pool, "connection_kwargs", None) or {}).get(
            "socket_timeout", self.config.redis.socket_timeout)
        if timeout:
            block_ms = min(block_ms, max(1, int(timeout * 800)))
        return int(block_ms)

    def entries(self, which: str, start: int, stop: int) -> list[bytes]:
        """Entries ``start`` to ``stop`` (inclusive, -1 = the last) of the completion events
        (``which`` = "done") or the dead letters ("dead"), newest first."""
        if which not in ("done", "dead"):
            raise ValueError(f"no list of entries named {which!r}")
        return self.client.lrange(getattr(self.keys, which), start, stop)

    # --- webhook deliveries given up (supervisor.webhooks; stats and the dashboard read) ------

    # Records kept: enough to see what went wrong lately; the counts keep the whole tally.
    WEBHOOK_FAILURES_KEPT = 1000

    def webhook_failed(self, outcome: str, record: dict[str, Any]) -> None:
        """Record one webhook delivery given up: ``record`` (a small JSON object) stamped
        with ``outcome`` and the time, at the head of the capped list, and one more under
        ``outcome`` in the counts, in one MULTI. The caller keeps secrets out of it."""
        k = self.keys
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(k.webhook_failures, _letter_json({**record, "outcome": outcome,
                                                     "time": now_iso()}))
        pipe.ltrim(k.webhook_failures, 0, self.WEBHOOK_FAILURES_KEPT - 1)
        pipe.hincrby(k.webhook_failure_counts, outcome, 1)
        pipe.execute()

    def webhook_failures(self, limit: int) -> tuple[dict[str, int], list[bytes]]:
        """(deliveries given up so far by outcome, the newest ``limit`` records as stored,
        newest first), in one round trip."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(k.webhook_failure_counts)
        pipe.lrange(k.webhook_failures, 0, max(1, limit) - 1)
        counts, records = pipe.execute()
        return {_str(outcome): int(n) for outcome, n in counts.items()}, records


LISTS = ("queue", "retry", "delayed", "dead", "done")  # the lists overview() measures

CANCELLED = -1  # what ``start`` answers for a job cancelled before it started
CANCEL_MARK_TTL = 60  # s: a cancel mark made on a job without a hash (a message pushed bare)
CANCEL_SCAN_CHUNK = 500  # entries per LRANGE/ZSCAN while looking for a queued job
CANCEL_LISTEN_TICK = 1.0  # s: how often a worker's cancel listener looks at its stop flag


@dataclass(frozen=True)
class CancelOutcome:
    """What ``JobQueue.cancel`` did. ``cancelled``: the job was queued and is now a dead
    letter (``removed`` messages), or it is running (or between two places) and will end
    as one; False: it had ended (``state`` done or dead) or is unknown (``state`` "")."""

    cancelled: bool
    state: str  # the job's state when the cancel came
    removed: int = 0  # queued messages dead-lettered now

    @property
    def running(self) -> bool:
        """The job was not found queued: its worker aborts it (or START refuses it)."""
        return self.cancelled and not self.removed

StreamEntry = tuple[str, dict[str, str]]  # (entry id, fields), decoded


def _stream_entries(entries: Any) -> list[StreamEntry]:
    """Entries of XRANGE, XREVRANGE or XAUTOCLAIM, decoded; an entry trimmed away meanwhile
    (no fields) is left out."""
    return [(_str(entry_id), {_str(k): _str(v) for k, v in fields.items()})
            for entry_id, fields in entries or [] if fields]


def _read_entries(reply: Any) -> list[StreamEntry]:
    """The entries of an XREAD or XREADGROUP reply of our one stream, decoded."""
    if isinstance(reply, dict):  # RESP3
        return [entry for entries in reply.values() for entry in _stream_entries(entries[0])]
    return [entry for _, entries in reply or [] for entry in _stream_entries(entries)]


def _json(body: dict) -> bytes:
    return _letter_json(body)


def _unsent(letter: dict) -> dict:
    """A dead letter without its message (``message``, ``message_b64``, ...): what the event
    stream carries of it."""
    return {key: value for key, value in letter.items() if not key.startswith("message")}


def _callback_of(message: bytes) -> str:
    """The ``callback`` a JSON message names, as given ("" when none)."""
    try:
        body = json.loads(message)
    except (ValueError, RecursionError):
        return ""
    value = body.get("callback") if isinstance(body, dict) else None
    return value if isinstance(value, str) else ""


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Activity:
    alive: bool  # its heartbeat key has not expired
    holding: int  # messages in its processing list
    job_stage: str | None  # its job's stage and progress, from the job's hash
    job_progress: float | None


@dataclass(frozen=True)
class JobHash:
    fields: dict[str, str]  # empty when the hash does not exist (never made, or expired)
    ttl: int | None  # seconds it still lives
    attempts: int | None  # failed attempts counted under its message's SHA-1


class HostClaims:
    """The Redis side of supervisor.recovery's host claim: one supervisor per host_id."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._claim = client.register_script(scripts.CLAIM_HOST)
        self._unclaim = client.register_script(scripts.UNCLAIM_HOST)

    def claim(self, host_id: str, token: str, ttl: float, replace: str,
              holder: dict[str, str | int | float]) -> int:
        """Hold or refresh the claim: 1 refreshed, 2 taken (free, or ``replace`` held it),
        0 held by another token."""
        return int(self._claim(keys=[self.keys.host(host_id)],
                               args=[token, max(1, int(ttl * 1000)), replace,
                                     *_pairs(holder)]))

    def holder(self, host_id: str) -> dict[str, str]:
        """The claim's fields, decoded (empty: nobody holds it)."""
        return {key.decode(errors="replace"): value.decode(errors="replace")
                for key, value in self.client.hgetall(self.keys.host(host_id)).items()}

    def release(self, host_id: str, token: str) -> bool:
        """Give up the claim if ``token`` holds it."""
        return bool(self._unclaim(keys=[self.keys.host(host_id)], args=[token]))


def answers(url: str, timeout: float = 1.0) -> bool:
    """Does a Redis server answer PING at ``url``?"""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout,
                                      socket_connect_timeout=timeout)
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _registry(entries: dict[bytes, bytes]) -> dict[str, dict]:
    result = {}
    for wid, payload in entries.items():
        try:
            info = json.loads(payload)
        except ValueError:
            info = {}
        result[wid.decode()] = info if isinstance(info, dict) else {}
    return result


def sha1(message: bytes) -> str:
    """The key a message's attempts are counted under (``redis.sha1hex`` in the scripts)."""
    return hashlib.sha1(message).hexdigest()


def _letter_json(letter: dict) -> bytes:
    # UTF-8 as is (a message's text stays one byte a character where it was); a lone
    # surrogate in an error text becomes its escape instead of failing the dead letter.
    return json.dumps(letter, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _text(value: str | int | float) -> bytes:
    # Any str becomes bytes, a lone surrogate included (redis-py would raise on it).
    return str(value).encode("utf-8", "backslashreplace")


def _safe(fields: dict[str, str | int | float]) -> dict[str, bytes]:
    return {key: _text(value) for key, value in fields.items()}


def _pairs(fields: dict[str, str | int | float]) -> list[str | bytes]:
    # The field names are the daemon's own ASCII literals: only the values need _text.
    return [item for key, value in fields.items() for item in (key, _text(value))]
