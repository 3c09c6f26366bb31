"""Putting back what dead workers held, and removing what they left on disk.

Three ways a worker's message can be orphaned, three recoveries:

* one of our own workers died: the master reaps it and recovers its processing list at once
  (no heartbeat check: we saw it die), counting an attempt unless we killed it on purpose;
* a worker of ours died while no supervisor ran (the last master was SIGKILLed): at start,
  registry entries of this host whose pid is gone are recovered at once;
* a worker on another host died with its host: its heartbeat key expires, and any
  supervisor's periodic scan recovers it. The Lua script re-checks the heartbeat and empties
  the list in one step, so racing supervisors requeue each message exactly once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import psutil

from worker.queue import JobQueue
from worker.storage import remove_pending

log = logging.getLogger("clip-supervisor.recovery")
_WORKER_DIR = re.compile(r"w-(\d+)-(\d+)")


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
        if info.get("host") == host_id and not _alive(info.get("pid")):
            total += max(0, recover_worker(queue, worker_id, count_attempt=True))
    for worker_id in queue.orphan_processing_lists():
        host, _, rest = worker_id.partition(":")
        pid = rest.partition(":")[0]
        # Another host's unregistered list: leave it to that host unless its pid is ours.
        if host == host_id and not _alive(pid):
            total += max(0, recover_worker(queue, worker_id, count_attempt=True))
    return total


def recover_expired(queue: JobQueue, live: set[str]) -> int:
    """Recover registered workers (of any host) whose heartbeat has expired."""
    candidates = [wid for wid in queue.registered_workers() if wid not in live]
    if not candidates:
        return 0
    pipe = queue.client.pipeline(transaction=False)
    for wid in candidates:
        pipe.exists(queue.keys.heartbeat(wid))
    total = 0
    for wid, alive in zip(candidates, pipe.execute(), strict=True):
        if alive:
            continue
        n = queue.recover(wid, only_if_expired=True, count_attempt=True)
        if n > 0:
            log.warning("requeued %d message(s) of worker %s (heartbeat expired)", n, wid)
            total += n
    return total


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
        match = _WORKER_DIR.fullmatch(name)
        if match and not _started_at(int(match.group(1)), int(match.group(2))):
            clean_worker_dir(os.path.join(work_dir, name))
            removed += 1
    return removed


def _alive(pid: object) -> bool:
    # A zombie is dead: its parent (or a slow init, FIELD-NOTES) has not reaped it yet.
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE  # type: ignore[arg-type]
    except (TypeError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


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
