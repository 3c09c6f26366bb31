"""The event stream {clips}:events: every state change of a job, for consumer groups."""

from __future__ import annotations

from worker.config import load
from worker.queue import JobQueue


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
