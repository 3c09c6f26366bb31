"""The worker's per-job Redis calls: the scripts on its kept connection, the stage writes.

``JobQueue._script`` sends the per-job scripts (FETCH, START, DONE) straight onto the
connection of a worker's client instead of through redis-py's command path; these tests hold
it to the same behaviour: a dropped connection, a server restarted or one that lost its
scripts are all survived by the next call, and a thread using the same client meanwhile
never gets another call's reply. A job's stage reaches its hash once it lasts, and once.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from worker import config as config_mod
from worker.keys import Keys
from worker.queue import Held, JobQueue, connect, sha1


@pytest.fixture
def worker_queue(redis_server):
    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URL": redis_server.url})
    client = connect(cfg, single=True)
    assert client.connection is not None  # the kept connection these tests are about
    yield JobQueue(client, cfg), Keys("clips"), redis_server.client()
    client.close()


def _one_job(queue: JobQueue, r, keys: Keys, message: bytes, job_id: str) -> None:
    """Queue ``message``, then take, start and ack it as a worker does."""
    r.lpush(keys.queue, message)
    assert queue.fetch_nowait("w") == message
    assert queue.start(job_id, sha1(message), {"state": "running", "worker": "w"}) == 0
    assert queue.done(Held("w", message, job_id), {"id": job_id}, {"output": f"file:///{job_id}"},
                      token=f"t-{job_id}") == (True, None)
    assert r.hget(keys.job(job_id), "state") == b"done"
    assert r.hget(keys.job(job_id), "output") == f"file:///{job_id}".encode()


def test_the_per_job_scripts_do_not_take_redis_pys_command_path(worker_queue, monkeypatch):
    # Given a worker's client whose command path fails every call, once a first job
    # loaded the scripts (the first call of each finds none: redis-py's path loads it)
    queue, keys, r = worker_queue
    _one_job(queue, r, keys, b"m0", "j0")

    def refuse(*args, **kwargs):
        raise AssertionError(f"redis-py's command path was taken: {args[:2]}")

    # When a job is taken, started and acknowledged
    monkeypatch.setattr(queue.client, "execute_command", refuse)
    # Then none of its scripts went through it, and each recorded what it should
    _one_job(queue, r, keys, b"m1", "j1")
    assert r.llen(keys.done) == 2 and r.llen(keys.processing("w")) == 0


def test_a_dropped_connection_is_survived_by_the_next_call(worker_queue):
    queue, keys, r = worker_queue
    _one_job(queue, r, keys, b"m1", "j1")
    # Given the server closed the worker's connection between two jobs
    assert r.client_kill_filter(_id=queue.client.client_id()) == 1
    # When the next job runs, Then every call reconnects and records once
    _one_job(queue, r, keys, b"m2", "j2")
    assert r.llen(keys.done) == 2


def test_a_restarted_server_without_the_scripts_is_survived(worker_queue, redis_server):
    queue, keys, r = worker_queue
    _one_job(queue, r, keys, b"m1", "j1")
    # Given a server restarted (no persistence: empty, no scripts cached, old socket dead)
    redis_server.stop()
    redis_server.start()
    r = redis_server.client()
    # When the next job runs, Then the calls reconnect, load the scripts again and record
    _one_job(queue, r, keys, b"m2", "j2")
    # And a server that lost only its script cache (SCRIPT FLUSH) is survived too
    r.script_flush()
    _one_job(queue, r, keys, b"m3", "j3")
    assert r.llen(keys.done) == 2


def test_another_thread_on_the_same_client_never_gets_a_scripts_reply(worker_queue):
    # Given a thread reading through the worker's client (as the heartbeat and the cancel
    # listener may) while the main thread runs the per-job scripts
    queue, keys, r = worker_queue
    r.hset(keys.job("other"), mapping={"state": "queued", "output": "o"})
    stop, errors = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                fields = queue.job_fields("other", "state", "output")
                if fields != {"state": "queued", "output": "o"}:
                    errors.append(fields)
            except Exception as exc:  # a reply meant for the other thread
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            _one_job(queue, r, keys, f"m{i}".encode(), f"j{i}")
    finally:
        stop.set()
        thread.join(10)
    # Then each thread got its own replies
    assert errors == []
    assert r.llen(keys.done) == 300


def test_a_stage_reaches_the_jobs_hash_once_it_lasts_and_once_only(redis_server, tmp_path):
    # Given a worker whose pipeline goes through the stages fetch, clip and store right
    # after START, of which clip lasts (the job takes steps meanwhile, as ffmpeg's watch
    # does) and store does not
    import json

    from worker.pipeline import Result
    from worker.runner import HASH_WRITE_INTERVAL, Worker

    cfg = config_mod.load(None, env={
        "CLIP_SUPERVISOR_REDIS_URL": redis_server.url,
        "CLIP_SUPERVISOR_JOB_WORK_DIR": str(tmp_path / "work"),
        "CLIP_SUPERVISOR_STORAGE_OUTPUT_BASE": f"file://{tmp_path}/out"})
    worker = Worker(cfg)
    worker.queue = JobQueue(connect(cfg, single=True), cfg)
    keys, r = Keys("clips"), redis_server.client()
    written, seen = [], {}
    update, start = worker.queue.update, worker.queue.start

    def counted(job_id, fields, event=None):
        written.append(dict(fields))
        seen.setdefault("first write", time.monotonic())
        update(job_id, fields, event)

    def started(*args, **kwargs):
        attempts = start(*args, **kwargs)
        seen["started"] = time.monotonic()
        return attempts

    worker.queue.update, worker.queue.start = counted, started

    def stage_in_hash(job_id: str) -> str:
        return r.hget(keys.job(job_id), "stage").decode()

    class Stages:
        def run(self, job, deadline):
            worker._on_stage("fetch")
            seen["fetch"] = stage_in_hash(job.id)
            worker._on_stage("clip")
            entered = time.monotonic()
            seen["clip entered"] = stage_in_hash(job.id)
            while stage_in_hash(job.id) != "clip":  # the job's steps, up to a deadline
                assert time.monotonic() - entered < 10, "the lasting stage was never written"
                worker._on_progress(50.0, "1x")
                worker._poll()
                time.sleep(0.01)
            worker._on_stage("store")
            seen["store"] = stage_in_hash(job.id)
            return Result(output=job.output)

    worker.pipeline = Stages()
    raw = json.dumps({"id": "s1", "url": "http://127.0.0.1:9/v.mp4", "duration": 1}).encode()
    r.lpush(keys.processing(worker.worker_id), raw)
    # When it runs a job
    worker._handle(raw)
    # Then the first stage was in the hash by START; the lasting one reached it with the
    # progress of that moment, in one write, once START was HASH_WRITE_INTERVAL old; the short one
    # never
    assert seen["fetch"] == "fetch" and seen["clip entered"] == "fetch"
    assert seen["first write"] - seen["started"] >= HASH_WRITE_INTERVAL
    assert seen["store"] == "clip"
    assert [f.get("stage") for f in written] == ["clip"], written
    assert written[0]["progress"] == 50.0
    assert r.hget(keys.job("s1"), "state") == b"done"
    assert stage_in_hash("s1") == "done"


def test_work_given_for_the_wait_runs_while_redis_runs_the_call(worker_queue):
    # Given a worker's queue with work to do while it waits for Redis, which waits (up to
    # a deadline) until Redis has run the call it came with, as a second client sees it
    queue, keys, r = worker_queue
    _one_job(queue, r, keys, b"m0", "j0")

    def snapshot():
        return r.llen(keys.processing("w")), r.hget(keys.job("j1"), "state")

    seen = [snapshot()]

    def meanwhile():
        deadline = time.monotonic() + 5
        while snapshot() == seen[-1] and time.monotonic() < deadline:
            time.sleep(0.001)
        seen.append(snapshot())

    queue.while_waiting = meanwhile
    # When a job is taken, started and acknowledged
    _one_job(queue, r, keys, b"m1", "j1")
    # Then the work ran once in each of the three calls, each time after the call had been
    # sent: FETCH took the message, START marked it running, DONE done and acknowledged
    # (work run before the send would see nothing change and record the same state again)
    assert seen[1:] == [(1, None), (1, b"running"), (0, b"done")]


def test_a_failure_of_the_work_for_the_wait_costs_no_answer(worker_queue, caplog):
    # Given work for the wait that fails
    queue, keys, r = worker_queue

    def broken():
        raise RuntimeError("boom")

    queue.while_waiting = broken
    # When a job runs, Then every call still gets its answer and records, and the failure
    # is logged with its traceback
    _one_job(queue, r, keys, b"m1", "j1")
    assert "while waiting for Redis" in caplog.text and "boom" in caplog.text


def test_the_done_list_keeps_the_newest_done_max_events(redis_server):
    # Given a queue whose done list is capped at 3
    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URL": redis_server.url,
                                     "CLIP_SUPERVISOR_JOB_DONE_MAX": "3"})
    client = connect(cfg, single=True)
    queue, keys, r = JobQueue(client, cfg), Keys("clips"), redis_server.client()
    try:
        # When five jobs are acknowledged, Then it holds the last three, newest first
        for i in range(5):
            _one_job(queue, r, keys, f"m{i}".encode(), f"j{i}")
        assert [json.loads(e)["id"] for e in r.lrange(keys.done, 0, -1)] == ["j4", "j3", "j2"]
    finally:
        client.close()
