"""The main job, end to end: real supervisor, real workers, real Redis, ffmpeg and HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import time

from tests.conftest import ffprobe_duration, wait_for


def test_twenty_mixed_jobs_through_two_workers(env):
    # Given 20 jobs: bare URLs and JSON, copy and encode, various ranges
    messages = []
    expected = {}  # job id -> (mode, length)
    for i in range(20):
        if i % 5 == 0:
            raw = env.url("ten.mp4") + f"?n={i}"  # bare URL: the whole 10 s video
            job_id = hashlib.sha1(raw.encode()).hexdigest()
            expected[job_id] = ("copy", 10.0)
        else:
            mode = "encode" if i % 2 else "copy"
            start, length = (i % 7) + 0.4, 1.5 + (i % 3)
            raw = json.dumps({"id": f"job-{i}", "url": env.url("twenty.mp4"), "start": start,
                              "duration": length, "mode": mode})
            job_id = f"job-{i}"
            expected[job_id] = (mode, length)
        messages.append(raw)
    env.push(*messages)

    # When the supervisor runs them with 2 workers
    proc = env.start()
    env.wait_finished(20, timeout=120)
    assert env.stop(proc) == 0

    # Then every job is done exactly once, its output exists once, with the right duration
    assert env.dead_letters() == []
    events = env.done_events()
    assert sorted(e["id"] for e in events) == sorted(expected)
    outputs = sorted(os.listdir(env.out))
    assert outputs == sorted(f"{job_id}.mp4" for job_id in expected)
    for job_id, (mode, length) in expected.items():
        duration = ffprobe_duration(os.path.join(env.out, f"{job_id}.mp4"))
        tolerance = 0.1 if mode == "encode" else 1.0  # copy: within one GOP (1 s here)
        assert abs(duration - length) <= tolerance, (job_id, mode, duration, length)
        state = env.r.hgetall(env.keys.job(job_id))
        assert state[b"state"] == b"done" and state[b"progress"] == b"100"
        assert state[b"output"] == f"file://{env.out}/{job_id}.mp4".encode()
    # Both workers took part, nothing is left in flight, no temp file anywhere
    assert len({e["worker"] for e in events}) == 2
    assert env.r.llen(env.keys.queue) == 0
    assert all(not items for items in env.processing_lists().values())
    assert env.work_leftovers() == []
    # One log line per finished job, naming its id
    log = env.log_text()
    for job_id in expected:
        assert sum(1 for line in log.splitlines() if f"job {job_id} done" in line) == 1


def test_idle_supervisor_stops_in_under_a_second(env):
    env.settings["supervisor"]["workers"] = 4
    proc = env.start()
    env.wait_workers(proc, 4)
    started = time.monotonic()
    code = env.stop(proc)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 1.0, f"idle stop took {elapsed:.3f} s"
    assert env.r.hlen(env.keys.workers) == 0


def test_progress_and_stage_timings_are_recorded(env):
    # One source read in place ("fetch" lasts until ffmpeg has read its index), one
    # downloaded first (a server that ignores Range)
    env.push({"id": "timed", "url": env.url("twenty.mp4"), "start": 2, "duration": 6,
              "mode": "encode"},
             {"id": "fetched", "url": f"http://127.0.0.1:{env.http.port}/norange/ten.mp4",
              "duration": 2})
    proc = env.start()
    env.wait_finished(2)
    env.stop(proc)
    reads = {e["id"]: e["source_read"] for e in env.done_events()}
    assert reads == {"timed": "ranges", "fetched": "download"}
    for job in ("timed", "fetched"):
        state = {k.decode(): v.decode() for k, v in env.r.hgetall(env.keys.job(job)).items()}
        assert state["state"] == "done" and state["progress"] == "100"
        assert sorted(k for k in state if k.startswith("time_")) == \
            ["time_clip", "time_fetch", "time_store"], state
        assert all(float(state[f"time_{stage}"]) >= 0 for stage in ("fetch", "clip", "store"))
        assert env.r.ttl(env.keys.job(job)) > 0


def test_a_job_submitted_again_later_gets_a_new_done_event(env):
    # Given a job that completed
    job = {"id": "again", "url": env.url("ten.mp4"), "duration": 1}
    env.push(job)
    proc = env.start()
    env.wait_finished(1)
    # When the same job is submitted again, it runs again and reports again
    env.push(job)
    wait_for(lambda: env.r.llen(env.keys.done) == 2, 30, what="a second done event")
    assert [e["id"] for e in env.done_events()] == ["again", "again"]
    assert env.stop(proc) == 0
