"""Many clips per job: one message with ``clips`` cuts them all from one read of its source.

The real supervisor with real ffmpeg reads generated videos from the loopback test server;
each clip ends as its own done event or dead letter, exactly once, and the message is
acknowledged when every clip has ended. A worker SIGKILLed halfway leaves the clips it
stored alone: the requeued copy cuts only the others. The bytes the server sends for one job
of N clips are compared with N jobs of one clip."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import ffprobe_duration, wait_for

NO_CACHE = {"job": {"cache_max_bytes": 0}}


def _stream(env) -> list[dict]:
    """Every entry of the event stream, decoded."""
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in env.r.xrange(env.keys.events)]


def _terminal(env, job_id: str) -> list[dict]:
    """The stream's done, dead and cancelled entries of ``job_id``'s clips."""
    return [e for e in _stream(env) if e.get("job") == job_id
            and e["type"] in ("done", "dead", "cancelled")]


def _acknowledged(env) -> bool:
    return not any(env.processing_lists().values()) and env.r.llen(env.keys.queue) == 0


@pytest.mark.settings(NO_CACHE)
def test_a_ten_clip_job_with_one_bad_range_has_that_clip_dead_and_the_others_done(env):
    # Given a supervisor and a job of ten clips of one source, the fourth with an inverted
    # range, all with a callback
    proc = env.start()
    env.wait_workers(proc, 2)
    clips = [{"start": n, "duration": 1} for n in range(10)]
    clips[3] = {"id": "backwards", "start": 5, "end": 2}
    env.push({"id": "match", "url": env.url("twenty.mp4"), "clips": clips,
              "callback": "http://127.0.0.1:9/hook"})

    # When it has run
    env.wait_finished(10)
    wait_for(lambda: _acknowledged(env), 10, what="the message acknowledged")

    # Then that clip alone is a dead letter (bad_range, naming its job), whose message is the
    # clip as a job of its own
    dead = env.dead_letters()
    assert [(d["id"], d["job"], d["reason"]) for d in dead] == [("backwards", "match",
                                                                 "bad_range")]
    assert json.loads(dead[0]["message"]) == {
        "id": "backwards", "url": env.url("twenty.mp4"), "mode": "copy", "format": "mp4",
        "start": 5, "end": 2, "callback": "http://127.0.0.1:9/hook"}
    # and the nine others are done, each once, each stored in a file of its own
    done = env.done_events()
    ids = sorted(d["id"] for d in done)
    assert ids == sorted(f"match-{n}" for n in (1, 2, 3, 5, 6, 7, 8, 9, 10))
    for event in done:
        assert event["job"] == "match"
        path = os.path.join(env.out, f"{event['id']}.mp4")
        assert 0.5 < ffprobe_duration(path) < 2.5
    # and the stream has exactly one terminal entry per clip, naming clip and job, with the
    # callback (the webhook deliverer sends each on its own)
    terminal = _terminal(env, "match")
    assert sorted(e["id"] for e in terminal) == sorted([*ids, "backwards"])
    assert [e for e in terminal if e["callback"] != "http://127.0.0.1:9/hook"] == []
    # and the job's hash tells its clips' outcomes; the message was acknowledged once
    job = env.r.hgetall(env.keys.job("match"))
    assert job[b"state"] == b"done" and job[b"clips_done"] == b"9"
    assert job[b"clips_dead"] == b"1" and len(json.loads(job[b"clips"])) == 10
    assert env.r.hlen(env.keys.attempts) == 0
    assert env.stop(proc) == 0
    assert env.work_leftovers() == []


@pytest.mark.settings(NO_CACHE)
def test_a_worker_killed_after_five_clips_leaves_only_the_others_to_redo(env):
    # Given a job of ten clips read slowly through a paced server (each clip takes a while)
    proc = env.start()
    env.wait_workers(proc, 2)
    size = os.path.getsize(os.path.join(env.http.directory, "twenty.mp4"))
    rate = size // 8  # bytes/s: the whole source would take 8 s
    url = f"http://127.0.0.1:{env.http.port}/paced/{rate}/kill/twenty.mp4"
    clips = [{"start": 2 * n, "duration": 0.5} for n in range(10)]
    [raw] = env.push({"id": "halfway", "url": url, "clips": clips})
    [pid] = env.wait_in_flight(raw)

    # When its worker is SIGKILLed once five clips are stored and recorded
    wait_for(lambda: env.r.hlen(env.keys.clips("halfway")) >= 5, 60, interval=0.01,
             what="five clips recorded")
    os.kill(pid, signal.SIGKILL)
    before = {k.decode() for k in env.r.hkeys(env.keys.clips("halfway"))}
    assert 5 <= len(before) < 10

    # Then the requeued message is taken again and finishes the others
    env.wait_finished(10, timeout=90)
    wait_for(lambda: _acknowledged(env), 20, what="the message acknowledged")
    done = env.done_events()
    assert sorted(d["id"] for d in done) == sorted(f"halfway-{n}" for n in range(1, 11))
    # the clips recorded before the kill were cut by the killed worker and never again
    killed = {d["id"] for d in done if f":{pid}:" in d["worker"]}
    assert before <= killed
    redone = {d["id"] for d in done if f":{pid}:" not in d["worker"]}
    assert redone and not redone & before
    # one terminal event per clip, over both runs
    terminal = _terminal(env, "halfway")
    assert sorted(e["id"] for e in terminal) == sorted(d["id"] for d in done)
    # the crash was counted on the message, which was then acknowledged
    started = [json.loads(e["event"]) for e in _stream(env)
               if e["type"] == "started" and e["id"] == "halfway"]
    assert [s["attempt"] for s in started] == [1, 2]
    assert env.r.hget(env.keys.job("halfway"), "state") == b"done"
    assert env.stop(proc) == 0
