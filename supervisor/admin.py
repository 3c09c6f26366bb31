"""Operator commands: following and cancelling jobs, stats, dead letters, and the
dashboard's read models.

Every read and write of Redis goes through the queue module (worker.queue); here is what
people see of it.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable
from typing import Any, TextIO

from worker.protocol import ENDED_STAGES, JOB_FIELDS, EventType, JobState, Stage
from worker.queue import CancelOutcome, JobQueue

WORKER_EXPIRED = "expired"  # a worker's status when its heartbeat is gone
WEBHOOK_FAILURES_SHOWN = 10  # newest webhook give-ups in stats (and so on the dashboard)


def follow_job(job_id: str, events: Iterable[Any], out: TextIO,
               timeout: float | None = None) -> int:
    """Print a job's progress from its events (``clip_supervisor.client.Job.follow``) until
    it is done (0) or dead (2, cancelled included); 3 when ``timeout`` runs out first. A
    multi-clip job's clips are printed as each ends: 0 when all were stored, else 2.

    On a terminal it draws one progress bar line; otherwise it prints a plain line whenever
    the stage changes or the progress passes another 10 %.
    """
    tty = out.isatty()
    label, percent, state = str(JobState.QUEUED), 0.0, str(JobState.QUEUED)
    last: tuple = ()

    def draw() -> None:
        nonlocal last
        if tty:
            filled = int(percent / 5)
            out.write(f"\r{job_id[:16]} [{'#' * filled}{'.' * (20 - filled)}] "
                      f"{percent:5.1f}% {label:<8}")
            out.flush()
        elif (label, int(percent // 10)) != last:
            last = (label, int(percent // 10))
            print(f"{job_id} {label} {percent:.0f}%", file=out, flush=True)

    draw()
    clips_dead: int | None = None  # a multi-clip job's clips that ended dead, once one ended
    try:
        for event in events:
            data = event.data
            if getattr(event, "job", "") == job_id and event.final:  # one of its clips
                clips_dead = (clips_dead or 0) + (event.type != EventType.DONE)
                what = f"done: {data.get('output', '')}" if event.type == EventType.DONE \
                    else f"dead ({data.get('reason', '')}): {str(data.get('error', ''))[-200:]}"
                print(("\n" if tty else "") + f"{event.job_id} {what}", file=out, flush=True)
                continue
            if event.type == EventType.STARTED:
                label, percent, state = str(Stage.FETCH), 0.0, str(JobState.RUNNING)
            elif event.type == EventType.PROGRESS:
                label = str(data.get("stage") or label)
                percent = float(data.get("progress") or 0)
            elif event.type == EventType.RETRY:
                label, state = str(Stage.WAITING), str(JobState.FAILED)
            elif event.type == EventType.QUEUED:
                label, state = str(JobState.QUEUED), str(JobState.QUEUED)
            elif event.type == EventType.DONE:
                label, percent = str(Stage.DONE), 100.0
            elif event.type in (EventType.DEAD, EventType.CANCELLED):
                label = str(Stage.DEAD)
            draw()
            if event.type == EventType.DONE:
                print(("\n" if tty else "") + f"done: {data.get('output', '')}", file=out,
                      flush=True)
                return 0
            if event.type in (EventType.DEAD, EventType.CANCELLED):
                error = str(data.get("error", "")).strip()[-300:]
                print(("\n" if tty else "") + f"dead ({data.get('reason', '')}): {error}",
                      file=out, flush=True)
                return 2
        if clips_dead is not None:  # the follow ended with the last clip
            return 2 if clips_dead else 0
    except TimeoutError:
        pass
    print(("\n" if tty else "") + f"still {state} after {timeout:g} s", file=out, flush=True)
    return 3


def cancel(queue: JobQueue, job_id: str) -> CancelOutcome:
    """Cancel a job (``JobQueue.cancel``): ``clip-supervisor cancel`` and the dashboard."""
    return queue.cancel(job_id)


def describe_cancel(job_id: str, outcome: CancelOutcome) -> str:
    """What a cancel did, in one line for people."""
    if outcome.removed:
        return f"{job_id}: cancelled: taken out of the queue, dead-lettered (cancelled)"
    if outcome.cancelled:
        return f"{job_id}: cancelling: it is running ({outcome.state}); its worker aborts it"
    if outcome.state:
        return f"{job_id}: not cancelled: it has ended ({outcome.state})"
    return f"{job_id}: not cancelled: no such job queued or running"


def stats(queue: JobQueue) -> dict[str, Any]:
    """Queue depths, every host's workers and the webhook deliveries given up:
    ``clip-supervisor stats`` and /api/stats."""
    depths, registry = queue.overview()
    workers = [{"id": wid, **info} for wid, info in sorted(registry.items())]
    activity = queue.activity({w["id"]: w.get("job") or None for w in workers})
    now = time.time()
    for w in workers:
        seen = activity[w["id"]]
        w["alive"] = seen.alive
        w["holding"] = seen.holding
        if "uptime" not in w:  # a worker of an older version: its host's clock may differ
            w["uptime"] = max(0.0, round(now - float(w.get("started", now)), 1))
        if w.get("job"):
            if seen.job_stage in ENDED_STAGES:
                # The heartbeat named a job that has ended since: the worker is idle now.
                w.update(job=None, stage=Stage.IDLE, progress=0.0)
            else:
                if seen.job_stage is not None:
                    w["stage"] = seen.job_stage
                if seen.job_progress is not None:
                    w["progress"] = seen.job_progress
        w["status"] = worker_status(w)
    return {"prefix": queue.config.redis.prefix, "queues": depths, "workers": workers,
            "webhook_failures": webhook_failures(queue), "time": now}


def webhook_failures(queue: JobQueue, limit: int = WEBHOOK_FAILURES_SHOWN) -> dict[str, Any]:
    """Webhook deliveries given up (supervisor.webhooks), all hosts: ``total``,
    ``by_outcome`` (gave_up, refused) and the ``recent`` records, newest first, each
    {job_id, event_id, type, origin, outcome, attempts, error, time}."""
    counts, raw = queue.webhook_failures(limit)
    recent = []
    for entry in raw:
        try:
            record = json.loads(entry)
        except ValueError:
            record = None
        recent.append(record if isinstance(record, dict) else
                      {"outcome": "unreadable", "error": entry[:200].decode("utf-8", "replace")})
    return {"total": sum(counts.values()), "by_outcome": dict(sorted(counts.items())),
            "recent": recent}


def worker_status(worker: dict[str, Any]) -> str:
    """What a worker is doing, for people: its stage, "paused" (its host has a fault), or
    "expired" (its heartbeat is gone: dead, or cut off from Redis)."""
    if not worker.get("alive"):
        return WORKER_EXPIRED
    if worker.get("fault"):
        return Stage.PAUSED
    return str(worker.get("stage") or Stage.IDLE)


def format_stats(data: dict[str, Any]) -> str:
    q = data["queues"]
    lines = [f"queue {q['queue']}   retry {q['retry']}   delayed {q['delayed']}   "
             f"dead {q['dead']}   done {q['done']}   (prefix {data['prefix']})",
             *_format_webhook_failures(data.get("webhook_failures") or {}), ""]
    if not data["workers"]:
        lines.append("no workers registered")
        return "\n".join(lines)
    header = f"{'HOST':<16} {'PID':>7} {'SLOT':>4} {'UPTIME':>8} {'DONE':>5}  {'STATE':<9} JOB"
    lines.append(header)
    for w in data["workers"]:
        state = worker_status(w)
        if state == Stage.PAUSED:
            state = f"{state} ({w['fault']})"
        job = w.get("job") or "-"
        if w.get("job"):
            job = f"{job[:24]} {w.get('progress', 0):.0f}%"
        lines.append(f"{str(w.get('host', '?'))[:16]:<16} {w.get('pid', 0):>7} "
                     f"{w.get('slot', 0):>4} {_duration(w.get('uptime', 0)):>8} "
                     f"{w.get('jobs_done', 0):>5}  {state:<9} {job}")
    return "\n".join(lines)


def _format_webhook_failures(failures: dict[str, Any]) -> list[str]:
    """The give-up count (by outcome), then one line per recent give-up, newest first."""
    counts = failures.get("by_outcome") or {}
    lines = [f"webhook failures {failures.get('total', 0)}" + (
        " (" + ", ".join(f"{outcome} {n}" for outcome, n in counts.items()) + ")"
        if counts else "")]
    for f in failures.get("recent") or []:
        error = " ".join(str(f.get("error", "")).split())[-120:]
        line = (f"  {f.get('time', '?')}  {str(f.get('job_id', '?'))[:32]}  "
                f"{f.get('type', '?')} to {str(f.get('origin', '?'))[:80]}  "
                f"{f.get('outcome', '?')} after {f.get('attempts', '?')} attempt(s): {error}")
        # Nothing a terminal would act on: the error and the URL came from the network.
        lines.append(re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", line))
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def dead_letters(queue: JobQueue, limit: int = 0) -> list[tuple[bytes, dict[str, Any]]]:
    raw = queue.entries("dead", 0, limit - 1 if limit > 0 else -1)
    result = []
    for entry in raw:
        try:
            letter = json.loads(entry)
        except ValueError:
            letter = {"id": "?", "reason": "unreadable", "error": entry[:200].decode(
                "utf-8", "replace")}
        result.append((entry, letter))
    return result


def original_message(letter: dict[str, Any]) -> bytes | None:
    """The message a dead letter holds, or None when it cannot be replayed (the letter kept
    only the first ``dead_message_bytes`` of it)."""
    if letter.get("message_truncated"):
        return None
    if "message" in letter:
        return str(letter["message"]).encode("utf-8")
    if "message_b64" in letter:
        return base64.b64decode(letter["message_b64"])
    return None


def retry_dead(queue: JobQueue, ids: list[str] | None) -> tuple[int, list[str]]:
    """Replay dead letters (all when ``ids`` is None); returns (count, ids not requeued: not
    found, or whose letter kept only the start of a message too large to replay)."""
    wanted = None if ids is None else set(ids)
    replayed, seen, partial = 0, set(), []
    for entry, letter in dead_letters(queue):
        job_id = str(letter.get("id", ""))
        if wanted is not None and job_id not in wanted:
            continue
        seen.add(job_id)
        message = original_message(letter)
        if message is None:
            partial.append(f"{job_id} (the letter keeps only part of its message)")
            continue
        if queue.replay_dead(entry, message, job_id):
            replayed += 1
    missing = sorted(wanted - seen) if wanted is not None else []
    return replayed, [*missing, *partial]


def purge_dead(queue: JobQueue) -> int:
    return queue.purge_dead()


# --- read models for the dashboard (supervisor/dashboard.py) ---------------------------------

SCAN_CHUNK = 250  # entries per LRANGE while walking {clips}:done or {clips}:dead
CLOCK_SKEW = 300.0  # seconds: hosts' clocks may disagree, so a walk stops this far past "since"


def epoch_of(iso: object) -> float | None:
    """Epoch seconds of an ISO-8601 time such as now_iso()'s "2025-01-31T12:00:00Z"."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def newest_entries(queue: JobQueue, which: str, *, limit: int = 0,
                   since: float | None = None, id_contains: str = "",
                   scan_max: int = 2000) -> list[dict[str, Any]]:
    """Completion events (``which`` = "done") or dead letters ("dead"), newest first.

    Reads in chunks and stops at ``limit`` matches, after ``scan_max`` entries, or once an
    entry is older than ``since`` by more than the clock skew we tolerate between hosts.
    Entries older than ``since`` are left out; ``id_contains`` keeps ids with that substring.
    """
    found: list[dict[str, Any]] = []
    needle = id_contains.lower()
    for start in range(0, scan_max, SCAN_CHUNK):
        chunk = queue.entries(which, start, min(start + SCAN_CHUNK, scan_max) - 1)
        for raw in chunk:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"id": "?", "reason": "unreadable",
                         "error": raw[:200].decode("utf-8", "replace")}
            if not isinstance(entry, dict):
                continue
            if since is not None:
                moment = epoch_of(entry.get("time"))
                if moment is not None and moment < since - CLOCK_SKEW:
                    return found
                if moment is None or moment < since:
                    continue
            if needle and needle not in str(entry.get("id", "")).lower():
                continue
            found.append(entry)
            if limit and len(found) >= limit:
                return found
        if len(chunk) < SCAN_CHUNK:
            break
    return found


def throughput(queue: JobQueue, minutes: int = 60, now: float | None = None) -> dict[str, Any]:
    """Jobs done and dead-lettered per minute over the last ``minutes`` (oldest first), from
    the "time" of ``{clips}:done`` events and ``{clips}:dead`` letters."""
    now = time.time() if now is None else now
    last = int(now // 60)
    first = last - minutes + 1
    counts = {"done": [0] * minutes, "failed": [0] * minutes}
    scan_max = max(queue.config.job.done_max, 10000)
    for name, which in (("done", "done"), ("failed", "dead")):
        for entry in newest_entries(queue, which, since=first * 60.0, scan_max=scan_max):
            moment = epoch_of(entry.get("time"))
            if moment is not None and first <= int(moment // 60) <= last:
                counts[name][int(moment // 60) - first] += 1
    return {"minutes": minutes, "start": first * 60, "done": counts["done"],
            "failed": counts["failed"]}


def job_record(queue: JobQueue, job_id: str) -> dict[str, Any] | None:
    """Everything Redis holds about one job: its hash (the fields of ``JOB_FIELDS`` first,
    in that order, then any other), attempts and dead letters. A clip of a multi-clip job
    has no hash: its dead letter, or its completion event, tells its state and its job."""
    found = queue.job(job_id)
    letters = [letter for letter in newest_entries(queue, "dead", id_contains=job_id)
               if letter.get("id") == job_id]
    fields = found.fields
    if not fields and not letters:
        # A clip of a multi-clip job has no hash of its own (its job's hash counts it): a
        # stored one is known by its completion event, which names its job.
        event = next((entry for entry in newest_entries(queue, "done", id_contains=job_id)
                      if entry.get("id") == job_id and entry.get("job")), None)
        if event is None:
            return None
        fields = {"state": JobState.DONE, "job": str(event["job"]),
                  "output": str(event.get("output", "")), "url": str(event.get("url", "")),
                  "finished": str(event.get("time", "")),
                  "elapsed": str(event.get("elapsed", ""))}
    order = {name: i for i, name in enumerate(JOB_FIELDS)}
    fields = dict(sorted(fields.items(),
                         key=lambda item: (order.get(item[0], len(order)), item[0])))
    # Its state; "dead" also once the hash has expired but a dead letter remains.
    state = fields.get("state") or (JobState.DEAD if letters else "")
    return {"id": job_id, "state": state, "fields": fields, "ttl": found.ttl,
            "attempts": found.attempts, "dead": letters,
            "cancellable": state in (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)}
