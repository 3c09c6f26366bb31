"""What an operator sees: process titles, live progress, stats, metrics."""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from tests.conftest import wait_for


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\x00", b" ").decode().strip()


def test_process_titles_show_role_job_stage_and_progress(env):
    (raw,) = env.push({"id": "titled-job", "url": env.url("ten.mp4", slow=3), "duration": 1})
    proc = env.start()
    wait_for(lambda: "[workers 2/2]" in _cmdline(proc.pid), what="master title")
    assert _cmdline(proc.pid).startswith("clip-supervisor: master [workers 2/2]")
    busy = wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    wait_for(lambda: "job titled-job" in _cmdline(busy), what="the busy worker's title")
    assert " fetch " in _cmdline(busy) and _cmdline(busy).startswith("clip-supervisor: worker ")
    (idle,) = [pid for pid in env.workers(proc) if pid != busy]
    wait_for(lambda: _cmdline(idle).endswith(" idle"), what="the idle worker's title")
    assert _cmdline(idle).startswith("clip-supervisor: worker ")
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"encode_preset": "slower"}})  # several progress reports
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


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_text = key.partition("{")
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric == name and got == want:
            return float(value)
    return 0.0


def test_metrics_and_health_after_real_jobs(env):
    from tests.conftest import free_port

    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    env.push(*[{"id": f"ok{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(5)],
             {"id": "gone", "url": env.url("missing.mp4")}, b"{not json")
    env.push(*[{"id": f"later{i}", "url": env.url("ten.mp4"), "duration": 1}
               for i in range(3)])
    proc = env.start()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(base + "/healthz")[0] == 200, 10, what="healthz 200")
    env.wait_finished(10)
    # A worker counts a job just after its ack: wait for the counters to catch up
    wait_for(lambda: _sample(_get(base + "/metrics")[1], "clip_jobs_total",
                             outcome="done") == 8, 10, what="8 done jobs counted")
    wait_for(lambda: _sample(_get(base + "/metrics")[1], "clip_jobs_total",
                             outcome="dead") == 2, 10, what="2 dead jobs counted")
    pids = env.workers(proc)
    os.kill(pids[0], 9)  # one crash, counted by cause
    wait_for(lambda: len(env.workers(proc)) == 2 and pids[0] not in env.workers(proc))
    status, text = _get(base + "/metrics")
    assert status == 200
    assert _sample(text, "clip_jobs_total", outcome="done") == 8
    assert _sample(text, "clip_jobs_total", outcome="dead") == 2
    assert _sample(text, "clip_dead_letters_total", reason="not_found") == 1
    assert _sample(text, "clip_dead_letters_total", reason="invalid_json") == 1
    assert _sample(text, "clip_job_duration_seconds_count") == 8
    assert _sample(text, "clip_stage_duration_seconds_count", stage="clip") == 8
    assert _sample(text, "clip_source_bytes_total") > 0
    assert _sample(text, "clip_output_bytes_total") > 0
    assert _sample(text, "clip_worker_exits_total", cause="sigkill") == 1
    assert _sample(text, "clip_queue_length", queue="done") == 8
    assert _sample(text, "clip_queue_length", queue="dead") == 2
    assert _sample(text, "clip_queue_length", queue="queue") == 0
    assert _sample(text, "clip_redis_up") == 1
    # the master counts the restarted worker alive once it has booted: wait for it
    wait_for(lambda: _sample(_get(base + "/metrics")[1], "clip_workers_alive") == 2, 10,
             what="the restarted worker counted alive")
    # Redis down: /healthz says so, /metrics still answers
    env.redis.stop()
    status, body = _get(base + "/healthz")
    assert status == 503 and "redis" in body
    assert _sample(_get(base + "/metrics")[1], "clip_redis_up") == 0
    env.redis.start()
    env.r = env.redis.client()
    wait_for(lambda: _get(base + "/healthz")[0] == 200, 10, what="healthz back to 200")
    # The workers' counter files live in a private folder in memory, not on work_dir's
    # disk (where a full file system turns a write to them into SIGBUS); gone after a stop
    (folder,) = glob.glob(f"/dev/shm/clip-supervisor-metrics-{proc.pid}-*")
    assert os.stat(folder).st_mode & 0o777 == 0o700 and not os.path.exists(
        os.path.join(env.work, "metrics"))
    assert os.listdir(folder)
    assert env.stop(proc) == 0
    assert not os.path.exists(folder)


def test_enqueue_wait_follows_the_job_to_its_end(env):
    proc = env.start()
    env.wait_workers(proc, 2)
    done = env.cli("enqueue", env.url("ten.mp4", slow=1), "--start", "2", "--duration", "3",
                   "--mode", "encode", "--id", "waited", "--wait", "--timeout", "60")
    lines = done.stdout.splitlines()
    assert lines[0] == "waited"
    assert any(line.startswith("waited fetch") for line in lines)
    assert lines[-1] == f"done: file://{env.out}/waited.mp4"
    assert os.path.exists(os.path.join(env.out, "waited.mp4"))
    dead = env.cli("enqueue", env.url("missing.mp4"), "--id", "nope", "--wait", check=False)
    assert dead.returncode == 2
    assert dead.stdout.splitlines()[-1].startswith("dead (not_found): HTTP 404")
    refused = env.cli("enqueue", "ftp://127.0.0.1/x.mp4", check=False)
    assert refused.returncode == 1 and "scheme_not_allowed" in refused.stderr
    assert env.stop(proc) == 0


def test_enqueue_wait_draws_a_progress_bar_on_a_terminal(env):
    import pty
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = env.start()
    env.wait_workers(proc, 2)
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "supervisor", "enqueue",
                              env.url("ten.mp4", slow=1), "--duration", "2", "--wait",
                              "--config", env.conf], cwd=ROOT, stdout=follower,
                             stderr=subprocess.PIPE)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        output += chunk
    assert child.wait(30) == 0
    text = output.decode()
    assert "\r" in text and "[####################] 100.0%" in text
    assert "done: file://" in text
    assert env.stop(proc) == 0
