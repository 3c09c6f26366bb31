"""The event stream {clips}:events: every state change of a job, for consumer groups."""

from __future__ import annotations

import json
import re

from worker.config import load
from worker.queue import Held, JobQueue


def _queue(redis_server) -> JobQueue:
    config = load(None, env={}, overrides={"redis.url": redis_server.url})
    return JobQueue(redis_server.client(), config)


def test_the_queue_reads_the_stream_through_consumer_groups(redis_server):
    # Given a stream with a group made before its entries
    queue = _queue(redis_server)
    r = redis_server.client()
    assert queue.events_key == "{clips}:events"
    assert queue.events_ensure_group("hooks") is True
    assert queue.events_ensure_group("hooks") is False
    ids = [r.xadd(queue.events_key, {"type": "done", "id": f"j{n}"}).decode()
           for n in range(3)]

    # When one consumer reads two of them and acknowledges the first only
    first = queue.events_read_group("hooks", "a", count=2, block_ms=0)
    assert [entry_id for entry_id, _ in first] == ids[:2]
    assert first[0][1] == {"type": "done", "id": "j0"}
    assert queue.events_ack("hooks", ids[0]) == 1
    # Then another consumer gets only what was never delivered, and, once the first one's
    # entry has been idle long enough, the unacknowledged one too
    assert [e for e, _ in queue.events_read_group("hooks", "b", count=10)] == [ids[2]]
    assert queue.events_read_group("hooks", "b", count=10, block_ms=50) == []
    assert [e for e, _ in queue.events_claim_stale("hooks", "b", min_idle_ms=0)] == ids[1:]
    assert queue.events_ack("hooks", *ids[1:]) == 2
    assert queue.events_claim_stale("hooks", "b", min_idle_ms=0) == []

    # A group made later from "$" sees only later entries; one that vanished with its
    # stream is made again from the start
    assert queue.events_ensure_group("late") is True
    later = r.xadd(queue.events_key, {"type": "queued", "id": "j9"}).decode()
    assert [e for e, _ in queue.events_read_group("late", "x")] == [later]
    r.delete(queue.events_key)
    assert queue.events_read_group("late", "x") == []
    again = r.xadd(queue.events_key, {"type": "queued", "id": "j10"}).decode()
    assert [e for e, _ in queue.events_read_group("late", "x")] == [again]
    assert queue.events_last_id() == again
    assert [e for e, _ in queue.events_read("0")] == [again]


def test_a_consumer_group_down_during_50_jobs_catches_up_without_loss(env):
    from clip_supervisor import Client

    client = Client(env.redis.url, config_file=env.conf)
    proc = env.start()
    env.wait_workers(proc, 2)
    # Given a consumer of its own group that has read everything so far
    first = client.enqueue(env.url("ten.mp4"), duration=1, id="before",
                           callback="http://127.0.0.1:9/hook")
    first.wait(timeout=60)
    seen = list(client.events(after="0", group="audit", consumer="c1", timeout=0.3))
    assert [e.type for e in seen if e.job_id == "before"][-1] == "done"

    # When it is down while 50 jobs run (one of whose events it was handling when it died)
    jobs = client.enqueue_many([{"url": env.url("ten.mp4"), "duration": 1, "mode": "copy",
                                 "id": f"j{n:02d}"} for n in range(50)])
    queue = client.queue
    handled = queue.events_read_group("audit", "c1", count=1)  # read, never acknowledged
    for job in jobs:
        job.wait(timeout=120)

    # Then once back it reads every job's done event exactly once, and every other event
    back = list(client.events(group="audit", consumer="c1", timeout=0.5))
    done = [e.job_id for e in back if e.type == "done"]
    assert sorted(done) == [job.id for job in jobs]
    assert back[0].entry_id == handled[0][0]  # the unacknowledged one first
    for job in jobs:
        kinds = [e.type for e in back if e.job_id == job.id]
        assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done", kinds
    # and nothing is left pending for the group
    assert env.r.xpending(env.keys.events, "audit")["pending"] == 0

    # Each entry follows the contract: type, id, time (ISO 8601 UTC), event (JSON) and, on
    # done, dead and cancelled entries, callback; done's event is the done list's entry
    done_list = {e["id"]: e for e in env.done_events()}
    entries = [(entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
               for entry_id, fields in env.r.xrange(env.keys.events)]
    for _, fields in entries:
        assert fields["type"] in ("queued", "started", "progress", "done")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["time"])
        body = json.loads(fields["event"])
        assert isinstance(body, dict)
        assert ("callback" in fields) == (fields["type"] == "done")
        if fields["type"] == "done":
            assert body == done_list[fields["id"]]
    (hooked,) = [f for _, f in entries if f["id"] == "before" and f["type"] == "done"]
    assert hooked["callback"] == "http://127.0.0.1:9/hook"
    assert env.stop(proc) == 0


def test_each_script_appends_its_state_change_in_the_same_step(redis_server):
    # Given a queue with at most two attempts a job
    config = load(None, env={}, overrides={"redis.url": redis_server.url,
                                           "job.max_attempts": "2"})
    queue = JobQueue(redis_server.client(), config)
    r = redis_server.client()
    raw = b'{"url": "https://example.com/a.mp4", "id": "j"}'
    letter = {"id": "j", "reason": "fetch_failed", "error": "reset", "time": "T",
              "message": raw.decode(), "message_bytes": len(raw)}

    def last() -> dict:
        (_, fields), = r.xrevrange(queue.events_key, count=1)
        entry = {k.decode(): v.decode() for k, v in fields.items()}
        entry["event"] = json.loads(entry["event"])
        return entry

    # When a worker starts it, fails once, starts again and fails for good
    r.lpush(queue.keys.processing("w"), raw)
    assert queue.start("j", "sha", {"state": "running", "worker": "w"}) == 0
    assert last()["type"] == "started" and last()["event"]["attempt"] == 1
    attempts, delay = queue.retry(Held("w", raw, "j", "https://x/h"), letter, {})
    retry = last()
    assert retry["type"] == "retry" and "callback" not in retry
    assert retry["event"] == {"attempts": 1, "delay_ms": int(delay * 1000),
                              "reason": "fetch_failed", "error": "reset"}
    r.lpush(queue.keys.processing("w"), raw)
    assert queue.retry(Held("w", raw, "j", "https://x/h"), letter, {})[1] is None
    dead = last()
    assert dead["type"] == "dead" and dead["callback"] == "https://x/h"
    # its event is the dead letter without its message
    assert dead["event"] == {"attempts": 2, "id": "j", "reason": "fetch_failed",
                             "error": "reset", "time": "T"}
    assert json.loads(r.lindex(queue.keys.dead, 0))["message"] == raw.decode()

    # A job marked cancelled before it starts is refused by START, which writes nothing
    assert queue.cancel("k").state == ""  # unknown: only the short-lived mark is left
    assert queue.start("k", "sha2", {"state": "running"}) == -1
    assert r.hget(queue.keys.job("k"), "state") is None and last()["type"] == "dead"
    # and a done job is not marked at all
    r.lpush(queue.keys.processing("w"), b"m")
    queue.done(Held("w", b"m", "d"), {"id": "d", "time": "T"}, {})
    assert last()["type"] == "done" and last()["event"] == {"id": "d", "time": "T"}
    outcome = queue.cancel("d")
    assert not outcome.cancelled and outcome.state == "done"
    assert not r.hexists(queue.keys.job("d"), "cancel")
