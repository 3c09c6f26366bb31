"""The producer's client, clip_supervisor.Client, against a real Redis and a real supervisor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clip_supervisor import Client, JobDead, JobRefused
from tests.conftest import ROOT
from worker.protocol import JobState


def _client(env) -> Client:
    # The daemon's own configuration: its output_base and allow_private_networks.
    return Client(env.redis.url, config_file=env.conf)


def test_a_job_is_enqueued_followed_and_its_outcome_returned(env):
    client = _client(env)
    # Given a job enqueued while no supervisor runs
    job = client.enqueue(env.url("ten.mp4"), start=1, duration=2, id="first")
    assert job.id == "first" and job.position
    assert job.status()["state"] is JobState.QUEUED
    assert json.loads(env.r.lindex(env.keys.queue, 0)) == {
        "url": env.url("ten.mp4"), "id": "first", "start": 1, "duration": 2}
    # Then waiting runs out of time
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.3)

    # When the supervisor runs it
    proc = env.start()
    done = job.wait(timeout=60)
    # Then wait returns its completion event, as the done list has it
    assert done == env.done_events()[0]
    assert done["output"] == f"file://{env.out}/first.mp4" and done["duration"] > 1.5
    status = job.status()
    assert status["state"] is JobState.DONE and status["output"] == done["output"]
    # and a handle made later from the id finds the same end
    assert client.job("first").wait(timeout=5) == done

    # A job that fails for good raises, with the dead letter's reason
    missing = client.enqueue(env.url("missing.mp4"), id="missing")
    with pytest.raises(JobDead) as dead:
        missing.wait(timeout=60)
    assert dead.value.reason == "not_found" and "404" in dead.value.error
    assert dead.value.letter["id"] == "missing" and "message" not in dead.value.letter
    assert env.stop(proc) == 0


def test_a_job_a_worker_would_refuse_is_refused_at_enqueue_with_its_reason(env):
    client = _client(env)
    for kwargs, reason in (({"url": "ftp://127.0.0.1/x.mp4"}, "scheme_not_allowed"),
                           ({"url": env.url("ten.mp4"), "end": 5, "duration": 2}, "bad_range"),
                           ({"url": env.url("ten.mp4"), "mode": "fast"}, "bad_mode"),
                           ({"url": env.url("ten.mp4"), "id": "a b"}, "bad_id"),
                           ({"url": env.url("ten.mp4"), "callback": "ftp://x/"},
                            "bad_callback")):
        with pytest.raises(JobRefused) as refused:
            client.enqueue(**kwargs)
        assert refused.value.reason == reason
        assert isinstance(refused.value, ValueError)
    # and nothing reached Redis
    assert env.r.llen(env.keys.queue) == 0 and env.r.xlen(env.keys.events) == 0
    # The built-in defaults refuse what this daemon allows (a private address)
    with pytest.raises(JobRefused) as private:
        Client(env.redis.url).enqueue("file:///etc/passwd")
    assert private.value.reason == "scheme_not_allowed"


def test_many_jobs_are_enqueued_in_one_round_trip(env):
    client = _client(env)
    env.r.config_resetstat()
    jobs = client.enqueue_many([{"url": env.url("ten.mp4"), "duration": 1, "id": f"m{n}",
                                 "mode": "copy"} for n in range(5)])
    stats = env.r.info("commandstats")
    assert stats["cmdstat_multi"]["calls"] == 1 and stats["cmdstat_exec"]["calls"] == 1
    assert stats["cmdstat_lpush"]["calls"] == 5 and stats["cmdstat_xadd"]["calls"] == 5
    assert [job.id for job in jobs] == [f"m{n}" for n in range(5)]
    assert len({job.position for job in jobs}) == 5
    # A refused job in the batch queues none of them
    with pytest.raises(JobRefused, match="job 1: "):
        client.enqueue_many([{"url": env.url("ten.mp4")}, {"url": "nope"}])
    assert env.r.llen(env.keys.queue) == 5

    proc = env.start()
    outputs = [job.wait(timeout=60)["output"] for job in jobs]
    assert outputs == [f"file://{env.out}/m{n}.mp4" for n in range(5)]
    # Every event of the five is in the stream, in the order they happened
    seen = [(e.type, e.job_id) for e in client.events(after="0", timeout=0.5)]
    for job in jobs:
        kinds = [kind for kind, job_id in seen if job_id == job.id]
        assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    assert env.stop(proc) == 0


def test_importing_the_client_touches_none_of_the_daemons_heavy_dependencies(redis_server):
    code = ("import sys\n"
            "import clip_supervisor\n"
            "assert 'clip_supervisor.client' not in sys.modules\n"
            "from clip_supervisor import Client\n"
            f"job = Client({redis_server.url!r}).enqueue('https://example.com/a.mp4', "
            "duration=3)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('google', "
            "'prometheus_client', 'psutil', 'setproctitle', 'supervisor'))\n"
            "print(job.id, heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    job_id, heavy = done.stdout.split(" ", 1)
    assert heavy.strip() == "[]"
    assert redis_server.client().hget("{clips}:job:" + job_id, "state") == b"queued"
