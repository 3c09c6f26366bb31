"""Liveness from the loop and FATAL slots, with real processes.

A wedged worker is made for real: its main loop blocks in the kernel on the source cache's
lock (``flock`` without a timeout, restarted by Python after every signal), which the test
holds as a stuck sibling would. Its heartbeat thread goes on beating meanwhile; only its
loop's silence gives it away. A slot that fails at boot every time is made as in
tests/test_reliability.py: its work_dir cannot be created.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import threading
import time

import pytest

from tests.conftest import Env, free_port, wait_for
from tests.test_observability import _get, _sample
from worker import config as config_mod
from worker.queue import sha1
from worker.runner import Activity, LoopClock, Worker, silence_limit

# Short timeouts so that a wedge shows within seconds: the busy limit is then
# 1.5 x max(block_timeout + 2 x socket_timeout, REDIS_BACKOFF_MAX, stall_timeout,
# 3 x connect_timeout, the Cloud Storage sum) + 5 s = 1.5 x 5 + 5 = 12.5 s. Attempts to
# spare: a loaded machine may fail an attempt (a stall) before the one that wedges.
FAST = {"redis": {"socket_timeout": 1.5},
        "job": {"stall_timeout": 5, "connect_timeout": 1.5, "max_attempts": 6},
        "storage": {"gcs_connect_timeout": 1, "gcs_timeout": 2, "gcs_retry_deadline": 2}}


def _listen(env: Env) -> str:
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    return f"http://127.0.0.1:{port}"


def _metric(base: str, name: str, **labels: str) -> float:
    return _sample(_get(f"{base}/metrics")[1], name, **labels)


def _hold_cache_lock(env: Env) -> int:
    """Take the source cache's lock (the folder made as the worker would make it)."""
    cache = os.path.join(env.work, "cache")
    os.makedirs(cache, mode=0o700)
    os.chmod(env.work, 0o700)
    fd = os.open(os.path.join(cache, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_the_clock_a_worker_marks_is_read_by_its_parent():
    clock = LoopClock(5.0)
    assert clock.read() == (5.0, Activity.IDLE)
    pid = os.fork()
    if pid == 0:  # the worker's side
        clock.mark(1234.567, Activity.BUSY)
        os._exit(0)
    os.waitpid(pid, 0)
    assert clock.read() == (1234.567, Activity.BUSY)
    clock.close()


def test_the_silence_limits_leave_room_for_every_legitimate_wait():
    config = config_mod.load(None, env={})
    idle, busy = (silence_limit(config, a) for a in (Activity.IDLE, Activity.BUSY))
    paused = silence_limit(config, Activity.PAUSED)
    # idle: a BLMOVE and a Redis call that times out; paused: a 60 s sleep between probes;
    # busy: a Cloud Storage request retried to its deadline (5 + 60 + 30 s by default)
    assert 16 < idle < busy and paused > 60 + 16
    assert busy > config.job.stall_timeout and busy > 95
    # storing: a copy to another file system and its sync, which nothing interrupts
    assert silence_limit(config, Activity.STORING) > config.job.timeout


def test_a_wedged_loop_withholds_the_heartbeat_and_only_the_loop_thread_counts(caplog):
    # (so that another host recovers what it holds when its own supervisor is gone too)
    config = config_mod.load(None, env={})
    clock = LoopClock(0.0)
    worker = Worker(config, slot=1, liveness=clock)
    worker.busy = True
    worker._alive()
    assert not worker._loop_wedged()
    last, activity = clock.read()
    assert activity is Activity.BUSY and abs(last - time.monotonic()) < 1
    worker._on_stage("store")
    assert clock.read()[1] is Activity.STORING
    worker._on_stage("clip")

    # A sign of life from another thread (the heartbeat's, the relay's) proves nothing
    worker.alive_at -= silence_limit(config, Activity.BUSY) + 1
    thread = threading.Thread(target=worker._alive)
    thread.start()
    thread.join()
    assert worker._loop_wedged() and worker._loop_wedged()
    (said,) = [r.getMessage() for r in caplog.records]  # once, not at every beat
    assert re.match(r"main loop silent for \d+ s \(limit \d+ s, busy\): heartbeat withheld",
                    said), said

    # Once the loop moves again, the heartbeat resumes
    worker._alive()
    assert not worker._loop_wedged()
    assert "main loop alive again" in caplog.records[-1].getMessage()
    clock.close()


@pytest.mark.settings({**FAST, "supervisor": {"workers": 1}})
def test_a_worker_wedged_in_a_call_that_never_returns_is_killed_and_its_job_requeued(env):
    base = _listen(env)
    lock = _hold_cache_lock(env)
    try:
        # Given a worker whose job blocks for good once the clip is made (the cache's lock)
        (raw,) = env.push({"id": "wedge", "url": env.url("ten.mp4"), "start": 1,
                           "duration": 2})
        proc = env.start()
        pid = wait_for(lambda: env.holder_of(raw), 15, what="the worker to take the job")

        # Then its heartbeat goes on, and says how long its loop has been silent
        def silent() -> float:
            info = env.r.hget(env.keys.workers, next(iter(env.r.hkeys(env.keys.workers))))
            return float(json.loads(info).get("loop_silent") or 0)
        wait_for(lambda: silent() >= 4, 20, interval=0.1, what="a silent loop, beating")
        assert env.r.exists(next(iter(env.r.scan_iter(match="*:heartbeat:*"))))

        # And once silent past its limit (12.5 s busy here), its supervisor kills it
        wait_for(lambda: "is wedged" in env.log_text(), 30, interval=0.1,
                 what="the master to find the worker wedged")
    finally:
        os.close(lock)  # the stuck sibling lets go: the next attempt runs through
    assert re.search(rf"worker 1 \(pid {pid}\) is wedged: its main loop has been silent "
                     r"for \d+ s \(busy; limit 12 s\)", env.log_text()), env.log_text()[-3000:]
    # (the master logs the kill once it has reaped the worker, and the requeue after: wait)
    wait_for(lambda: f"worker 1 (pid {pid}) was killed: wedged" in env.log_text(), 15,
             interval=0.1, what="the kill logged")
    wait_for(lambda: re.search(rf"requeued 1 message\(s\) held by dead worker \S+:{pid}:\S+ "
                               r"\(attempt counted\)", env.log_text()), 15, interval=0.1,
             what="the requeue logged")
    # and a new worker does the job, whose crash was counted
    env.wait_finished(1, timeout=30)
    assert env.dead_letters() == [], env.log_text()[-3000:]
    (event,) = env.done_events()
    assert event["id"] == "wedge" and f":{pid}:" not in event["worker"]
    assert _metric(base, "clip_worker_exits_total", cause="wedged") == 1
    assert env.r.hget(env.keys.attempts, sha1(raw)) is None  # done: the count is cleared
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"workers": 1, "restart_backoff_max": 0.2}})
def test_a_slot_failing_at_boot_goes_fatal_until_hup(env):
    base = _listen(env)
    proc = env.start()
    (pid,) = env.wait_workers(proc, 1)
    assert _get(f"{base}/healthz")[0] == 200
    # Given every new worker fails at boot: its work folder cannot be created
    os.rename(env.work, env.work + ".moved")
    with open(env.work, "w") as fh:
        fh.write("not a folder")
    os.kill(pid, signal.SIGKILL)

    # Then after 10 failed starts in a row the slot gives up, and says so everywhere
    wait_for(lambda: "giving up on this slot (FATAL)" in env.log_text(), 30, interval=0.1,
             what="the slot to go FATAL")
    text = env.log_text()
    assert "worker 1 failed to start 10 times in a row (last: exited with code 4 (could not " \
           "start)): giving up on this slot (FATAL); fix the cause, then send HUP or TTIN" in text
    # the first worker (itself a failed start if killed before min_uptime), then the rest
    assert text.count("spawned worker") in (10, 11)
    status, body = _get(f"{base}/healthz")
    assert status == 503 and body.startswith("fatal: worker slot 1 failed to start 10 times")
    assert _metric(base, "clip_slots_fatal") == 1
    slots = json.loads(_get(f"{base}/api/slots")[1])
    assert [(f["slot"], f["failures"]) for f in slots["fatal"]] == [(1, 10)]
    assert env.workers(proc) == []

    # When the cause is fixed and the supervisor gets HUP, the slot starts again
    os.unlink(env.work)
    os.rename(env.work + ".moved", env.work)
    proc.send_signal(signal.SIGHUP)
    env.wait_workers(proc, 1, timeout=15)
    wait_for(lambda: _get(f"{base}/healthz")[0] == 200, 10, what="/healthz to be ok again")
    assert _metric(base, "clip_slots_fatal") == 0
    assert "HUP: worker slot(s) 1 out of FATAL: starting again" in env.log_text()
    assert env.stop(proc) == 0
