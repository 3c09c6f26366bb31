"""The Redis side of a job's life: fetch, record, ack, retry, dead-letter, recover.

One object per process wraps a redis-py client, our key names and the Lua scripts of
``worker.scripts``. The supervisor uses the same object for recovery and the CLI for
inspection, so every writer of a key goes through this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from . import scripts
from .config import Config
from .keys import Keys

# Errors that mean "Redis is not serving us right now" (down, restarting, failing over,
# loading, out of memory): retried with backoff, never fatal. BusyLoadingError is a
# ConnectionError already.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError,
                redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)
# Error replies of the same nature that redis-py reports as a plain ResponseError.
TRANSIENT_REPLIES = ("UNBLOCKED", "MASTERDOWN", "LOADING", "TRYAGAIN", "CLUSTERDOWN")
# The same inside a script's error ("ERR Error running script ... OOM command not allowed").
_TRANSIENT_IN_SCRIPT = ("OOM command not allowed", "READONLY", "You can't write against a "
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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Fetched:
    message: bytes
    source: str  # "queue" or "retry"


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
        self._has_blmove: bool | None = None

    # --- fetching -------------------------------------------------------------------------

    def fetch_nowait(self, worker_id: str) -> Fetched | float:
        """The next message, or the seconds until a delayed retry is due (inf: none)."""
        k = self.keys
        found, *rest = self._fetch(keys=[k.queue, k.retry, k.delayed, k.processing(worker_id)],
                                   args=[100])
        if found == 1:
            return Fetched(rest[0], rest[1].decode())
        return math.inf if rest[0] < 0 else rest[0] / 1000.0

    def blocking_command(self, worker_id: str, timeout: float) -> list:
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

    def blocking_connection(self) -> tuple[Any, Any]:
        """(pool, connection) for a blocking command on the node that holds our keys.

        The worker sends BLMOVE on a connection of its own so that a signal can shut its
        socket down (worker.wake); it gives the pair back with ``release_blocking``.
        """
        client = self.client
        if isinstance(client, RedisCluster):
            client = client.get_redis_connection(client.get_node_from_key(self.keys.queue))
        pool = client.connection_pool
        return pool, pool.get_connection()

    def topology_changed(self) -> None:
        """After MOVED or a dead node: let a cluster client learn the new slot owners."""
        if isinstance(self.client, RedisCluster):
            self.client.nodes_manager.initialize()

    def release(self, worker_id: str) -> int:
        """Give back whatever this worker holds, to the front of the queue, uncounted."""
        return int(self._release(keys=[self.keys.processing(worker_id), self.keys.queue]))

    # --- recording --------------------------------------------------------------------------

    def start(self, job_id: str, message_sha1: str,
               fields: dict[str, str | int | float]) -> int:
        """Mark a job running; return the attempts its message already used."""
        return int(self._start(
            keys=[self.keys.job(job_id), self.keys.attempts],
            args=[message_sha1, int(self.config.job.job_ttl), *_pairs(fields)]))

    def update(self, job_id: str, fields: dict[str, str | int | float]) -> None:
        self.client.hset(self.keys.job(job_id), mapping=_safe(fields))

    def done(self, worker_id: str, message: bytes, job_id: str, event: dict,
             fields: dict[str, str | int | float], take_next: bool = False,
             token: str = "") -> tuple[bool, bytes | None]:
        """Ack a finished job: (acked, next message). ``acked`` is False when the message
        was no longer in this worker's processing list (recovered and requeued while this
        worker was taken for dead): then nothing was recorded, and the requeued copy
        decides. With ``take_next``, the next queued message (or None) is already in this
        worker's processing list when this returns. ``token`` names this ack: a call made
        again with the same token after a lost reply answers as the first run did."""
        k = self.keys
        reply = self._done(
            keys=[k.processing(worker_id), k.job(job_id), k.done, k.attempts, k.queue],
            args=[message, sha1(message), json.dumps(event), int(self.config.job.job_ttl),
                  self.config.job.done_max, "1" if take_next else "0",
                  token or uuid.uuid4().hex,
                  *_pairs(fields)])
        return bool(reply[0]), (reply[1] if len(reply) > 1 else None)

    def dead(self, worker_id: str, message: bytes, job_id: str, letter: dict,
             fields: dict[str, str | int | float]) -> int:
        """Dead-letter the message; 0 when it was no longer ours (fenced)."""
        k = self.keys
        return int(self._dead(
            keys=[k.processing(worker_id), k.job(job_id), k.dead, k.attempts],
            args=[message, sha1(message), _letter_json(letter),
                  int(self.config.job.job_ttl), self.config.job.dead_max, *_pairs(fields)]))

    def retry(self, worker_id: str, message: bytes, job_id: str, letter: dict,
              fields: dict[str, str | int | float]) -> tuple[int, float | None]:
        """Count a failed attempt; delay the message, or dead-letter it at max_attempts.

        Returns (attempts, seconds until the retry is due, or None when dead-lettered);
        attempts is -1 when the message was no longer ours (fenced).
        """
        k = self.keys
        cfg = self.config.job
        attempts, delay = self._retry(
            keys=[k.processing(worker_id), k.delayed, k.attempts, k.job(job_id), k.dead],
            args=[message, sha1(message), cfg.max_attempts, int(cfg.retry_backoff * 1000),
                  int(cfg.retry_backoff_max * 1000), uuid.uuid4().hex,
                  _letter_json({key: value for key, value in letter.items()
                                if key != "attempts"}),
                  int(cfg.job_ttl), cfg.dead_max, *_pairs(fields)])
        return int(attempts), (None if delay < 0 else delay / 1000.0)

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
        entries = self.client.hgetall(self.keys.workers)
        result = {}
        for wid, payload in entries.items():
            try:
                result[wid.decode()] = json.loads(payload)
            except ValueError:
                result[wid.decode()] = {}
        return result

    def orphan_processing_lists(self) -> list[str]:
        """Worker ids with a processing list but no registry entry (start-up only: SCAN)."""
        registered = set(self.registered_workers())
        found = []
        for key in self.client.scan_iter(match=self.keys.processing_pattern, count=500):
            wid = self.keys.worker_id_of(key.decode())
            if wid not in registered:
                found.append(wid)
        return found

    def replay_dead(self, entry: bytes, message: bytes) -> bool:
        k = self.keys
        return bool(self._replay(keys=[k.dead, k.queue, k.attempts], args=[entry, message]))


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


def _pairs(fields: dict[str, str | int | float]) -> list[bytes]:
    flat: list[bytes] = []
    for key, value in fields.items():
        flat += [_text(key), _text(value)]
    return flat
