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

from supervisor.sample import make_video
from tests.conftest import ffprobe_duration, wait_for

NO_CACHE = {"job": {"cache_max_bytes": 0}}
LONG = "long40.mp4"  # 40 s at 2 Mbit/s (~10 MB): clips are a small share of it


@pytest.fixture(scope="module")
def long_video(media_dir) -> int:
    """The long source in the test server's folder; its size."""
    path = os.path.join(media_dir, LONG)
    if not os.path.exists(path):
        make_video(path, 40, size="640x360", bitrate="2M")
    return os.path.getsize(path)


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
    from supervisor.webhooks import build

    deliveries = [build(f"1-{n}", e, "") for n, e in enumerate(terminal)]
    assert sorted(d.job_id for d in deliveries if d is not None) == sorted(e["id"]
                                                                          for e in terminal)
    assert all(json.loads(d.body)["event"]["job"] == "match" for d in deliveries if d)
    # and the job's hash tells its clips' outcomes; the message was acknowledged once
    job = env.r.hgetall(env.keys.job("match"))
    assert job[b"state"] == b"done" and job[b"clips_done"] == b"9"
    assert job[b"clips_dead"] == b"1" and len(json.loads(job[b"clips"])) == 10
    assert env.r.hlen(env.keys.attempts) == 0
    # and stats count its clips among the done and dead
    stats = json.loads(env.cli("stats", "--json").stdout)
    assert (stats["queues"]["done"], stats["queues"]["dead"]) == (9, 1), stats
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


def _paced(env, key: str) -> str:
    """The long video through the paced route (fast here), its bytes sent counted per key."""
    return f"http://127.0.0.1:{env.http.port}/paced/100000000/{key}/{LONG}"


@pytest.mark.settings(NO_CACHE)
def test_one_job_of_ten_clips_reads_the_source_about_once_where_ten_jobs_read_it_twice(
        env, long_video):
    # Given a 40 s source on a Range server that counts the bytes it sends, and no host cache
    size = long_video
    proc = env.start()
    env.wait_workers(proc, 2)

    # When ten 4 s clips covering all of it run as one job, and as ten jobs
    spans = [{"start": 4 * n, "duration": 4} for n in range(10)]
    env.push({"id": "one", "url": _paced(env, "one"), "clips": spans})
    env.wait_finished(10)
    env.push(*[{"id": f"single-{n}", "url": _paced(env, "ten"), **span}
               for n, span in enumerate(spans)])
    env.wait_finished(20)

    # Then the job read its first clip in place (which told the size and duration), found
    # the rest worth the whole source, downloaded it once and cut the others from that copy
    reads = {d["id"]: d.get("source_read") for d in env.done_events() if d.get("job") == "one"}
    assert reads["one-1"] == "ranges" and list(reads.values()).count("download") == 1
    assert sorted(reads.values()).count("shared") == 8
    one, ten = env.http.sent["one"], env.http.sent["ten"]
    assert one <= 1.5 * size < ten, (one, ten, size)
    assert sum(d["source_bytes"] for d in env.done_events() if d.get("job") == "one") \
        <= one
    assert env.stop(proc) == 0


@pytest.mark.settings(NO_CACHE)
def test_a_few_short_clips_of_one_job_read_only_their_shares(env, long_video):
    # Given the same source and a job of three 2 s clips (far less than the whole)
    size = long_video
    proc = env.start()
    env.wait_workers(proc, 2)

    # When it runs
    env.push({"id": "few", "url": _paced(env, "few"),
              "clips": [{"start": 5, "duration": 2}, {"start": 18, "duration": 2},
                        {"start": 31, "duration": 2}]})
    env.wait_finished(3)

    # Then each clip was read in place, and all three together read less than half the
    # source (3 x 2 s of 40 s: 15 %, and what ffmpeg reads around each)
    done = env.done_events()
    assert sorted(d["source_read"] for d in done) == ["ranges"] * 3
    assert sum(d["source_bytes"] for d in done) <= env.http.sent["few"] < 0.5 * size
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"cache_max_bytes": 0, "range_requests": "false"}})
def test_without_range_requests_a_job_downloads_its_source_once_for_all_its_clips(
        env, long_video):
    # Given whole downloads only, and no host cache
    size = long_video
    proc = env.start()
    env.wait_workers(proc, 2)

    # When a job of five clips runs
    env.push({"id": "whole", "url": _paced(env, "whole"),
              "clips": [{"start": 3 * n, "duration": 1} for n in range(5)]})
    env.wait_finished(5)

    # Then the source was sent once, and the clips after the first shared that copy
    assert env.http.sent["whole"] == size
    assert sorted(d["source_read"] for d in env.done_events()) == ["download"] + \
        ["shared"] * 4
    assert env.stop(proc) == 0


# --- intake: pure ----------------------------------------------------------------------------


def _config(**job: object):
    from worker.config import load

    return load(None, env={}, overrides={"storage.output_base": "file:///srv/clips",
                                         **{f"job.{k}": str(v) for k, v in job.items()}})


def _intake(message: dict, **job: object):
    from worker.job import intake

    return intake(json.dumps(message).encode(), _config(**job))


def test_intake_names_clips_and_makes_each_a_job_of_its_own():
    from worker.job import BadClip, Job, Rejected, intake

    # Given a job of three clips: one named, one with its own format, one with a bad range
    job = _intake({"id": "talk", "url": "https://cdn.example.com/t.mp4", "mode": "encode",
                   "clips": [{"start": 1, "duration": 2}, {"id": "intro", "start": 0, "end": 5,
                                                           "format": "mkv", "extra": 1},
                             {"start": 9, "end": 3}]})
    assert isinstance(job, Job) and job.id == "talk"
    first, intro, bad = job.clips
    # Then the clips are named <job id>-<n> by default, take the job's mode, and have their
    # own outputs under output_base
    assert (first.id, first.start, first.end, first.mode, first.job) == ("talk-1", 1, 3,
                                                                         "encode", "talk")
    assert first.output == "file:///srv/clips/talk-1.mp4"
    assert (intro.id, intro.format, intro.output) == ("intro", "mkv",
                                                      "file:///srv/clips/intro.mkv")
    assert job.warnings == ("clip intro: unknown field 'extra' ignored",)
    # and the bad one is that clip's dead letter to be, with the single job's reason
    assert isinstance(bad, BadClip) and (bad.id, bad.error.reason) == ("talk-3", "bad_range")
    # and each clip's message, replayed alone, is the very same clip
    again = intake(first.raw, _config())
    assert isinstance(again, Job) and (again.id, again.start, again.end, again.output,
                                       again.mode) == (first.id, 1, 3, first.output, "encode")
    assert isinstance(intake(bad.raw, _config()), Rejected)


@pytest.mark.parametrize(("message", "reason"), [
    ({"clips": []}, "bad_clips"),
    ({"clips": {"start": 1}}, "bad_clips"),
    ({"clips": [{"start": 1}, 5]}, "bad_clips"),
    ({"start": 2, "clips": [{"start": 1}]}, "bad_clips"),
    ({"output": "x.mp4", "clips": [{"start": 1}]}, "bad_clips"),
    ({"clips": [{"id": "a"}, {"id": "a"}]}, "bad_id"),
    ({"id": "j", "clips": [{"id": "j-2"}, {}]}, "bad_id"),  # the default of clip 2 is taken
    ({"id": "j", "clips": [{"id": "j"}]}, "bad_id"),
    ({"clips": [{"id": "no spaces"}]}, "bad_id"),
    ({"mode": "fast", "clips": [{"start": 1}]}, "bad_mode"),
    ({"clips": [{"start": n} for n in range(4)]}, "too_many_clips"),
])
def test_intake_refuses_a_message_whose_clips_list_is_wrong_as_a_whole(message, reason):
    from worker.job import Rejected

    # Given max_clips = 3, when a message is wrong as a whole, then it is one refusal
    got = _intake({"url": "https://cdn.example.com/t.mp4", **message}, max_clips=3)
    assert isinstance(got, Rejected) and got.error.reason == reason, got


def test_intake_dead_letters_a_bad_clip_alone_with_a_single_jobs_reason():
    from worker.job import BadClip, Job

    job = _intake({"url": "https://cdn.example.com/t.mp4", "clips": [
        {"start": -1}, {"start": 1, "end": 2, "duration": 1}, {"mode": "fast"},
        {"format": "avi"}, {"output": "../escape.mp4"}, {"output": "same.mp4"},
        {"output": "same.mp4"}, {"start": 3, "duration": 1}]}, max_clips=8)
    assert isinstance(job, Job)
    reasons = [c.error.reason if isinstance(c, BadClip) else "ok" for c in job.clips]
    assert reasons == ["bad_range", "bad_range", "bad_mode", "bad_format",
                       "output_not_allowed", "ok", "output_not_allowed", "ok"]


def test_the_default_clip_id_stays_an_id_for_the_longest_job_id():
    from worker.job import ID_RE, clip_id

    assert clip_id("talk", 3) == "talk-3"
    long = clip_id("x" * 128, 100)
    assert ID_RE.fullmatch(long) and long.endswith("-100") and long != clip_id("x" * 127, 100)


# --- the scripts: once per clip, fenced ------------------------------------------------------


def test_a_clip_ends_once_and_only_while_its_worker_holds_the_message(redis_server):
    from worker.config import load
    from worker.queue import Held, JobQueue

    config = load(None, env={}, overrides={"redis.url": redis_server.url})
    queue = JobQueue(redis_server.client(), config)
    r = redis_server.client()
    k = queue.keys
    # Given a worker holding a two-clip job's message
    r.lpush(k.queue, b"m")
    assert queue.fetch_nowait("w") == b"m"
    assert queue.start("j", "sha", {"state": "running"}) == 0

    # When a clip's end is recorded, and the same call is made again (a lost reply)
    assert queue.clip_end(Held("w", b"m", "j"), "j-1", "done", {"id": "j-1"}) == 1
    assert queue.clip_end(Held("w", b"m", "j"), "j-1", "done", {"id": "j-1"}) == 2
    # Then it is on the done list and the stream once
    assert r.llen(k.done) == 1 and r.xlen(k.events) == 2  # started, done
    # and a dead clip goes to the dead list, its stream entry without the message
    assert queue.clip_end(Held("w", b"m", "j"), "j-2", "dead", {"id": "j-2", "message": "x"}) == 1
    entry = r.xrange(k.events)[-1][1]
    assert entry[b"type"] == b"dead" and entry[b"job"] == b"j"
    assert b"message" not in json.loads(entry[b"event"])
    assert queue.clips_ended("j") == {"j-1": "done", "j-2": "dead"}

    # When the message is acknowledged (twice: a lost reply), it is gone, the job done
    assert queue.clips_ack(Held("w", b"m", "j"), {}, token="t") == (True, None)
    assert queue.clips_ack(Held("w", b"m", "j"), {}, token="t") == (True, None)
    assert r.hget(k.job("j"), "state") == b"done" and r.llen(k.processing("w")) == 0

    # And a worker that no longer holds the message records nothing (fenced)
    r.lpush(k.queue, b"m2")
    assert queue.fetch_nowait("w2") == b"m2"
    r.delete(k.processing("w2"))  # recovered meanwhile
    assert queue.clip_end(Held("w2", b"m2", "j2"), "j2-1", "done", {"id": "j2-1"}) == 0
    assert queue.clips_ack(Held("w2", b"m2", "j2"), {}, token="u") == (False, None)
    assert r.llen(k.done) == 1 and not r.exists(k.clips("j2"))

    # And a new submission of the ended job starts its clips afresh; a copy that is run
    # again before the job ended keeps them
    assert queue.start("j", "sha", {"state": "running"}) == 0
    assert queue.clips_ended("j") == {}
    assert queue.clip_end(Held("w", b"m", "j"), "j-1", "done", {"id": "j-1"}) == 0  # not held
    r.lpush(k.processing("w"), b"m")
    assert queue.clip_end(Held("w", b"m", "j"), "j-1", "done", {"id": "j-1"}) == 1
    assert queue.start("j", "sha", {"state": "running"}) == 0  # given back, taken again
    assert queue.clips_ended("j") == {"j-1": "done"}


# --- the producer's side -----------------------------------------------------------------------


@pytest.mark.settings(NO_CACHE)
def test_the_client_follows_every_clip_and_a_cancel_ends_the_clips_left(env):
    from clip_supervisor import Client

    client = Client(env.redis.url, config_file=env.conf)
    proc = env.start()
    env.wait_workers(proc, 2)
    # Given a job of ten clips read slowly, two of which have been stored
    size = os.path.getsize(os.path.join(env.http.directory, "twenty.mp4"))
    url = f"http://127.0.0.1:{env.http.port}/paced/{size // 8}/cancel/twenty.mp4"
    job = client.enqueue(url, id="cut-short", clips=[{"start": 2 * n, "duration": 0.5}
                                                      for n in range(10)])
    assert job.clips == tuple(f"cut-short-{n}" for n in range(1, 11))
    wait_for(lambda: env.r.hlen(env.keys.clips("cut-short")) >= 2, 60, interval=0.01,
             what="two clips recorded")

    # When it is cancelled
    assert job.cancel() is True

    # Then wait() gives every clip's outcome: those stored before are done, the rest cancelled
    result = job.wait(timeout=30)
    outcomes = [(c["id"], c["type"]) for c in result["clips"]]
    assert [clip for clip, _ in outcomes] == list(job.clips)
    kinds = [kind for _, kind in outcomes]
    done = kinds.count("done")
    assert 2 <= done < 10 and kinds == ["done"] * done + ["cancelled"] * (10 - done)
    assert all(c["reason"] == "cancelled" for c in result["clips"] if c["type"] != "done")
    # and each cancelled clip is a dead letter of its own; no clip was stored after the cancel
    assert sorted(d["id"] for d in env.dead_letters()) == sorted(job.clips[done:])
    assert sorted(os.listdir(env.out)) == sorted(f"{c}.mp4" for c in job.clips[:done])
    wait_for(lambda: _acknowledged(env), 10, what="the message acknowledged")
    assert job.status()["state"] == "done"
    # and a handle made from the id later reads the same outcomes from the stream
    again = client.job("cut-short").wait(timeout=10)
    assert [(c["id"], c["type"]) for c in again["clips"]] == outcomes

    # And the command line takes clips too: with one bad clip, --wait exits 2
    run = env.cli("enqueue", env.url("ten.mp4"), "--id", "cli", "--clips",
                  '[{"start": 1, "duration": 1}, {"start": 4, "end": 2}]', "--wait",
                  "--timeout", "60", check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "cli-1 done:" in run.stdout and "cli-2 dead (bad_range)" in run.stdout
    assert env.stop(proc) == 0
    assert env.work_leftovers() == []


# --- adversarial review: one terminal event per clip, whatever ends the message ----------------


def _clip_letters(env, job_id: str) -> list[dict]:
    return [d for d in env.dead_letters() if d.get("job") == job_id]


@pytest.mark.settings({**NO_CACHE, "job": {"cache_max_bytes": 0, "max_attempts": 1}})
def test_a_message_that_crashed_its_last_attempt_dead_letters_each_clip_left_on_its_own(env):
    # Given max_attempts = 1 and a job of three clips read slowly
    proc = env.start()
    env.wait_workers(proc, 2)
    size = os.path.getsize(os.path.join(env.http.directory, "twenty.mp4"))
    url = f"http://127.0.0.1:{env.http.port}/paced/{size // 6}/poison/twenty.mp4"
    [raw] = env.push({"id": "crashy", "url": url, "callback": "http://127.0.0.1:9/hook",
                      "clips": [{"start": 2 * n, "duration": 0.5} for n in range(3)]})
    [pid] = env.wait_in_flight(raw)

    # When its worker is SIGKILLed once the first clip has ended (its one attempt spent)
    wait_for(lambda: env.r.hlen(env.keys.clips("crashy")) >= 1, 60, interval=0.01,
             what="a clip recorded")
    os.kill(pid, signal.SIGKILL)
    ended = {k.decode() for k in env.r.hkeys(env.keys.clips("crashy"))}
    assert 1 <= len(ended) < 3

    # Then each clip that had not ended is a dead letter of its own (poison, naming the job),
    # and no letter names the job itself: one terminal event per clip, never a job-wide one
    wait_for(lambda: env.r.hlen(env.keys.clips("crashy")) == 3, 30, what="every clip ended")
    wait_for(lambda: _acknowledged(env), 10, what="the message acknowledged")
    left = sorted({"crashy-1", "crashy-2", "crashy-3"} - ended)
    letters = env.dead_letters()
    assert sorted(d["id"] for d in letters) == left, letters
    assert {(d["job"], d["reason"]) for d in letters} == {("crashy", "poison")}
    assert json.loads(letters[0]["message"])["id"] in left  # replayable as that clip alone
    terminal = _terminal(env, "crashy")
    assert sorted(e["id"] for e in terminal) == ["crashy-1", "crashy-2", "crashy-3"]
    assert [e for e in _stream(env) if e["id"] == "crashy" and e["type"] in
            ("done", "dead", "cancelled")] == []
    assert all(e["callback"] == "http://127.0.0.1:9/hook" for e in terminal)
    # and the job is done (a clip was stored), its message's attempts forgotten
    assert env.r.hget(env.keys.job("crashy"), "state") == b"done"
    assert env.r.hlen(env.keys.attempts) == 0
    assert env.stop(proc) == 0


@pytest.mark.settings(NO_CACHE)
def test_a_message_whose_clips_had_all_ended_before_its_last_crash_is_only_acknowledged(env):
    import hashlib

    # Given what a worker SIGKILLed between its last clip's end and the acknowledgement
    # leaves, on the crash that spent the message's last attempt: every clip recorded (two
    # done, one dead), the job running, the message requeued with max_attempts counted
    message = json.dumps({"id": "late", "url": env.url("twenty.mp4"),
                          "clips": [{"start": 1, "duration": 1}, {"start": 3, "duration": 1},
                                    {"start": 5, "end": 2}]}).encode()
    env.r.hset(env.keys.clips("late"), mapping={"late-1": "done", "late-2": "done",
                                                 "late-3": "dead"})
    env.r.hset(env.keys.job("late"), mapping={"state": "running", "clips_done": 2,
                                               "clips_dead": 1})
    env.r.hset(env.keys.attempts, hashlib.sha1(message).hexdigest(), 3)
    env.push(message)

    # When a worker takes it
    proc = env.start()
    env.wait_workers(proc, 2)
    wait_for(lambda: _acknowledged(env), 20, what="the message acknowledged")

    # Then it is acknowledged as the clips ended: no letter, no second event for any clip
    assert env.dead_letters() == [] and env.done_events() == []
    assert [e for e in _stream(env) if e["type"] in ("done", "dead", "cancelled")] == []
    assert env.r.hget(env.keys.job("late"), "state") == b"done"
    assert env.r.hlen(env.keys.attempts) == 0
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"cache_max_bytes": 0, "max_attempts": 1}})
def test_a_message_whose_retries_are_spent_dead_letters_each_clip_on_its_own(env):
    from clip_supervisor import Client

    # Given max_attempts = 1 and a source that answers 503 at first
    client = Client(env.redis.url, config_file=env.conf)
    url = f"http://127.0.0.1:{env.http.port}/flaky/1/spent/twenty.mp4"
    job = client.enqueue(url, id="spent", clips=[{"start": 1, "duration": 1},
                                                 {"start": 4, "duration": 1}])

    # When it runs and fails transiently on its only attempt
    proc = env.start()
    env.wait_workers(proc, 2)
    result = job.wait(timeout=30)
    wait_for(lambda: _acknowledged(env), 10, what="the message acknowledged")

    # Then each clip is a dead letter of its own with the failure's reason; none names the job
    letters = env.dead_letters()
    assert sorted((d["id"], d["job"]) for d in letters) == [("spent-1", "spent"),
                                                            ("spent-2", "spent")], letters
    assert len({d["reason"] for d in letters}) == 1 and letters[0]["reason"] != "poison"
    assert [(c["id"], c["type"]) for c in result["clips"]] == [("spent-1", "dead"),
                                                               ("spent-2", "dead")]
    assert sorted(e["id"] for e in _terminal(env, "spent")) == ["spent-1", "spent-2"]
    assert env.r.hget(env.keys.job("spent"), "state") == b"dead"
    assert env.r.hlen(env.keys.attempts) == 0
    # and a clip's letter replays that clip alone, which now succeeds
    env.cli("dead", "retry", "spent-2")
    wait_for(lambda: [d["id"] for d in env.done_events()] == ["spent-2"], 30,
             what="the replayed clip done")
    assert [d["id"] for d in env.dead_letters()] == ["spent-1"]
    assert env.stop(proc) == 0


@pytest.mark.settings({**NO_CACHE, "supervisor": {"workers": 1}})
def test_a_job_whose_id_a_clip_of_another_job_reuses_waits_for_its_own_end(env):
    from clip_supervisor import Client

    # Given one worker, a multi-clip job with a clip named "solo", and behind it in the queue
    # a job of one clip whose id is "solo" too
    client = Client(env.redis.url, config_file=env.conf)
    multi = client.enqueue(env.url("twenty.mp4"), id="multi",
                           clips=[{"id": "solo", "start": 1, "duration": 1}])
    solo = client.enqueue(env.url("ten.mp4"), id="solo", start=2, duration=1)

    # When both run
    proc = env.start()
    env.wait_workers(proc, 1)
    own = solo.wait(timeout=60)

    # Then the job's wait returns its own completion, not the clip's
    assert own["url"] == env.url("ten.mp4") and "job" not in own, own
    assert multi.wait(timeout=10)["clips"][0]["url"] == env.url("twenty.mp4")
    assert env.stop(proc) == 0


def test_a_clip_end_from_a_worker_that_no_longer_holds_the_message_is_fenced(redis_server):
    from worker.config import load
    from worker.queue import Held, JobQueue

    config = load(None, env={}, overrides={"redis.url": redis_server.url})
    queue = JobQueue(redis_server.client(), config)
    r = redis_server.client()
    k = queue.keys
    # Given a worker that recorded a clip's end, then lost its message to recovery (taken
    # for dead during a partition: another worker now runs the copy)
    r.lpush(k.queue, b"m")
    assert queue.fetch_nowait("w") == b"m"
    assert queue.clip_end(Held("w", b"m", "j"), "j-1", "done", {"id": "j-1"}) == 1
    r.delete(k.processing("w"))

    # When it makes that call again (its reply was lost)
    # Then it is told it is fenced, not that its clip is recorded: it must stop cutting
    # the clips of a message that is no longer its own
    assert queue.clip_end(Held("w", b"m", "j"), "j-1", "done", {"id": "j-1"}) == 0
    assert r.llen(k.done) == 1


@pytest.mark.settings(NO_CACHE)
def test_the_dashboard_shows_a_multi_clip_job_and_each_of_its_clips(env):
    from tests.conftest import free_port
    from tests.test_dashboard import _request

    # Given the dashboard on loopback and a job of two clips, one with a bad range, done
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    base = f"http://127.0.0.1:{port}"
    proc = env.start()
    env.wait_workers(proc, 2)
    env.push({"id": "board", "url": env.url("twenty.mp4"),
              "clips": [{"start": 1, "duration": 1}, {"id": "askew", "start": 5, "end": 2}]})
    env.wait_finished(2)
    wait_for(lambda: _acknowledged(env), 10, what="the message acknowledged")

    # When an operator opens the overview and the pages its lists link to
    stats, recent = _request(base + "/api/stats"), _request(base + "/api/recent")
    job, done, dead = (_request(f"{base}/api/job/{name}") for name in
                       ("board", "board-1", "askew"))

    # Then every one answers: the job with its clips' counts, each clip with its outcome and
    # its job (the done clip's page is not "unknown": it has no hash of its own)
    assert stats[0] == recent[0] == 200
    assert [e["id"] for e in recent[1]["done"]] == ["board-1"]
    assert job[0] == 200 and job[1]["state"] == "done", job
    assert job[1]["fields"]["clips_done"] == "1" and job[1]["fields"]["clips_dead"] == "1"
    assert done[0] == 200, done
    assert done[1]["state"] == "done" and done[1]["fields"]["job"] == "board"
    assert done[1]["fields"]["output"].endswith("/board-1.mp4") and not done[1]["cancellable"]
    assert dead[0] == 200 and dead[1]["state"] == "dead"
    assert [d["reason"] for d in dead[1]["dead"]] == ["bad_range"]
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"cache_max_bytes": 0, "range_requests": "false"}})
def test_a_worker_killed_during_the_download_its_clips_share_leaves_nothing_behind(env,
                                                                                  long_video):
    # Given whole downloads only, and a job of three clips whose source arrives slowly
    proc = env.start()
    env.wait_workers(proc, 2)
    url = f"http://127.0.0.1:{env.http.port}/paced/{long_video // 4}/shared-kill/{LONG}"
    [raw] = env.push({"id": "fetching", "url": url,
                      "clips": [{"start": 10 * n, "duration": 1} for n in range(3)]})
    [pid] = env.wait_in_flight(raw)

    # When its worker is SIGKILLed in the middle of that download, before any clip ended
    wait_for(lambda: env.http.sent.get("shared-kill", 0) > long_video // 4, 20,
             interval=0.01, what="a quarter of the source sent")
    assert env.r.hlen(env.keys.clips("fetching")) == 0
    os.kill(pid, signal.SIGKILL)

    # Then the copy of the message downloads it again and cuts each clip once; the killed
    # worker's partial download is gone
    env.wait_finished(3, timeout=60)
    wait_for(lambda: _acknowledged(env), 10, what="the message acknowledged")
    assert sorted(e["id"] for e in _terminal(env, "fetching")) == [
        "fetching-1", "fetching-2", "fetching-3"]
    assert sorted(d["source_read"] for d in env.done_events()) == ["download", "shared",
                                                                   "shared"]
    assert env.dead_letters() == []
    assert env.stop(proc) == 0
    assert env.work_leftovers() == []


def test_a_queued_job_of_clips_cancelled_ends_each_clip_as_its_own_cancelled_letter(env):
    from clip_supervisor import Client

    # Given a queued job of three clips with a callback, and no worker running
    client = Client(env.redis.url, config_file=env.conf)
    job = client.enqueue(env.url("ten.mp4"), id="queued-clips", callback="http://127.0.0.1:9/h",
                         clips=[{"start": n, "duration": 1} for n in range(3)])
    # When it is cancelled
    assert job.cancel() is True
    # Then the message is gone, and each clip ended once, as a cancelled dead letter of its
    # own naming the job, with a "cancelled" entry (so a webhook) for each, none for the job
    assert env.r.llen(env.keys.queue) == 0
    letters = _clip_letters(env, "queued-clips")
    assert sorted(d["id"] for d in letters) == list(job.clips)
    assert all(d["reason"] == "cancelled" and d["attempts"] == 0 for d in letters)
    assert [d for d in env.dead_letters() if d["id"] == "queued-clips"] == []
    ends = [e for e in _stream(env) if e["type"] in ("done", "dead", "cancelled")]
    assert sorted(e["id"] for e in ends) == list(job.clips)
    assert all(e["callback"] == "http://127.0.0.1:9/h" for e in ends)
    # and wait() gives every clip's outcome, the job's state is dead
    result = job.wait(timeout=5)
    assert [(c["id"], c["type"]) for c in result["clips"]] == [(c, "cancelled")
                                                               for c in job.clips]
    assert job.status()["state"] == "dead"
    # and a cancelled clip's letter replays that clip alone
    letter = next(d for d in letters if d["id"] == job.clips[1])
    assert json.loads(letter["message"])["start"] == 1
