"""Transient failures and Redis outages: retried with backoff, nothing lost or doubled."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from tests.conftest import wait_for


@pytest.mark.settings({"job": {"max_attempts": 3, "retry_backoff": 0.2}})
def test_transient_errors_are_retried_with_backoff_then_dead_lettered(env):
    port = env.http.port
    env.push({"id": "flaky2", "url": f"http://127.0.0.1:{port}/flaky/2/a/ten.mp4",
              "duration": 2},
             {"id": "flaky9", "url": f"http://127.0.0.1:{port}/flaky/9/b/ten.mp4",
              "duration": 2})
    proc = env.start()
    env.wait_finished(2, timeout=30)
    # Recovered after two 503s; the other gave up after max_attempts with the last reason
    assert [e["id"] for e in env.done_events()] == ["flaky2"]
    (letter,) = env.dead_letters()
    assert (letter["id"], letter["reason"], letter["attempts"]) == \
        ("flaky9", "source_unavailable", 3)
    assert "HTTP 503" in letter["error"]
    assert env.r.zcard(env.keys.delayed) == 0 and env.r.hlen(env.keys.attempts) == 0
    log = env.log_text()
    assert log.count("job flaky2 failed (source_unavailable)") == 2
    assert env.stop(proc) == 0


def test_a_redis_outage_loses_nothing_and_kills_nobody(env):
    # Given jobs in flight, with Redis persisting to its append-only file
    env.r.config_set("appendonly", "yes")
    wait_for(lambda: env.r.info("persistence")["aof_rewrite_in_progress"] == 0
             and env.r.info("persistence")["aof_enabled"] == 1)
    env.redis.appendonly = True
    jobs = env.push(*[{"id": f"o{i}", "url": env.url("ten.mp4", slow=1.5), "duration": 2}
                      for i in range(4)])
    proc = env.start()
    env.wait_in_flight(jobs[0], jobs[1])
    pids = env.workers(proc)

    # When Redis goes away for ~3 s while they finish, then comes back
    env.redis.stop()
    time.sleep(3)
    env.redis.start()
    env.r = env.redis.client()

    # Then everything finishes exactly once, and the same processes did it
    env.wait_finished(4, timeout=60)
    assert sorted(e["id"] for e in env.done_events()) == ["o0", "o1", "o2", "o3"]
    assert sorted(os.listdir(env.out)) == ["o0.mp4", "o1.mp4", "o2.mp4", "o3.mp4"]
    assert env.workers(proc) == pids and proc.poll() is None
    assert "Redis unavailable" in env.log_text()
    assert all(not items for items in env.processing_lists().values())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_supervisor_starts_while_redis_is_down_and_serves_when_it_comes_up(env):
    env.redis.stop()
    proc = env.start()
    time.sleep(1.5)
    assert proc.poll() is None  # waiting, not crashing
    env.redis.start()
    env.r = env.redis.client()
    env.push({"id": "late", "url": env.url("ten.mp4"), "duration": 1})
    env.wait_finished(1, timeout=30)
    assert [e["id"] for e in env.done_events()] == ["late"]
    assert env.stop(proc) == 0


def test_an_idle_supervisor_stops_at_once_even_while_redis_is_down(env):
    proc = env.start()
    env.wait_workers(proc, 2)
    env.redis.stop()
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"stop took {elapsed:.2f} s with Redis down"


def test_an_ffmpeg_gone_after_start_pauses_the_host_not_the_video(env):
    # Given a supervisor started with an ffmpeg that then disappears (an upgrade, say)
    program = os.path.join(env.tmp, "ffmpeg")
    os.symlink(shutil.which("ffmpeg"), program)
    env.settings["job"].update({"ffmpeg": program, "max_attempts": 1})
    proc = env.start()
    env.wait_workers(proc, 2)
    os.unlink(program)
    # Then a job is neither blamed on the video nor dead-lettered: the host says why it
    # pauses, and gives the message back
    env.push({"id": "noffmpeg", "url": env.url("ten.mp4"), "duration": 1})
    wait_for(lambda: "host fault (ffmpeg_missing)" in env.log_text(), 20,
             what="the host to pause")
    assert program in env.log_text() and env.dead_letters() == []
    # And once ffmpeg is back the host resumes by itself and the job is done
    os.symlink(shutil.which("ffmpeg"), program)
    env.wait_finished(1, timeout=60)
    assert [e["id"] for e in env.done_events()] == ["noffmpeg"]
    assert env.stop(proc) == 0
