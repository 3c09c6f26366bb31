"""The chaos soak: 200 jobs while workers are SIGKILLed every ~0.5 s and Redis restarts twice.

Afterwards every job is done exactly once or dead-lettered with a reason, the queues and
processing lists are empty, no worker or ffmpeg process is left, and no temporary file
remains. Run it alone with ``./scripts/test.sh -m slow -s`` to see the counts.
"""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest
import redis

from tests.conftest import wait_for

JOBS = 200


def _enable_aof(env) -> None:
    env.r.config_set("appendonly", "yes")
    wait_for(lambda: env.r.info("persistence")["aof_rewrite_in_progress"] == 0
             and env.r.info("persistence")["aof_enabled"] == 1, what="AOF enabled")
    env.redis.appendonly = True


def _restart_redis(env) -> None:
    env.redis.stop()  # SIGTERM: Redis fsyncs its AOF before exiting
    time.sleep(0.3)
    env.redis.start()
    env.r = env.redis.client()


def _finished(env) -> int:
    try:
        return env.finished()
    except (redis.ConnectionError, redis.TimeoutError):
        return -1


@pytest.mark.slow
@pytest.mark.settings({
    "supervisor": {"workers": 2, "min_uptime": 0.05, "restart_backoff_max": 1,
                   "heartbeat_interval": 0.5, "heartbeat_ttl": 2, "log_level": "info"},
    "job": {"max_attempts": 6, "retry_backoff": 0.1, "retry_backoff_max": 1},
})
@pytest.mark.parametrize("kill_supervisor", [False, True],
                         ids=["workers-killed", "supervisor-killed-too"])
def test_chaos_soak(env, kill_supervisor):
    _enable_aof(env)
    ids = [f"c{i:03d}" for i in range(JOBS)]
    env.push(*[{"id": job_id, "url": env.url("ten.mp4"), "start": i % 8, "duration": 1,
                "mode": "encode" if i % 10 == 0 else "copy"} for i, job_id in enumerate(ids)])
    rng = random.Random(1234)
    proc = env.start()
    masters = [proc]
    restarts, kills, master_killed = 0, 0, False
    seen_workers: set[int] = set()
    deadline = time.monotonic() + 240
    next_kill = time.monotonic() + 0.5
    while (done := _finished(env)) < JOBS:
        assert time.monotonic() < deadline, f"soak stuck at {done}/{JOBS}"
        if restarts < 2 and done >= (60, 130)[restarts]:
            _restart_redis(env)
            restarts += 1
        if kill_supervisor and not master_killed and done >= 100:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
            master_killed = True
            proc = env.start()
            masters.append(proc)
        if time.monotonic() >= next_kill:
            pids = env.workers(proc)
            seen_workers.update(pids)
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            next_kill = time.monotonic() + rng.uniform(0.3, 0.7)
        time.sleep(0.02)
    assert env.stop(proc) == 0

    events = env.done_events()
    letters = env.dead_letters()
    done_ids = [e["id"] for e in events]
    dead_ids = [d["id"] for d in letters]
    reasons: dict[str, int] = {}
    for letter in letters:
        reasons[letter["reason"]] = reasons.get(letter["reason"], 0) + 1
    print(f"\nchaos ({'supervisor killed too' if kill_supervisor else 'workers killed'}): "
          f"{len(set(done_ids))} done, {len(dead_ids)} dead {reasons}, {kills} workers "
          f"SIGKILLed, {restarts} Redis restarts, "
          f"{sum(int(v) for v in env.r.hvals(env.keys.attempts) or [0])} attempts pending")

    # Every job ended exactly once: done once, or dead once with a reason, never both.
    assert len(done_ids) == len(set(done_ids))
    assert len(dead_ids) == len(set(dead_ids))
    assert sorted(done_ids + dead_ids) == ids
    assert all(d["reason"] for d in letters)
    assert restarts == 2 and kills >= 10 and (master_killed or not kill_supervisor)
    # Nothing left in any queue or processing list
    k = env.keys
    assert (env.r.llen(k.queue), env.r.llen(k.retry), env.r.zcard(k.delayed)) == (0, 0, 0)
    assert all(not items for items in env.processing_lists().values())
    # Outputs: one per done job, no partial or temporary file anywhere
    assert sorted(os.listdir(env.out)) == sorted(f"{i}.mp4" for i in done_ids)
    assert env.work_leftovers() == []
    # No worker or ffmpeg process of ours is left
    for master in masters:
        assert master.poll() is not None
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert len(seen_workers) > kills // 2
    wait_for(lambda: not [pid for pid in seen_workers if alive(pid)], 5,
             what="every worker to be gone")
    leftovers = [p.info for p in psutil.process_iter(["pid", "name", "cmdline"])
                 if env.tmp in " ".join(p.info["cmdline"] or []) and alive(p.info["pid"])]
    assert leftovers == []  # ffmpeg/ffprobe name their files under the test's folder
