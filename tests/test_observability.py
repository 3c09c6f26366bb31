"""What an operator sees: process titles, live progress, stats, metrics."""

from __future__ import annotations

import json
import os
import time

import pytest

from supervisor.sample import make_video
from tests.conftest import wait_for


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\x00", b" ").decode().strip()


@pytest.fixture(scope="module")
def heavy_video(media_dir) -> str:
    path = os.path.join(media_dir, "heavy.mp4")
    if not os.path.exists(path):
        make_video(path, 12, size="960x540", bitrate="3M")
    return "heavy.mp4"


def test_process_titles_show_role_job_stage_and_progress(env):
    (raw,) = env.push({"id": "titled-job", "url": env.url("ten.mp4", slow=3), "duration": 1})
    proc = env.start()
    wait_for(lambda: "[workers 2/2]" in _cmdline(proc.pid), what="master title")
    assert _cmdline(proc.pid).startswith("clip-supervisor: master [workers 2/2]")
    busy = wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    wait_for(lambda: "job titled-job" in _cmdline(busy), what="the busy worker's title")
    assert " fetch " in _cmdline(busy) and _cmdline(busy).startswith("clip-supervisor: worker ")
    (idle,) = [pid for pid in env.workers(proc) if pid != busy]
    assert _cmdline(idle).endswith(" idle")
    assert env.stop(proc) == 0


def test_progress_in_the_job_hash_rises_to_100_during_an_encode(env, heavy_video):
    env.push({"id": "enc", "url": env.url(heavy_video), "mode": "encode"})
    proc = env.start()
    seen: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = env.r.hmget(env.keys.job("enc"), "state", "progress", "stage")
        if state[1] is not None and state[2] == b"clip" or state[0] == b"done":
            value = float(state[1] or 0)
            if not seen or value != seen[-1]:
                seen.append(value)
        if state[0] == b"done":
            break
        time.sleep(0.05)
    assert seen[-1] == 100.0
    assert seen == sorted(seen), seen  # never goes backwards
    assert len([v for v in seen if 0 < v < 100]) >= 2, seen  # seen in the middle, live
    job = env.r.hgetall(env.keys.job("enc"))
    assert job[b"speed"].endswith(b"x")
    assert env.stop(proc) == 0


def test_stats_json_matches_redis(env):
    env.push(*[{"id": f"s{i}", "url": env.url("ten.mp4", slow=3), "duration": 1}
               for i in range(4)])
    env.r.lpush(env.keys.dead, json.dumps({"id": "x", "reason": "bad_range"}))
    proc = env.start()
    wait_for(lambda: len([m for items in env.processing_lists().values() for m in items]) == 2,
             what="two jobs in flight")
    wait_for(lambda: all(json.loads(v).get("job") for v in env.r.hvals(env.keys.workers)),
             what="heartbeats naming the jobs")
    data = json.loads(env.cli("stats", "--json").stdout)
    assert data["queues"] == {"queue": env.r.llen(env.keys.queue), "retry": 0, "delayed": 0,
                              "dead": 1, "done": env.r.llen(env.keys.done)}
    registry = {k.decode(): json.loads(v) for k, v in env.r.hgetall(env.keys.workers).items()}
    assert {w["id"] for w in data["workers"]} == set(registry)
    for worker in data["workers"]:
        assert worker["pid"] == registry[worker["id"]]["pid"]
        assert worker["alive"] and worker["holding"] == 1
        assert worker["job"] in {"s0", "s1", "s2", "s3"}
        assert worker["stage"] == "fetch"
    table = env.cli("stats").stdout
    assert "dead 1" in table and table.count("fetch") == 2
    assert env.stop(proc) == 0
