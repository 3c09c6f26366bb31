"""Job parsing (pure logic) and the id agreement between Python and the Lua scripts."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
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
    assert (job.start, job.end, job.mode, job.format) == (0.0, None, "smart", "mp4")
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
    "mode": _json | st.sampled_from(["copy", "smart", "encode"]), "format": _json})


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
    from worker.queue import Held, JobQueue, connect, sha1

    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URL": redis_server.url})
    queue, keys, r = JobQueue(connect(cfg), cfg), Keys("clips"), redis_server.client()
    r.lpush(keys.queue, b"m1", b"m2", b"m3")  # FIFO: m1 is taken first
    first, again = queue.fetch_nowait("w"), queue.fetch_nowait("w")
    assert first == again == b"m1"
    assert r.lrange(keys.processing("w"), 0, -1) == [b"m1"]
    ack = (Held("w", b"m1", "j1"), {"id": "j1"}, {"output": "x"})
    acked, nxt = queue.done(*ack, take_next=True, token="t1")
    # run again (its reply was lost): the same answer, nothing recorded twice
    assert queue.done(*ack, take_next=True, token="t1") == (acked, nxt)
    # the same message acked by another worker whose copy was recovered: fenced
    assert queue.done(Held("w2", b"m1", "j1"), {"id": "j1"}, {}, token="t2") == (False, None)
    assert acked and nxt == b"m2" and r.lrange(keys.processing("w"), 0, -1) == [b"m2"]
    assert r.llen(keys.done) == 1
    letter = {"id": "j2", "reason": "bad_range"}
    assert queue.dead(Held("w", b"m2", "j2"), letter, {}, token="d1") == 1
    assert queue.dead(Held("w", b"m2", "j2"), letter, {}, token="d1") == 1  # its lost reply
    assert queue.dead(Held("w", b"m2", "j2"), letter, {}, token="d2") == 0  # fenced
    assert r.llen(keys.dead) == 1 and r.lrange(keys.queue, 0, -1) == [b"m3"]
    # A processing list that holds another message beside the acked one (never made by a
    # worker; a hand-made repair, say): that one is handed on, no new one is taken
    r.rpush(keys.processing("w"), b"extra", b"m4")
    assert queue.done(Held("w", b"m4", "j4"), {"id": "j4"}, {}, take_next=True,
                      token="t4") == (True, b"extra")
    assert r.lrange(keys.queue, 0, -1) == [b"m3"]
    r.delete(keys.processing("w"))
    # a retry whose reply is lost answers from what it recorded: its attempt and delay
    assert queue.fetch_nowait("w") == b"m3"
    attempts, delay = queue.retry(Held("w", b"m3", "j3"), {"id": "j3"}, {}, token="r1")
    assert queue.retry(Held("w", b"m3", "j3"), {"id": "j3"}, {}, token="r1")[0] == attempts == 1
    assert delay is not None and r.zcard(keys.delayed) == 1 and r.hget(keys.attempts,
                                                                       sha1(b"m3")) == b"1"
    assert queue.retry(Held("w", b"m3", "j3"), {"id": "j3"}, {}, token="r2") == (-1, None)


# --- the closed protocol: Redis is spoken in worker/queue.py only ------------------------------

PROTOCOL_MODULES = {"worker/queue.py", "worker/keys.py", "worker/scripts.py"}
# Method names redis-py shares with everyday Python (dict.get, list.append, socket.connect):
# a call of one of these says nothing about Redis.
_EVERYDAY = {"append", "close", "connect", "copy", "decode", "delete", "discard",
             "disconnect", "dump", "echo", "encode", "exists", "get", "getpeername", "info",
             "keys", "lock", "move", "object", "rename", "role", "save", "scan", "select",
             "set", "shutdown", "sort", "time", "type", "unlink", "wait"}
# What still reaches past the queue module, and why: supervisor/master.py hands the host
# claim its JobQueue's client and keys until it hands it the JobQueue (recovery.HostClaim
# takes either).
_ALLOWED: dict[tuple[str, str], int] = {}
_KEY_NAMES = r"(queue|retry|delayed|workers|attempts|done|dead|processing|heartbeat|job|host)"


def _production_modules():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for path in sorted([*root.glob("worker/*.py"), *root.glob("supervisor/*.py")]):
        name = path.relative_to(root).as_posix()
        if name not in PROTOCOL_MODULES:
            yield name, path.read_text()


def _dotted(node) -> str:
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_module_outside_the_queue_module_speaks_redis():
    # Given every production module but the queue module, keys and scripts
    import ast
    import re

    import redis
    from redis.client import Pipeline

    commands = {name for cls in (redis.Redis, Pipeline, redis.Connection) for name in dir(cls)
                if not name.startswith("_")} - _EVERYDAY
    key_text = re.compile(r"(^|\})" + ":" + _KEY_NAMES + r"(:|$)")
    found: list[str] = []
    reach: dict[tuple[str, str], int] = {}
    for name, text in _production_modules():
        tree = ast.parse(text)
        prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            # When it calls a Redis command on anything but a JobQueue
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in commands \
                    and not _dotted(node.func.value).split(".")[-1].endswith("queue"):
                found.append(f"{where} calls .{node.func.attr}()")
            # or reaches for a JobQueue's client or key names
            if isinstance(node, ast.Attribute) and node.attr in ("client", "keys") \
                    and _dotted(node.value).split(".")[-1].endswith("queue"):
                dotted = f"queue.{node.attr}"
                reach[(name, dotted)] = reach.get((name, dotted), 0) + 1
            # or imports the key names or the scripts
            if isinstance(node, ast.ImportFrom) and node.module in (
                    "worker.keys", "worker.scripts", "keys", "scripts"):
                found.append(f"{where} imports {node.module}")
            # or builds a key name or holds a Lua script
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in prose and (
                        "redis.call(" in node.value  # a Lua script
                        or (key_text.search(node.value) and " " not in node.value)):
                found.append(f"{where} holds {node.value[:40]!r}")
    found += [f"{name} uses {dotted} {n} time(s)" for (name, dotted), n in reach.items()
              if n > _ALLOWED.get((name, dotted), 0)]

    # Then nothing is found: every key is read and written through worker/queue.py
    assert found == []


def test_every_job_state_written_anywhere_is_a_job_state_and_the_page_names_none():
    # Given the job states of worker.protocol
    import ast
    import pathlib
    import re

    from worker import scripts
    from worker.protocol import JobState

    states = {state.value for state in JobState}
    root = pathlib.Path(__file__).resolve().parent.parent

    # Then every state a Lua script writes is one of them
    written = set(re.findall(r"'state', '(\w+)'", "".join(
        getattr(scripts, name) for name in dir(scripts) if name.isupper())))
    assert written and written <= states
    # and so is every {"state": ...} a Python module writes
    for name, text in _production_modules():
        if name == "worker/protocol.py":  # their definition, with the meaning of each field
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "state" \
                            and isinstance(value, ast.Constant):
                        assert value.value in states, f"{name}:{node.lineno}"
    # and the page styles each, yet names none in its script (it gets them from /api/info)
    css = (root / "supervisor/static/dashboard.css").read_text()
    assert all(re.search(rf"\.badge\.{state}\b", css) for state in states)
    script = (root / "supervisor/static/dashboard.js").read_text()
    named = set(re.findall(r'(?<!\$\()"(\w+)"', script))
    assert not named & states, named & states


def test_worker_names_parse_back():
    from worker.protocol import parse_worker_dir, parse_worker_id, worker_dir_name, worker_id_for

    assert parse_worker_id(worker_id_for("web-1", 42, 1700000000123)) == ("web-1", 42,
                                                                         1700000000123)
    assert parse_worker_id(worker_id_for("fe80::1", 7, 9)) == ("fe80::1", 7, 9)
    assert parse_worker_id("not-a-worker") is None
    assert parse_worker_dir(worker_dir_name(42, 1700000000123)) == (42, 1700000000123)
    assert parse_worker_dir("cache") is None and parse_worker_dir("w-1-2.part") is None


def test_a_pid_is_alive_while_its_process_runs_and_not_once_it_is_a_zombie():
    import subprocess
    import sys

    from worker.protocol import pid_alive

    # A process whose name holds ") Z " cannot pass for a zombie (the state follows the
    # last parenthesis of /proc/<pid>/stat)
    child = subprocess.Popen([sys.executable, "-c", "import setproctitle, sys; "
                              "setproctitle.setthreadtitle(') Z x'); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid) and pid_alive(str(child.pid)) and pid_alive(os.getpid())
        assert pid_alive(1)  # init: alive, whoever runs the tests
        child.stdin.close()  # it exits, and stays a zombie until we reap it
        wait_for(lambda: not pid_alive(child.pid), 10, what="the exited child to count dead")
        assert os.path.exists(f"/proc/{child.pid}")  # a zombie, not yet reaped
    finally:
        child.wait(10)
    assert not pid_alive(child.pid)
    for nonsense in (None, "", "abc", "12x", 0, -1, "-1", 1.5j):
        assert not pid_alive(nonsense)


# The parser's shortcuts for the usual message (worker/job.py): each must give the answer
# of the full path it skips, on the usual inputs and on the odd ones around them.
FILE_CONFIG = config_mod.load(None, env={"CLIP_SUPERVISOR_JOB_ALLOWED_SCHEMES":
                                         "http,https,gs,file"})


def _url_answer(check, url: str, cfg) -> str:
    try:
        check(url, cfg)
    except Permanent as exc:
        return exc.reason
    return "ok"


_URL_ODD = ["http://h:65535/v", "http://h:65536/v", "http://h:0/v", "http://h:99999",
            "http://h:/v", "http://h:1a/v", "HTTP://H/v", "http:///v", "http://", "gs://b",
            "file:///", "file://", "file:", "file:///x?y#z", "file://localhost/x",
            "file://LOCALHOST/x", "file://h/x", "FILE:///x", "file://:1/x", "ftp://h/x",
            "http://[::1]/v", "http://[::1/v", "http://u@h/v", "http://h/v x",
            "http://h/v\x7f", "http://\u00e9.fr/v", "http://h/\u00e9", "http://h/\u2028",
            "http://h#\u00e9", "http://h?x", "h+t.p://h/v", "1http://h/v", "http:h/v",
            "http://h/" + "v" * 8200, "http://h:0065535/v", "http://h:" + "\u0661" + "/v"]
_url_char = st.sampled_from("aZ09.-+:/@[]?#%_~ \t\x00\x7f\u00e9\u2100\u0661\u3000")
_urls = st.tuples(
    st.sampled_from(["http", "HTTPS", "gs", "file", "fIle", "ftp", "h+t.p", "1x"]),
    st.sampled_from(["://", ":", ":/", ":///"]),
    st.text(_url_char, max_size=12),
    st.sampled_from(["", ":80", ":65535", ":65536", ":", ":8a", ":00080"]),
    st.sampled_from(["", "/", "?", "#"]),
    st.text(max_size=12)).map("".join)


@settings(max_examples=600, deadline=None)
@given(st.one_of(_urls, st.sampled_from(_URL_ODD), st.text(max_size=40)))
def test_the_usual_url_shortcut_answers_as_the_full_check(url):
    from worker import job

    for cfg in (CONFIG, FILE_CONFIG):
        assert _url_answer(job._check_source_url, url, cfg) == \
            _url_answer(job._check_url_fully, url, cfg), url


def test_a_usual_url_is_checked_without_urlsplit(monkeypatch):
    from worker import job

    def refuse(url, cfg):  # the full check: not reached for the usual shapes
        raise Permanent("full", url)

    monkeypatch.setattr(job, "_check_url_fully", refuse)
    for url in ("http://127.0.0.1:9/v.mp4", "https://cdn.example.com/a/b.mp4?sig=x#t",
                "gs://bucket/key/v.mp4", "HTTPS://Host-1.example:443/v"):
        assert _url_answer(job._check_source_url, url, CONFIG) == "ok", url
    assert _url_answer(job._check_source_url, "file:///srv/v.mp4", FILE_CONFIG) == "ok"
    # and anything else goes to it
    for url in ("http://u@h/v", "http://[::1]/v", "file://localhost/v", "http://h:99999/v"):
        assert _url_answer(job._check_source_url, url, FILE_CONFIG) == "full", url


def _json_answer(text: str) -> tuple[str, str]:
    from worker import job

    answers = []
    for loads in (job._loads, json.loads):
        try:
            answers.append(("ok", repr(loads(text))))
        except ValueError as exc:
            answers.append(("ValueError", str(exc)))
        except RecursionError:
            answers.append(("RecursionError", ""))
    assert answers[0] == answers[1], text
    return answers[0]


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    _json.map(json.dumps),
    st.tuples(_json.map(json.dumps), st.text(max_size=6)).map("".join),
    st.tuples(st.sampled_from(["{", "[", '"']), st.text(max_size=30)).map("".join)))
def test_the_decoder_gives_json_loads_answers(text):
    text = text.strip(" \t\n\r\f\v")
    if text.startswith(("{", "[", '"')):  # what parse decodes
        _json_answer(text)


@pytest.mark.parametrize("text", [
    '{"a": 1}', '{"a": 1} ', '{"a": 1}{}', '{"a": 1} x', '{"a": NaN, "b": -Infinity}',
    '{"a": 1, "a": 2}', '[' * 100_000, '"\\ud800"', '{"a": "\x01"}', '{"a": 1e400}',
    '{"a": ' + "1" * 5000 + "}", '{"a" 1}', '{', '"x'])
def test_the_decoder_gives_json_loads_answers_on_odd_texts(text):
    _json_answer(text)


@pytest.mark.parametrize("fields, answer", [
    ({"start": 1e9}, 1e9), ({"start": 10 ** 9}, 1e9), ({"start": 0}, 0.0),
    ({"start": 1e9 + 1e-6}, "bad_range"), ({"start": 10 ** 9 + 1}, "bad_range"),
    ({"start": -1e9 - 1}, "bad_range"), ({"end": -(10 ** 9) - 1}, "bad_range"),
    ({"start": float("nan")}, "bad_range"), ({"start": float("inf")}, "bad_range"),
    ({"start": 10 ** 400}, "bad_range"), ({"start": False}, "bad_range"),
])
def test_times_at_the_limits(fields, answer):
    raw = json.dumps({"url": "http://h/v", **fields}).encode()
    if isinstance(answer, str):
        assert _reason(raw) == answer
    else:
        start = parse(raw, CONFIG).start
        assert start == answer and type(start) is float


def test_a_parsed_job_is_the_job_its_fields_make():
    import dataclasses

    job = parse(json.dumps({"id": "j", "url": "http://h/v", "start": 1, "end": 2,
                            "output": "o.mkv", "format": "mkv", "mode": "copy",
                            "callback": "https://c/h"}).encode(), CONFIG)
    names = [f.name for f in dataclasses.fields(Job)]
    assert sorted(vars(job)) == sorted(names)  # every field set, nothing else
    assert job == Job(**{name: getattr(job, name) for name in names})
    assert hash(job) == hash(Job(**{name: getattr(job, name) for name in names}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.url = "http://other/v"  # type: ignore[misc]


_clip_specs = st.lists(st.fixed_dictionaries({}, optional={
    "id": st.sampled_from(["a", "b", "c", "bad id", 7]),
    "start": _json | st.floats(-5, 50), "end": _json | st.floats(-5, 50),
    "duration": _json | st.floats(-5, 50),
    "output": st.sampled_from(["x.mp4", "y.mkv", "../z", "gs://bucket-a/clips/q.mp4", 3]),
    "mode": st.sampled_from(["copy", "smart", "encode", "fast"]),
    "format": st.sampled_from(["mp4", "mkv", "exe"]), "extra": _json}), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(_clip_specs, st.sampled_from([{}, {"mode": "copy"}, {"format": "mkv"},
                                     {"callback": "https://hooks.example/h"}]))
def test_each_clip_is_the_job_its_letter_replays_to(specs, extra):
    # A clip is made from the job's decoded fields, without encoding and parsing its own
    # message: it must be what parsing that message (its dead letter, replayed) gives.
    import dataclasses

    from worker.job import BadClip

    raw = json.dumps({"id": "m", "url": " http://h/v ", "clips": specs, **extra}).encode()
    try:
        job = parse(raw, CONFIG)
    except Permanent:
        return  # refused as a whole (a clip id): no clip to compare
    assert len(job.clips) == len(specs)
    for clip in job.clips:
        try:
            alone = dataclasses.replace(parse(clip.raw, CONFIG), job="m")
        except Permanent as exc:
            assert isinstance(clip, BadClip) and clip.error.reason == exc.reason
            assert str(clip.error) == str(exc)
        else:
            if isinstance(clip, BadClip):  # only for an output two clips share
                assert "too" in str(clip.error) and clip.error.reason == "output_not_allowed"
            else:
                assert clip == alone and clip.raw == alone.raw and clip.job == "m"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json, max_size=8))
def test_the_completion_events_encoder_writes_what_json_dumps_writes(event):
    # The worker's completion event goes through json.dumps's C encoder, made once
    from worker.queue import _event_json

    assert _event_json(event) == json.dumps(event)
