"""Putting back what dead workers held, and removing what they left on disk.

Three ways a worker's message can be orphaned, three recoveries:

* one of our own workers died: the master reaps it and recovers its processing list at once
  (no heartbeat check: we saw it die), counting an attempt unless we killed it on purpose;
* a worker of ours died while no supervisor ran (the last master was SIGKILLed): at start,
  registry entries of this host whose pid is gone are recovered at once;
* a worker on another host died with its host: its heartbeat key expires, and any
  supervisor's periodic scan recovers it. The Lua script re-checks the heartbeat and empties
  the list in one step, so racing supervisors requeue each message exactly once.

Two guards keep the last two from robbing a live worker:

* The host claim (``HostClaim``). Recovery at start trusts local pids, so it is only right
  when no other supervisor runs with our host_id. A master holds ``{prefix}:host:<host_id>``
  (a random token, TTL ``heartbeat_ttl``, refreshed every scan) before it forks or recovers
  anything. A claim found held by a live process of this machine, or refreshed by its holder
  while we watch it, means a second supervisor with the same host_id: the start is refused.
  A claim whose holder is known dead (same machine and pid namespace, pid gone) is taken over
  at once; one we cannot check (another machine) is waited out, at most ``heartbeat_ttl``
  plus a margin. A master whose claim was taken while it ran (it was cut off from Redis for
  longer than ``heartbeat_ttl`` and another supervisor started with its host_id) stops.
* The contact guard (``ContactGuard``). An expired heartbeat proves a worker dead only if
  Redis was answering everyone meanwhile. A stall that hits every client (``CLIENT PAUSE``,
  a frozen or overloaded server, a partition between us and Redis) expires the heartbeats of
  live workers too, and when it ends all supervisors see them expired at once. So a
  supervisor declares another host's worker dead only after ``heartbeat_ttl`` of unbroken
  contact of its own: since its start, since its last Redis error, since a round trip slower
  than half of ``heartbeat_ttl - heartbeat_interval`` (the slack a worker's heartbeat has),
  and since any gap of more than ``heartbeat_ttl`` between its answered scans. Workers beat
  every ``heartbeat_interval``, so a live one has beaten again long before that. What it
  cannot see: a stall that hits another host but not us (that host's workers are then
  recovered, and fencing in the ack turns their late result into a no-op); and a stall that
  starts between our check and our recovery call yet is shorter than our socket timeout
  (1 s), which can expire heartbeats only when ``heartbeat_ttl - heartbeat_interval`` < 1 s.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass

import psutil

from worker.protocol import parse_worker_dir, parse_worker_id, pid_alive
from worker.queue import HostClaims, JobQueue
from worker.storage import remove_pending

log = logging.getLogger("clip-supervisor.recovery")


def recover_worker(queue: JobQueue, worker_id: str, *, count_attempt: bool) -> int:
    n = queue.recover(worker_id, only_if_expired=False, count_attempt=count_attempt)
    if n > 0:
        log.warning("requeued %d message(s) held by dead worker %s%s", n, worker_id,
                    " (attempt counted)" if count_attempt else "")
    return n


def recover_at_start(queue: JobQueue, host_id: str) -> int:
    """Recover this host's workers whose process is gone, and lists nobody registered."""
    total = 0
    for worker_id, info in queue.registered_workers().items():
        if info.get("host") == host_id and not pid_alive(info.get("pid")):
            total += max(0, recover_worker(queue, worker_id, count_attempt=True))
    for worker_id in queue.orphan_processing_lists():
        parts = parse_worker_id(worker_id)
        # Another host's unregistered list: leave it to that host unless its pid is ours.
        if parts is not None and parts[0] == host_id and not pid_alive(parts[1]):
            total += max(0, recover_worker(queue, worker_id, count_attempt=True))
    return total


def recover_expired(queue: JobQueue, live: set[str]) -> int:
    """Recover registered workers (of any host) whose heartbeat has expired."""
    candidates = [wid for wid in queue.registered_workers() if wid not in live]
    if not candidates:
        return 0
    total = 0
    for wid, alive in queue.heartbeats_alive(candidates).items():
        if alive:
            continue
        n = queue.recover(wid, only_if_expired=True, count_attempt=True)
        if n > 0:
            log.warning("requeued %d message(s) of worker %s (heartbeat expired)", n, wid)
            total += n
    return total


# --- the contact guard ---------------------------------------------------------------------


class ContactGuard:
    """May this supervisor declare another host's worker dead now? (see the module's notes)"""

    def __init__(self, ttl: float, interval: float) -> None:
        self.ttl = ttl
        # A worker beats every ``interval``; its heartbeat lives ``ttl``: a stall of ours
        # longer than half that slack may have cost a live worker its heartbeat.
        self.stall_limit = max(0.05, (ttl - interval) / 2)
        self.since: float | None = None  # start of the current stretch of working contact
        self.last: float | None = None  # our last answered scan
        self.trusting = False

    def contact(self, sent: float, answered: float) -> None:
        """One scan's first command went out at ``sent`` and was answered at ``answered``."""
        if answered - sent > self.stall_limit:
            self.lost(f"Redis took {answered - sent:.1f} s to answer")
            return
        if self.last is not None and sent - self.last > self.ttl:
            self.lost(f"no scan for {sent - self.last:.1f} s")
        if self.since is None:
            self.since = answered
        self.last = answered

    def lost(self, why: str) -> None:
        """Contact broke (a Redis error, a stall): the clock starts again at the next answer."""
        if self.trusting:
            log.warning("%s: no worker of another host is declared dead until Redis has "
                        "answered for %.1f s (heartbeat_ttl) without a break", why, self.ttl)
        self.since = self.last = None
        self.trusting = False

    def trusted(self, now: float) -> bool:
        trusted = self.since is not None and now - self.since >= self.ttl
        if trusted and not self.trusting:
            log.info("Redis has answered for %.1f s: recovering other hosts' dead workers",
                     now - self.since)  # type: ignore[operator]
        self.trusting = trusted
        return trusted


# --- the host claim --------------------------------------------------------------------------

class Claim(enum.Enum):
    HELD = "held"  # ours
    WAITING = "waiting"  # held by a supervisor we cannot check: waiting for it to expire
    REFUSED = "refused"  # held by a live supervisor: we must not start
    LOST = "lost"  # it was ours, and another supervisor holds it now


@dataclass(frozen=True)
class Holder:
    """Who holds a host claim, as its hash says."""

    token: str
    pid: int
    hostname: str
    scope: str
    created: float
    beat: int

    @classmethod
    def parse(cls, text: dict[str, str]) -> Holder:
        def number(name: str) -> float:
            try:
                return float(text.get(name, "0"))
            except ValueError:
                return 0.0

        return cls(token=text.get("token", ""), pid=int(number("pid")),
                   hostname=text.get("hostname", "?"), scope=text.get("scope", ""),
                   created=number("created"), beat=int(number("beat")))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.hostname}"


class HostClaim:
    """One supervisor per host_id: see the module's notes.

    ``step`` runs at every scan: it claims, refreshes, or watches another holder, and says
    where we stand. Redis errors go to the caller (the master retries at its next scan).
    """

    def __init__(self, host_id: str, ttl: float, interval: float) -> None:
        self.host_id = host_id
        self.token = uuid.uuid4().hex
        self.retime(ttl, interval)
        self.pid = os.getpid()
        self.created = _create_time(self.pid)
        self.scope = machine_scope()
        self.held = False
        self.holder: Holder | None = None  # who holds it, when we do not
        self._watching: tuple[Holder, float] | None = None  # (as first seen, give up at)

    def retime(self, ttl: float, interval: float) -> None:
        self.ttl = ttl
        # A live holder refreshes every ``interval``: past its TTL plus two of those (and a
        # second for a loaded machine), an unrefreshed claim would have expired.
        self.wait_limit = ttl + max(1.0, 2 * interval)

    def describe_us(self) -> dict[str, str | int | float]:
        return {"pid": self.pid, "hostname": socket.gethostname(), "scope": self.scope,
                "created": self.created}

    def _claims(self, queue: JobQueue) -> HostClaims:
        return queue.hosts  # the queue of the moment: a reload (HUP) may have replaced it

    def _take(self, claims: HostClaims, replace: str = "") -> int:
        return claims.claim(self.host_id, self.token, self.ttl, replace, self.describe_us())

    def step(self, queue: JobQueue, now: float) -> Claim:
        claims = self._claims(queue)
        taken = self._take(claims)
        if taken:
            if taken == 2 and self.held:
                log.warning("the claim on host_id %s had expired (no contact with Redis for "
                            "heartbeat_ttl); claimed it again", self.host_id)
            self.held, self.holder, self._watching = True, None, None
            return Claim.HELD
        fields = claims.holder(self.host_id)
        if not fields:
            return Claim.WAITING  # it expired between our two calls: take it next time
        holder = self.holder = Holder.parse(fields)
        if self.held:
            self.held = False
            return Claim.LOST
        if holder.scope == self.scope:
            # Same machine, same pid namespace: its pid tells whether it still runs.
            if _same_process(holder.pid, holder.created):
                return Claim.REFUSED
            if self._take(claims, replace=holder.token):
                log.info("took over the claim on host_id %s of a supervisor that no longer "
                         "runs (%s)", self.host_id, holder.describe())
                self.held, self.holder, self._watching = True, None, None
                return Claim.HELD
            return Claim.WAITING
        if self._watching is None or self._watching[0].token != holder.token:
            self._watching = (holder, now + self.wait_limit)
            log.warning("host_id %s is claimed by a supervisor this machine cannot check (%s): "
                        "waiting up to %.1f s for its claim to expire", self.host_id,
                        holder.describe(), self.wait_limit)
            return Claim.WAITING
        first, give_up = self._watching
        if holder.beat != first.beat or now >= give_up:
            return Claim.REFUSED  # refreshed while we watched: it runs
        return Claim.WAITING

    def release(self, queue: JobQueue) -> None:
        """Give the claim up (a clean stop), so a successor anywhere starts at once."""
        if self.held:
            self._claims(queue).release(self.host_id, self.token)
            self.held = False

    def conflict(self) -> str:
        who = self.holder.describe() if self.holder else "unknown"
        return (f"another supervisor ({who}) is running with host_id {self.host_id}; "
                "set [supervisor] host_id")


def machine_scope() -> str:
    """Where a pid means a process: the machine (its hostname and boot) and pid namespace."""
    parts = [socket.gethostname()]
    for read in (lambda: _read("/proc/sys/kernel/random/boot_id"),
                 lambda: os.readlink("/proc/self/ns/pid")):
        with contextlib.suppress(OSError):
            parts.append(read())
    return " ".join(parts)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _create_time(pid: int) -> float:
    try:
        return round(psutil.Process(pid).create_time(), 3)
    except psutil.Error:
        return 0.0


def _same_process(pid: int, created: float) -> bool:
    """Does the process that wrote a claim still run (and is not a later one with its pid)?"""
    if not pid_alive(pid):
        return False
    return not created or abs(_create_time(pid) - created) < 0.5


# --- folders -----------------------------------------------------------------------------------


def clean_worker_dir(path: str) -> None:
    remove_pending(path)
    shutil.rmtree(path, ignore_errors=True)


def clean_stale_dirs(work_dir: str) -> int:
    """Remove folders of workers whose process is gone (left by a SIGKILLed pool)."""
    removed = 0
    try:
        names = os.listdir(work_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        parts = parse_worker_dir(name)
        if parts is not None and not _started_at(*parts):
            clean_worker_dir(os.path.join(work_dir, name))
            removed += 1
    return removed


def _started_at(pid: int, started_ms: int) -> bool:
    """Is the process that made this folder still running (and not a reused pid)?"""
    try:
        process = psutil.Process(pid)
        created = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    # The worker records its start just after fork; a reused pid starts later than that.
    return created <= started_ms / 1000.0 + 1.0
