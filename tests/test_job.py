"""Job parsing (pure logic) and the id agreement between Python and the Lua scripts."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import config as config_mod
from worker.errors import Permanent
from worker.job import Job, Rejected, intake, job_id_of, parse

CONFIG = config_mod.load(None, env={
    "CLIP_SUPERVISOR_STORAGE_OUTPUT_BASE": "file:///srv/clips",
    "CLIP_SUPERVISOR_STORAGE_ALLOWED_OUTPUTS": "gs://bucket-a/clips, file:///mnt/extra",
})


def _reason(message: bytes | str | dict) -> str:
    raw = message if isinstance(message, bytes) else (
        json.dumps(message) if isinstance(message, dict) else message).encode()
    with pytest.raises(Permanent) as info:
        parse(raw, CONFIG)
    return info.value.reason


def test_bare_url_is_a_whole_video_job_with_a_sha1_id():
    raw = b"  https://cdn.example/v.mp4\n"
    job = parse(raw, CONFIG)
    assert job.url == "https://cdn.example/v.mp4"
    assert job.id == hashlib.sha1(raw).hexdigest()
    assert (job.start, job.end, job.mode, job.format) == (0.0, None, "copy", "mp4")
    assert job.output == f"file:///srv/clips/{job.id}.mp4"


def test_json_job_with_every_field():
    job = parse(json.dumps({"id": "a.b-C_1", "url": "http://h/v.mp4", "start": 1.5,
                            "duration": 2, "output": "sub/x.mkv", "mode": "encode",
                            "format": "mkv", "extra": 1}).encode(), CONFIG)
    assert (job.id, job.start, job.end, job.mode, job.muxer) == ("a.b-C_1", 1.5, 3.5,
                                                                 "encode", "matroska")
    assert job.output == "file:///srv/clips/sub/x.mkv"
    assert job.warnings == ("unknown field 'extra' ignored",)


def test_default_duration_applies_when_no_end():
    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_JOB_DEFAULT_DURATION": "7"})
    assert parse(b'{"url": "http://h/v", "start": 3}', cfg).end == 10.0


@pytest.mark.parametrize("message, reason", [
    (b"{nope", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    ({"start": 1}, "no_url"),
    ({"url": ""}, "no_url"),
    ({"url": 5}, "no_url"),
    ({"url": "ftp://h/v"}, "scheme_not_allowed"),
    ({"url": "file:///etc/passwd"}, "scheme_not_allowed"),
    (b"just words", "bad_url"),
    ({"url": "http:///nohost"}, "bad_url"),
    ({"url": "http://h/v", "start": -1}, "bad_range"),
    ({"url": "http://h/v", "start": 5, "end": 5}, "bad_range"),
    ({"url": "http://h/v", "start": 5, "end": 2}, "bad_range"),
    ({"url": "http://h/v", "duration": 0}, "bad_range"),
    ({"url": "http://h/v", "end": 3, "duration": 2}, "bad_range"),
    ({"url": "http://h/v", "start": True}, "bad_range"),
    ({"url": "http://h/v", "start": "1"}, "bad_range"),
    ({"url": "http://h/v", "mode": "fast"}, "bad_mode"),
    ({"url": "http://h/v", "format": "exe"}, "bad_format"),
    ({"url": "http://h/v", "id": ""}, "bad_id"),
    ({"url": "http://h/v", "id": "a/b"}, "bad_id"),
    ({"url": "http://h/v", "id": "x" * 129}, "bad_id"),
    ({"url": "http://h/v", "id": 7}, "bad_id"),
    ({"url": "http://h/v", "output": "../up.mp4"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "/abs.mp4"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "file:///etc/cron.d/x"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "file:///srv/clips/../x"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "gs://other-bucket/x.mp4"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "s3://b/x.mp4"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "dir/"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "a?1.mp4"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "sub/..#x"}, "output_not_allowed"),
    ({"url": "http://h/v", "output": "a%2e%2e.mp4"}, "output_not_allowed"),
    (b"\xff\xfe", "not_utf8"),
    (b'{"url": "http://h/v", "pad": "' + b"x" * (1 << 20) + b'"}', "message_too_large"),
])
def test_invalid_messages_are_rejected_with_a_reason(message, reason):
    assert _reason(message) == reason


@pytest.mark.parametrize("output, resolved", [
    ("gs://bucket-a/clips/x.mp4", "gs://bucket-a/clips/x.mp4"),
    ("file:///mnt/extra/y.mp4", "file:///mnt/extra/y.mp4"),
    ("file:///srv/clips/a/./b.mp4", "file:///srv/clips/a/b.mp4"),
    ("a/../b.mp4", "file:///srv/clips/b.mp4"),
])
def test_allowed_outputs(output, resolved):
    job = parse(json.dumps({"url": "http://h/v", "output": output}).encode(), CONFIG)
    assert job.output == resolved


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_job_or_a_clear_rejection(raw):
    try:
        job = parse(raw, CONFIG)
    except Permanent as exc:
        assert exc.reason and exc.error
    else:
        assert isinstance(job, Job) and job.url


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "id": _json | st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True),
    "url": _json | st.sampled_from(["http://h/v.mp4", "gs://b/k", "file:///x", "ftp://h"]),
    "start": _json | st.floats(-5, 50), "end": _json | st.floats(-5, 50),
    "duration": _json | st.floats(-5, 50), "output": _json | st.text(max_size=30),
    "mode": _json | st.sampled_from(["copy", "encode"]), "format": _json})


@settings(max_examples=400, deadline=None)
@given(_fields)
def test_arbitrary_json_jobs_give_a_job_or_a_clear_rejection(obj):
    raw = json.dumps(obj).encode()
    try:
        job = parse(raw, CONFIG)
    except Permanent as exc:
        assert exc.reason and exc.error
    else:
        assert job.start >= 0 and (job.end is None or job.end > job.start)
        assert job.output.startswith(("file:///srv/clips/", "gs://bucket-a/clips/",
                                      "file:///mnt/extra/"))


@pytest.mark.parametrize("raw", [
    b"http://h/v.mp4", b'{"id": "abc", "url": "u"}', b'{"id":"s","url":"http://h/a\\ud800"}',
    b'{"id": "x", "junk": "\\udfff"}', b"[" * 5000, b"\xff\xfe", "{\"id\": \"\u00e9\"}".encode(),
])
def test_python_lua_and_recovery_count_attempts_under_one_key(redis_server, raw):
    # The recovery script counts a crash under the message's SHA-1, computed in Lua; the
    # worker reads the count (START) under the SHA-1 computed in Python. No JSON is decoded
    # in Lua, so a message cjson would refuse cannot split them.
    from worker.keys import Keys
    from worker.queue import JobQueue, connect, sha1

    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URL": redis_server.url})
    queue, keys, r = JobQueue(connect(cfg), cfg), Keys("clips"), redis_server.client()
    r.rpush(keys.processing("w"), raw)
    assert queue.recover("w", only_if_expired=False, count_attempt=True) == 1
    assert queue.start("some-id", sha1(raw), {"state": "running", "url": "\ud800"}) == 1
    assert r.hget(keys.job("some-id"), "url") == b"\\ud800"


def test_intake_never_raises_and_names_one_id():
    deep = b'{"id": "deep", "url": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for raw in (deep, b'{"id":"surrogate","url":"http://example.invalid/a\\ud800.mp4"}',
                b'{"id": "ok-id", "url": "http://h/\x00"}', b"\xff" * 10):
        rejected = intake(raw, CONFIG)
        assert isinstance(rejected, Rejected), raw[:40]
        assert rejected.id == job_id_of(raw)
    assert intake(deep, CONFIG).error.reason == "invalid_json"
    assert job_id_of(deep) == "deep" or len(job_id_of(deep)) == 40


def test_scripts_are_safe_to_run_twice_when_a_reply_is_lost(redis_server):
    # A connection that drops after Redis ran a script makes the worker run it again.
    from worker.keys import Keys
    from worker.queue import JobQueue, connect

    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URL": redis_server.url})
    queue, keys, r = JobQueue(connect(cfg), cfg), Keys("clips"), redis_server.client()
    r.lpush(keys.queue, b"m1", b"m2", b"m3")  # FIFO: m1 is taken first
    first, again = queue.fetch_nowait("w"), queue.fetch_nowait("w")
    assert first.message == again.message == b"m1"
    assert r.lrange(keys.processing("w"), 0, -1) == [b"m1"]
    ack = ("w", b"m1", "j1", {"id": "j1"}, {"output": "x"})
    acked, nxt = queue.done(*ack, take_next=True, token="t1")
    # run again (its reply was lost): the same answer, nothing recorded twice
    assert queue.done(*ack, take_next=True, token="t1") == (acked, nxt)
    # the same message acked by another worker whose copy was recovered: fenced
    assert queue.done("w2", b"m1", "j1", {"id": "j1"}, {}, token="t2") == (False, None)
    assert acked and nxt == b"m2" and r.lrange(keys.processing("w"), 0, -1) == [b"m2"]
    assert r.llen(keys.done) == 1
    letter = {"id": "j2", "reason": "bad_range"}
    assert queue.dead("w", b"m2", "j2", letter, {}) == 1
    assert queue.dead("w", b"m2", "j2", letter, {}) == 0
    assert r.llen(keys.dead) == 1 and r.lrange(keys.queue, 0, -1) == [b"m3"]
