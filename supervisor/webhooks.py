"""Signed webhooks: each finished job's outcome POSTed to its callback, at least once.

The outbox is Redis, not memory: the event stream (``{prefix}:events``) read through a
consumer group of its own, ``webhooks``. An entry is read with XREADGROUP, which makes it
pending under this host's consumer name (its host_id), and acknowledged (XACK) only once
its receiver answered 2xx, or it was given up. So a deliverer killed mid-call (SIGKILL, an
out-of-memory kill, a power cut) leaves the entry pending: the next start on this host reads
its own pending entries first, and another host takes over those of a consumer silent for
long (XAUTOCLAIM). A receiver may therefore see one event more than once: the
``X-Clip-Event-Id`` header (the stream entry's id) is the same every time, for it to drop
repeats.

Only ``done``, ``dead`` and ``cancelled`` entries are delivered, to the job's ``callback``
or else ``[notify] url``; every other entry is acknowledged at once. A failed call (no
answer within ``[notify] timeout``, or not 2xx) is retried after a delay that grows with
the event's age, 1 s doubling to 10 min, until the event is ``[notify] max_age`` old; then
it is given up: logged, counted in ``clip_webhook_deliveries_total``, and recorded in Redis
(``JobQueue.webhook_failed``: the receiver's origin only, never its path or query) for
``clip-supervisor stats`` and the dashboard. Calls go through the address guard exactly as
sources do (worker.source: every address the name resolves to must be public unless
``[job] allow_private_networks``, and the connection goes to the very address checked), and
redirects are never followed: a webhook's body is signed for its receiver, and following a
3xx would hand it to another.

The deliverer runs in a child process of the master (``DelivererProcess``), so neither the
master's loop nor a worker ever waits on a receiver, and no thread of it is alive in the
master when the master forks a worker. It dies with the master (a parent-death signal).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis
import setproctitle
from prometheus_client import Counter, Gauge

from worker import logs, promsafe
from worker.config import Config
from worker.errors import Permanent, Transient
from worker.media import set_parent_death_signal
from worker.queue import REDIS_ERRORS, JobQueue, connect
from worker.source import USER_AGENT, PinnedConnection, PinnedHTTPSConnection, resolve

from .children import Exit
from .metrics import worker_exited as metrics_process_gone

log = logging.getLogger("clip-supervisor.webhooks")
promsafe.install()  # before our metrics exist: no SIGBUS on a full file system

GROUP = "webhooks"  # the consumer group of the event stream that is the outbox
DELIVERED_TYPES = ("done", "dead", "cancelled")
FIRST_DELAY = 1.0  # seconds before the first retry; the delay doubles with the event's age
MAX_DELAY = 600.0  # ... up to this
BATCH = 100  # entries asked for at once
MAX_HELD = 1000  # entries held (read, not yet acknowledged) before no more are read
REFRESH = 60.0  # seconds between two reads of our own pending entries
RESPONSE_BYTES = 64 * 1024  # what is read of a receiver's answer (and then dropped)
MALFORMED = "(a malformed URL)"  # what logs and records say of a URL urlsplit refuses
ERROR_KEPT = 300  # characters of a give-up's error recorded in Redis (the tail)

DELIVERIES = Counter("clip_webhook_deliveries_total", "Webhook calls by outcome: delivered "
                     "(2xx), failed (an attempt that will be retried), gave_up (still failing "
                     "after [notify] max_age), refused (a private address, a redirect, a URL "
                     "the guard refuses: never retried).", ["outcome"])
HELD = Gauge("clip_webhook_pending", "Webhook events read and not yet delivered or given up "
             "(waiting for a retry or in flight).", multiprocess_mode="livesum")


class Outcome(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    GAVE_UP = "gave_up"
    REFUSED = "refused"


class Refused(Exception):
    """This call must not be made at all, now or later (the guard, a redirect)."""


class CallFailed(Exception):
    """This call failed; a later one may not."""


class EventQueue(Protocol):
    """What the deliverer needs of worker.queue.JobQueue (a fake one in unit tests)."""

    def events_ensure_group(self, group: str, start_id: str = "$") -> Any: ...

    def events_read_group(self, group: str, consumer: str, count: int = 100,
                          block_ms: int = 0) -> list[tuple[Any, Any]]: ...

    def events_pending(self, group: str, consumer: str, after: str = "0",
                       count: int = 100) -> list[tuple[Any, Any]]: ...

    def events_ack(self, group: str, *ids: str) -> int: ...

    def events_claim_stale(self, group: str, consumer: str, min_idle_ms: int,
                           count: int) -> list[tuple[Any, Any]]: ...

    def webhook_failed(self, outcome: str, record: dict[str, Any]) -> None: ...


# --- signing and calling ----------------------------------------------------------------------


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``: the time is signed with the
    body, so a receiver that refuses old times (say 5 minutes) cannot be replayed to."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def check_target(url: str, allow_private: bool) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a webhook URL, or Refused: http(s) only, and plain http
    only where private networks are allowed (as a job's callback at intake)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise Refused("not an http(s) URL with a host")
    if scheme == "http" and not allow_private:
        raise Refused("plain http is refused unless [job] allow_private_networks")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path


def post(url: str, body: bytes, headers: dict[str, str], timeout: float,
         allow_private: bool) -> int:
    """POST ``body`` to ``url`` through the address guard, within ``timeout`` seconds in all
    (but the name lookup, which nothing can interrupt); return the status. A redirect is
    an answer like any other: it is not followed."""
    scheme, host, port, path = check_target(url, allow_private)
    try:
        address = resolve(host, port, allow_private)
    except Permanent as exc:
        raise Refused(exc.error) from None
    except Transient as exc:
        raise CallFailed(exc.error) from None
    cls = PinnedHTTPSConnection if scheme == "https" else PinnedConnection
    conn = cls(host, port, address, timeout)
    timer: threading.Timer | None = None
    try:
        conn.connect()
        # The socket's timeout bounds each read; this bounds the whole exchange (a receiver
        # that sends its answer a byte at a time).
        timer = threading.Timer(timeout, _shut, args=(conn.live_sock,))
        timer.daemon = True
        timer.start()
        conn.request("POST", path, body=body, headers={
            "User-Agent": USER_AGENT, "Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        resp.read(RESPONSE_BYTES)
        return resp.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise CallFailed(f"{type(exc).__name__}: {exc}" if str(exc) else
                         type(exc).__name__) from None
    finally:
        if timer is not None:
            timer.cancel()
        conn.close()
        if conn.live_sock is not None:
            conn.live_sock.close()


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def retry_delay(age: float) -> float:
    """Seconds before the next call of an event ``age`` seconds old whose call just failed.
    Waiting as long as the event is old doubles the delay at every failure (1, 1, 2, 4,
    ... s) with no count to keep: a deliverer that restarts picks the schedule up from the
    event's age alone."""
    return min(MAX_DELAY, max(FIRST_DELAY, age))


# --- the deliverer ----------------------------------------------------------------------------


@dataclass
class Delivery:
    entry_id: str
    job_id: str
    type: str
    url: str
    body: bytes
    born: float  # unix time of the event (its stream id's milliseconds)
    due: float = 0.0  # unix time of the next call
    attempts: int = 0
    error: str = ""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def entry_time(entry_id: str) -> float:
    """A stream entry's time: the milliseconds its id begins with (Redis's clock)."""
    return int(entry_id.partition("-")[0]) / 1000.0


def build(entry_id: str, fields: dict[Any, Any] | None, default_url: str) -> Delivery | None:
    """The delivery an event stream entry asks for, or None (not a final state, no URL,
    an entry trimmed from the stream meanwhile)."""
    if not fields:
        return None
    values = {_text(k): _text(v) for k, v in fields.items()}
    kind = values.get("type", "")
    url = values.get("callback") or default_url
    if kind not in DELIVERED_TYPES or not url:
        return None
    try:
        event = json.loads(values.get("event") or "{}")
    except ValueError:
        event = values.get("event")
    payload = {"id": entry_id, "type": kind, "job_id": values.get("id", ""),
               "time": values.get("time", ""), "event": event}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return Delivery(entry_id, payload["job_id"], kind, url, body, entry_time(entry_id))


@dataclass
class Deliverer:
    """Reads the outbox, calls receivers from a pool of ``[notify] concurrency`` threads,
    and acknowledges. Only this loop (one thread) speaks to Redis."""

    queue: EventQueue
    config: Config
    consumer: str
    call: Callable[..., int] = post
    clock: Callable[[], float] = time.time
    held: dict[str, Delivery] = field(default_factory=dict)
    stopping: bool = False

    def __post_init__(self) -> None:
        notify = self.config.notify
        self.pool = ThreadPoolExecutor(notify.concurrency, thread_name_prefix="webhook")
        self.in_flight: dict[Future[Any], Delivery] = {}
        self.to_ack: list[str] = []
        self._next_refresh = 0.0
        self._next_claim = 0.0
        # Another host's pending entries are taken once idle this long: well past what a
        # live deliverer lets pass between two reads of its own (REFRESH) or in one call.
        self.claim_idle = max(5 * REFRESH, 10 * notify.timeout)
        self._group_ready = False

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Deliver until ``stopping``; then give calls in flight ``timeout`` to finish."""
        failing = 0.0
        while not self.stopping:
            try:
                self.turn()
                if failing:
                    log.info("Redis is reachable again")
                failing = 0.0
            except (*REDIS_ERRORS, redis.RedisError) as exc:
                if not failing:
                    log.warning("Redis unavailable (%s); webhooks wait for it", exc)
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    self._group_ready = False  # the stream was deleted: make it again
                failing = min(max(failing * 2, 0.2), 5.0)
                self._pause(failing)
        self.drain()

    def turn(self, block_ms: int = 1000) -> None:
        """One step: acknowledge what is settled, call what is due, read what is new."""
        if not self._group_ready:
            # From the stream's start: entries written before this group existed are
            # delivered too (the give-up age still applies).
            self.queue.events_ensure_group(GROUP, start_id="0")
            self._group_ready = True
        self.settle()
        now = self.clock()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH
            self.read_own()
        if now >= self._next_claim:
            self._next_claim = now + REFRESH
            self.take(self.queue.events_claim_stale(GROUP, self.consumer,
                                                    int(self.claim_idle * 1000), BATCH))
        self.dispatch()
        if len(self.held) >= MAX_HELD:
            self._wait_calls(block_ms / 1000.0)
            return
        block = block_ms
        if self.in_flight:
            block = min(block, 100)  # an answer's ack should not wait long
        due = [d.due for d in self.held.values() if d.entry_id not in self._flying()]
        if due:
            block = min(block, max(1, int((min(due) - self.clock()) * 1000)))
        self.take(self.queue.events_read_group(GROUP, self.consumer, BATCH, max(1, block)))

    def read_own(self) -> None:
        """Every entry pending under our name: after a restart, those the last run held
        (killed mid-call, or waiting for a retry). Reading them again also tells Redis they
        are ours and alive, so no other host takes them (XAUTOCLAIM)."""
        after = "0"
        while True:
            entries = self.queue.events_pending(GROUP, self.consumer, after, BATCH)
            self.take(entries)
            if len(entries) < BATCH:
                return
            after = _text(entries[-1][0])

    def take(self, entries: list[tuple[Any, Any]]) -> None:
        """Hold what the entries ask to deliver; acknowledge the rest at once."""
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            if entry_id in self.held:
                continue
            delivery = build(entry_id, fields, self.config.notify.url)
            if delivery is None:
                self.to_ack.append(entry_id)
                continue
            delivery.due = self.clock()
            self.held[entry_id] = delivery
        HELD.set(len(self.held))

    def dispatch(self) -> None:
        """Start the calls that are due, as many as the pool has threads for."""
        now = self.clock()
        flying = self._flying()
        for delivery in sorted(self.held.values(), key=lambda d: d.due):
            if len(self.in_flight) >= self.config.notify.concurrency or delivery.due > now:
                return
            if delivery.entry_id in flying:
                continue
            if now - delivery.born > self.config.notify.max_age:
                self._give_up(delivery, Outcome.GAVE_UP, delivery.error or "too old when read")
                continue
            delivery.attempts += 1
            self.in_flight[self.pool.submit(self._call, delivery)] = delivery

    def _call(self, delivery: Delivery) -> int:
        timestamp = int(self.clock())
        notify = self.config.notify
        return self.call(delivery.url, delivery.body, {
            "X-Clip-Event-Id": delivery.entry_id,
            "X-Clip-Signature": signature(notify.secret, delivery.body, timestamp)},
            notify.timeout, self.config.job.allow_private_networks)

    def settle(self) -> None:
        """Acknowledge the calls that succeeded or were given up; reschedule failures."""
        for future in [f for f in self.in_flight if f.done()]:
            delivery = self.in_flight.pop(future)
            try:
                status = future.result()
            except Refused as exc:
                self._give_up(delivery, Outcome.REFUSED, str(exc))
                continue
            except CallFailed as exc:
                self._failed(delivery, str(exc))
                continue
            if 200 <= status < 300:
                DELIVERIES.labels(Outcome.DELIVERED.value).inc()
                log.info("webhook %s of job %s delivered to %s (%s, attempt %d)",
                         delivery.entry_id, delivery.job_id, _origin(delivery.url),
                         delivery.type, delivery.attempts, extra={"job_id": delivery.job_id})
                self.to_ack.append(delivery.entry_id)
            elif 300 <= status < 400:
                self._give_up(delivery, Outcome.REFUSED,
                              f"HTTP {status}: webhooks do not follow redirects")
            else:
                self._failed(delivery, f"HTTP {status}")
        if self.to_ack:
            ids = list(dict.fromkeys(self.to_ack))
            self.queue.events_ack(GROUP, *ids)  # on a Redis error: kept, and asked again
            self.to_ack.clear()
            for entry_id in ids:
                self.held.pop(entry_id, None)
            HELD.set(len(self.held))

    def _failed(self, delivery: Delivery, error: str) -> None:
        now = self.clock()
        age = max(0.0, now - delivery.born)
        delivery.error = error = _redacted(error, delivery.url)
        if age >= self.config.notify.max_age:
            self._give_up(delivery, Outcome.GAVE_UP, error)
            return
        # The last try falls at max_age itself, not a whole delay before it.
        delay = min(retry_delay(age), self.config.notify.max_age - age)
        DELIVERIES.labels(Outcome.FAILED.value).inc()
        delivery.due = now + delay
        log.log(logging.WARNING if delivery.attempts == 1 else logging.INFO,
                "webhook %s of job %s to %s failed (attempt %d: %s); next try in %.0f s",
                delivery.entry_id, delivery.job_id, _origin(delivery.url), delivery.attempts,
                error, delay, extra={"job_id": delivery.job_id})

    def _give_up(self, delivery: Delivery, outcome: Outcome, error: str) -> None:
        DELIVERIES.labels(outcome.value).inc()
        error = _redacted(error, delivery.url)
        why = "refused" if outcome is Outcome.REFUSED else \
            f"given up after {delivery.attempts} attempt(s) over [notify] max_age"
        log.error("webhook %s of job %s (%s) to %s %s: %s", delivery.entry_id,
                  delivery.job_id, delivery.type, _origin(delivery.url), why, error,
                  extra={"job_id": delivery.job_id, "reason": f"webhook_{outcome.value}"})
        self._record(delivery, outcome, error)
        self.to_ack.append(delivery.entry_id)

    def _record(self, delivery: Delivery, outcome: Outcome, error: str) -> None:
        """Keep the give-up in Redis for people to see (stats, the dashboard). A Redis error
        here costs that record only: the log line and the metric have it, and the entry is
        acknowledged as it would be anyway (an outage then fails the ack, which is retried)."""
        record = {"job_id": delivery.job_id, "event_id": delivery.entry_id,
                  "type": delivery.type, "origin": _origin(delivery.url),
                  "attempts": delivery.attempts, "error": error[-ERROR_KEPT:]}
        try:
            self.queue.webhook_failed(outcome.value, record)
        except (*REDIS_ERRORS, redis.RedisError) as exc:
            log.warning("webhook %s of job %s: its give-up was not recorded in Redis (%s)",
                        delivery.entry_id, delivery.job_id, exc,
                        extra={"job_id": delivery.job_id})

    def drain(self) -> None:
        """On a stop: wait for the calls in flight (at most ``timeout``) and acknowledge
        what they delivered; the rest stays pending for the next start."""
        if self.in_flight:
            wait(list(self.in_flight), timeout=self.config.notify.timeout + 1.0)
        with contextlib.suppress(*REDIS_ERRORS, redis.RedisError):
            self.settle()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _wait_calls(self, timeout: float) -> None:
        if self.in_flight:
            wait(list(self.in_flight), timeout=timeout, return_when=FIRST_COMPLETED)
        else:
            self._pause(timeout)

    def _flying(self) -> set[str]:
        return {d.entry_id for d in self.in_flight.values()}

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def _origin(url: str) -> str:
    """What a log line says of a URL: its scheme and host (a path may hold a token)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a callback no intake checked (a raw message cancelled while queued)
        return MALFORMED
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _redacted(error: str, url: str) -> str:
    """``error`` without what ``url`` holds past its origin: a path, query or user part may
    be a receiver's token, and some errors quote the request line (http.client's
    InvalidURL)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return error.replace(url, MALFORMED) if url else error
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    for secret in (url, target, parts.query, parts.netloc.rpartition("@")[0]):
        if len(secret) > 1:
            error = error.replace(secret, "...")
    return error


# --- the child process, as the master sees it -------------------------------------------------


class DelivererProcess:
    """The master's handle on its deliverer: started once the master holds its host claim
    (the consumer name is the host_id, which only one supervisor holds), restarted when it
    dies (after a delay that doubles while it keeps dying young), told to stop with the
    workers, replaced on HUP. Off while ``[notify] secret`` is empty."""

    MIN_UPTIME = 5.0  # a deliverer that dies sooner counts towards the next start's delay

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid: int | None = None
        self.started_at = 0.0
        self.next_start = 0.0
        self.failures = 0
        self.stopping = False
        if not config.notify.secret:
            log.info("webhooks off: [notify] secret is empty (job callbacks are not called)")

    @property
    def wanted(self) -> bool:
        return bool(self.config.notify.secret) and not self.stopping

    def keep(self, fork: Callable[[], int], now: float,
             in_child: Callable[[], None]) -> None:
        """Start the deliverer if it should run and does not (the master's loop, each turn).
        ``in_child`` closes what the master's forked children must not keep."""
        if self.pid is not None or not self.wanted or now < self.next_start:
            return
        everything = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, everything)
            log.error("cannot fork the webhook deliverer: %s", exc)
            self.next_start = now + self._delay()
            return
        if pid == 0:
            self._become(in_child, everything)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, everything)
        self.pid, self.started_at = pid, now
        log.info("webhook deliverer started (pid %d)", pid)

    def reaped(self, pid: int, status: int, now: float) -> bool:
        """True when ``pid`` was the deliverer (then it is started again when due)."""
        if pid != self.pid:
            return False
        how = Exit.from_status(status)
        self.pid = None
        metrics_process_gone(pid)
        if self.stopping or (how.clean and not self.config.notify.secret):
            log.info("webhook deliverer (pid %d) %s", pid, how.describe())
            return True
        self.failures = 0 if now - self.started_at >= self.MIN_UPTIME else self.failures + 1
        delay = 0.0 if how.clean else self._delay()
        self.next_start = now + delay
        log.log(logging.INFO if how.clean else logging.WARNING,
                "webhook deliverer (pid %d) %s; starting it again%s", pid, how.describe(),
                f" in {delay:.0f} s" if delay else "")
        return True

    def _delay(self) -> float:
        return min(2.0 ** self.failures, self.config.supervisor.restart_backoff_max)

    def signal(self, sig: int) -> None:
        """Pass a signal on: TERM and QUIT stop it for good (the master stops), USR1 reopens
        its log file."""
        if sig in (signal.SIGTERM, signal.SIGQUIT):
            self.stopping = True
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def reload(self, config: Config) -> None:
        """HUP: the deliverer restarts with the new configuration (or stops, if now off)."""
        self.config = config
        self.next_start = 0.0
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def _become(self, in_child: Callable[[], None], mask: set[signal.Signals]) -> None:
        code = 1
        try:
            os.setpgid(0, 0)  # a terminal's Ctrl-C is the master's to handle
            in_child()
            signal.set_wakeup_fd(-1)
            logs.set_role("webhooks")
            setproctitle.setproctitle("clip-supervisor: webhooks")
            master = os.getppid()
            deliverer = Deliverer(JobQueue(connect(self.config), self.config), self.config,
                                  consumer=self.config.host_id)

            def stop(signum: int, frame: object) -> None:
                deliverer.stopping = True

            def usr1(signum: int, frame: object) -> None:
                logs.reopen()

            for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
                signal.signal(sig, stop)
            signal.signal(signal.SIGUSR1, usr1)
            for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Dies with the master, at once: what it held stays pending in Redis, and the
            # next master reads it again. Nothing is lost by dying mid-call.
            set_parent_death_signal(signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if os.getppid() == master:
                deliverer.run()
            code = 0
        except BaseException:
            log.exception("webhook deliverer crashed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
