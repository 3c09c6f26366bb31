"""What a worker and the supervisor agree on, outside Redis's own key names (worker.keys).

The supervisor imports these from here, never from the worker's loop: the exit codes a
worker leaves with, how a worker is named (its id in Redis, its folder in work_dir), and
the vocabulary of a job's hash ``{prefix}:job:<id>``: its states, its stages and its fields.
The dashboard serves the last three to its page (``/api/info``), so the page names no
state of its own.
"""

from __future__ import annotations

import enum
import os
import re

# --- exit codes: how the master tells a clean exit from a crash ------------------------------

EXIT_OK = 0  # stopped on request (TERM), nothing held
EXIT_RECYCLE = 3  # max_jobs_per_worker or max_worker_memory_mb reached
EXIT_BOOT_ERROR = 4  # cannot start (work_dir, configuration): restarting will not help soon
EXIT_ABORTED = 5  # QUIT/INT: the job was given back
EXIT_PARENT_GONE = 6  # the supervisor died: the job was given back

# --- worker names ----------------------------------------------------------------------------

# A worker is known by its host, pid and start time (ms): a reused pid gets a new name.
_WORKER_ID = re.compile(r"(.*):(\d+):(\d+)", re.DOTALL)
_WORKER_DIR = re.compile(r"w-(\d+)-(\d+)")


def worker_id_for(host_id: str, pid: int, started_ms: int) -> str:
    """The id in the registry, the heartbeat and the processing list's key."""
    return f"{host_id}:{pid}:{started_ms}"


def worker_dir_name(pid: int, started_ms: int) -> str:
    """The worker's folder in work_dir (no host: work_dir is this host's)."""
    return f"w-{pid}-{started_ms}"


def parse_worker_id(worker_id: str) -> tuple[str, int, int] | None:
    """(host_id, pid, started_ms) of a worker id, or None for one we did not make.
    A host_id may itself hold colons: the pid and start are the last two parts."""
    match = _WORKER_ID.fullmatch(worker_id)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


def parse_worker_dir(name: str) -> tuple[int, int] | None:
    """(pid, started_ms) of a worker folder's name, or None for any other name."""
    match = _WORKER_DIR.fullmatch(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` (an int, or its text from Redis or a folder's name) runs on
    this host: it exists and is not a zombie (exited, not yet reaped by its parent, or by a
    slow init in a container). Another user's process counts; no valid pid never does."""
    try:
        number = int(pid)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    if number <= 0:  # kill(0) and kill(-n) would ask about process groups
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    try:  # "pid (comm) S ...": the state follows the last ")" (comm may hold any)
        with open(f"/proc/{number}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:  # no /proc, or gone since the kill: the next look decides
        return True
    state = stat.rfind(b")") + 2
    return stat[state:state + 1] != b"Z"


# --- a job's hash -----------------------------------------------------------------------------


class JobState(enum.StrEnum):
    """``state`` in a job's hash. The Lua scripts (worker.scripts) write the last three."""

    QUEUED = "queued"  # in the queue: enqueued, or given back by a paused host
    RUNNING = "running"  # a worker holds it; ``stage`` says where it is
    FAILED = "failed"  # an attempt failed; waiting for its retry (``retry_at_ms``)
    DONE = "done"  # output stored, completion event pushed, message acknowledged
    DEAD = "dead"  # dead-lettered (``reason``, ``error``)


class Stage(enum.StrEnum):
    """``stage`` in a job's hash and in a worker's heartbeat."""

    FETCH = "fetch"  # a running job's stages, in order
    CLIP = "clip"
    STORE = "store"
    WAITING = "waiting"  # failed, its retry not due yet
    DONE = "done"
    DEAD = "dead"
    IDLE = "idle"  # a worker's only: no job
    PAUSED = "paused"  # a worker's only: its host has a fault, it takes nothing


class EventType(enum.StrEnum):
    """``type`` of an entry of the event stream ``{prefix}:events``: a job's state changes."""

    QUEUED = "queued"  # enqueued (or given back, or a dead letter replayed)
    STARTED = "started"  # a worker started an attempt
    PROGRESS = "progress"  # its stage or progress changed (at most one a second per job)
    DONE = "done"  # stored; ``event`` is the completion event of {prefix}:done
    RETRY = "retry"  # an attempt failed; it is retried after ``delay_ms``
    DEAD = "dead"  # dead-lettered; ``event`` is the dead letter without its message
    CANCELLED = "cancelled"  # cancelled: a dead letter with reason ``cancelled``


# The event types that end a job; their entries carry the job's ``callback`` ("" = none).
FINAL_EVENTS = frozenset({EventType.DONE, EventType.DEAD, EventType.CANCELLED})

# A job in one of these stages has left the worker that ran it.
ENDED_STAGES = frozenset({Stage.DONE, Stage.DEAD, Stage.WAITING})

# Every field a job's hash may hold, in the order a reader wants them, with its meaning.
JOB_FIELDS: dict[str, str] = {
    "state": "queued, running, failed (waiting for a retry), done or dead",
    "stage": "fetch, clip, store while running; waiting, done or dead after",
    "progress": "percent of the clip written, from ffmpeg's -progress",
    "speed": "ffmpeg's speed (1x = as fast as playing)",
    "worker": "the worker that runs or ran it: <host_id>:<pid>:<start ms>",
    "url": "the source",
    "output": "where the clip is stored",
    "mode": "copy, smart or encode: what the job asked for",
    "cut": "how its clip was cut: copy, smart, or encode (a smart job whose source could "
           "not be joined safely is encoded)",
    "reencoded_seconds": "seconds of its clip that were re-encoded",
    "reason": "why it failed or was dead-lettered",
    "error": "the end of the error (ffmpeg's stderr for media errors)",
    "attempts": "failed attempts so far",
    "retry_at_ms": "when its retry is due (ms since the epoch, Redis's clock)",
    "queued": "when clip-supervisor enqueue pushed it (UTC)",
    "started": "when a worker started its latest attempt (UTC)",
    "finished": "when it was done or dead-lettered (UTC)",
    "elapsed": "seconds from start to acknowledgement",
    "time_fetch": "seconds spent reading the source",
    "time_clip": "seconds spent clipping",
    "time_store": "seconds spent storing the clip",
    "message_sha1": "the SHA-1 of its message: its attempts are counted under it",
    "completed": "1 once its completion event was pushed (a new submission clears it)",
    "ack": "the token of the acknowledgement that recorded it done",
    "cancel": "when a cancel was asked (UTC) while it had not ended; cleared by its end",
    "clips": "a multi-clip job's clip ids (JSON list); each clip's end is its own event",
    "clips_done": "a multi-clip job's clips stored so far",
    "clips_dead": "a multi-clip job's clips dead-lettered (or cancelled) so far",
}
