"""Messages built to stop the pool, and a Redis that refuses writes: each costs at most its
own job, and the good jobs behind it are done.

Every case runs the real supervisor on a real redis-server; the bad messages are the ones
that once crashed a worker before it could count an attempt (so the next worker took the
same message and crashed too).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, RedisServer, wait_for
from worker.queue import sha1


def _good(env, n: int) -> list[dict]:
    return [{"id": f"good{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(n)]


def _crashes(env) -> int:
    return len(re.findall(r"\(pid \d+\) (killed by|exited with code [1-9])", env.log_text()))


@pytest.mark.settings({"job": {"max_attempts": 3}})
def test_pool_stoppers_cost_only_themselves(env):
    # Given, ahead of three good jobs, the messages that used to crash every worker that took
    # them: a lone surrogate escape (cjson refuses it, Python does not), the same in an
    # unknown field, and a 200 KB message nested 100,000 deep
    deep = b'{"id": "deep", "url": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad = env.push(b'{"id":"surrogate","url":"http://example.invalid/a\\ud800.mp4"}',
                   b'{"id":"junk","url":"http://example.invalid/a.mp4","junk":"\\ud800"}',
                   deep)
    env.push(*_good(env, 3))
    proc = env.start()
    env.wait_finished(6, timeout=60)
    # Then each bad one is dead-lettered at once with a reason, under one id (the one that
    # cannot be parsed under the SHA-1 of its bytes), and no worker crashed on the way
    letters = {d["id"]: d for d in env.dead_letters()}
    deep_id = sha1(bad[2])
    assert {k: (v["reason"], v["attempts"]) for k, v in letters.items()} == {
        "surrogate": ("invalid_json", 0), "junk": ("invalid_json", 0),
        deep_id: ("invalid_json", 0)}
    assert letters[deep_id]["message_bytes"] == len(bad[2])
    assert letters[deep_id]["message_truncated"] is True
    assert sorted(e["id"] for e in env.done_events()) == ["good0", "good1", "good2"]
    assert _crashes(env) == 0, env.log_text()
    assert env.r.hlen(env.keys.attempts) == 0
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"workers": 1},
                       "job": {"max_message_bytes": "8MiB", "dead_message_bytes": "4KiB",
                               "dead_max": 3}})
def test_dead_letters_keep_a_bounded_part_of_the_message_and_the_list_is_capped(env):
    # Given a 6 MB message that cannot be a job and six more bad messages
    huge = b'{"id": "huge", "url": "http://h/v.mp4", "pad": "' + b"x" * 6_000_000 + b'", '
    env.push(huge, *[f'{{"id": "bad{i}", "url": "ftp://h/v"}}' for i in range(6)])
    proc = env.start()
    wait_for(lambda: env.r.llen(env.keys.queue) == 0 and not any(
        env.processing_lists().values()), 30, what="every bad message handled")
    wait_for(lambda: "bad5" in env.log_text(), 10, what="the last dead letter")
    # Then the dead list holds only the newest three, and no letter holds the whole message
    assert env.r.llen(env.keys.dead) == 3
    assert [d["id"] for d in env.dead_letters()] == ["bad5", "bad4", "bad3"]
    assert env.stop(proc) == 0


def test_a_huge_dead_letter_is_truncated_and_not_replayable(env):
    env.settings["job"].update({"max_message_bytes": "1MiB", "dead_message_bytes": "4KiB"})
    huge = ('{"id": "huge", "url": "http://h/\u00e9' + "\u00e9" * 2_000_000 + '"}').encode()
    env.push(huge)
    proc = env.start()
    env.wait_finished(1)
    assert env.stop(proc) == 0
    (entry,) = env.r.lrange(env.keys.dead, 0, -1)
    letter = json.loads(entry)
    assert len(entry) < 10_000
    # too large to be parsed for its id: known by the SHA-1 of its bytes
    assert letter["reason"] == "message_too_large" and letter["id"] == sha1(huge)
    assert letter["message_truncated"] is True and letter["message_bytes"] == len(huge)
    assert huge.decode().startswith(letter["message"])  # cut between characters, as text
    retry = env.cli("dead", "retry", sha1(huge), check=False)
    assert retry.returncode == 1 and "keeps only part" in retry.stderr
    assert env.r.llen(env.keys.queue) == 0 and env.r.llen(env.keys.dead) == 1


def test_the_cli_refuses_what_a_worker_would_refuse(env):
    # A non-UTF-8 byte in argv arrives as a lone surrogate: once written into the queue as
    # "\udcff", it crashed every worker
    for args, reason in (([b"http://example.invalid/clip\xff.mp4"], "invalid_json"),
                         ([b"http://127.0.0.1:99999/a.mp4"], "bad_url"),
                         ([b"http://h/a.mp4", b"--output", b"x" * 300 + b".mp4"],
                          "output_not_allowed")):
        done = subprocess.run([sys.executable, "-m", "supervisor", "enqueue", *args,
                               "--config", env.conf.encode()], cwd=ROOT, capture_output=True,
                              timeout=60)
        assert done.returncode == 1, (args, done.stderr)
        assert reason.encode() in done.stderr and b"Traceback" not in done.stderr
    assert env.r.llen(env.keys.queue) == 0


@pytest.mark.settings({"job": {"max_attempts": 2}})
def test_urls_and_outputs_that_can_never_work_are_refused_not_retried(env):
    env.push({"id": "nul", "url": "http://127.0.0.1/a\u0000.mp4"},
             {"id": "port", "url": "http://127.0.0.1:99999/a.mp4"},
             {"id": "idn", "url": "http://b\u00fccher.example/a.mp4"},
             {"id": "long", "url": env.url("ten.mp4"), "output": "y" * 256 + ".mp4"})
    proc = env.start()
    env.wait_finished(4)
    assert env.stop(proc) == 0
    letters = {d["id"]: (d["reason"], d["attempts"]) for d in env.dead_letters()}
    assert letters == {"nul": ("bad_url", 0), "port": ("bad_url", 0), "idn": ("bad_url", 0),
                       "long": ("output_not_allowed", 0)}
    assert not os.path.exists(env.out) or os.listdir(env.out) == []


def _write_refused(env, how: str) -> None:
    if how == "noreplicas":  # writes need a replica that does not exist
        env.r.config_set("min-replicas-to-write", 1)
    elif how == "oom":
        env.r.config_set("maxmemory-policy", "noeviction")
        env.r.config_set("maxmemory", 1)
    else:
        # A replica of a master that does not answer: it serves reads and refuses writes
        env.r.execute_command("REPLICAOF", "127.0.0.1", str(RedisServer("/nonexistent").port))


def _write_allowed(env, how: str) -> None:
    if how == "noreplicas":
        env.r.config_set("min-replicas-to-write", 0)
    elif how == "oom":
        env.r.config_set("maxmemory", 0)
    else:
        env.r.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("how", ["oom", "readonly", "noreplicas"])
def test_a_redis_that_refuses_writes_pauses_the_workers_without_a_crash(env, how):
    # Given an idle pool
    proc = env.start()
    pids = env.wait_workers(proc, 2)
    # When Redis refuses every write (maxmemory with noeviction, or turned into a replica)
    # for a while, with jobs already queued
    env.push(*_good(env, 2))
    _write_refused(env, how)
    # (taking a job, or starting one taken just before: both workers, several times each;
    # what is checked is that none of them crashes meanwhile)
    wait_for(lambda: env.log_text().count("Redis unavailable during") >= 6, 30,
             what="the workers to retry a few times")
    assert env.workers(proc) == pids, env.log_text()[-3000:]
    # Then, once writes are allowed again, the same workers do the jobs
    _write_allowed(env, how)
    env.wait_finished(2, timeout=30)
    assert sorted(e["id"] for e in env.done_events()) == ["good0", "good1"]
    assert env.workers(proc) == pids and _crashes(env) == 0
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"workers": 1},
                       "job": {"retry_backoff": 3, "max_attempts": 2}})
def test_a_host_whose_clock_is_an_hour_ahead_reports_true_uptimes_and_delays(env):
    # Given a supervisor whose host clock runs an hour ahead of Redis's and of ours
    libs = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert libs, "libfaketime is required (scripts/test.sh installs the faketime package)"
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", env.conf],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "LD_PRELOAD": libs[0], "FAKETIME": "+1h"})
    env.procs.append(proc)
    wait_for(lambda: env.r.hlen(env.keys.workers) == 1, 20, what="the worker to register")
    # When a job fails for a transient reason (a 503), and stats is read from here
    env.push({"id": "flaky", "url": f"{env.http.url('ten.mp4').rsplit('/', 1)[0]}/status/503",
              "duration": 1})
    wait_for(lambda: "retry in" in env.log_text(), 20, what="the retry log line")
    stats = json.loads(env.cli("stats", "--json").stdout)
    # Then the delay logged is the backoff (the due time is Redis's, the wait is counted
    # there too), and the worker's uptime is its own, not our clock minus its clock
    assert re.search(r"job flaky failed \(source_unavailable\), attempt 1, retry in 3\.0 s",
                     env.log_text()), env.log_text()[-2000:]
    (worker,) = stats["workers"]
    assert 0 <= worker["uptime"] < 120, worker
    assert env.stop(proc) == 0


@pytest.mark.parametrize("fields", [
    {"start": 1e13}, {"start": 1e20, "duration": 1}, {"start": 1e308, "duration": 1e308},
    {"duration": 1e-9}, {"start": 5, "end": 5.0000001}, {"start": 10 ** 4000},
    {"duration": -(10 ** 400)},
])
def test_times_no_clip_can_have_are_refused_at_once(fields):
    # Once accepted, these went to ffmpeg ("Invalid duration specification"), were retried
    # as ffmpeg failures, or blamed the source for an empty clip; 10**4000 was a parser bug
    from worker import config as config_mod
    from worker.job import Rejected, intake

    raw = json.dumps({"id": "t", "url": "http://h/v.mp4", **fields}).encode()
    rejected = intake(raw, config_mod.load(None, env={}))
    assert isinstance(rejected, Rejected) and rejected.error.reason == "bad_range"
    assert rejected.id == "t"


def test_an_id_behind_a_form_feed_is_the_same_id_for_the_parser_and_the_letter():
    from worker import config as config_mod
    from worker.job import Rejected, intake

    rejected = intake(b'\x0c\x0b {"id": "d", "url": "ftp://x/v"}', config_mod.load(None, env={}))
    assert isinstance(rejected, Rejected) and rejected.id == "d"
    assert rejected.error.reason == "scheme_not_allowed"


def test_a_callback_must_be_https_or_http_where_private_networks_are_allowed():
    from worker import config as config_mod
    from worker.job import Job, Rejected, intake

    public = config_mod.load(None, env={})
    private = config_mod.load(None, env={"CLIP_SUPERVISOR_JOB_ALLOW_PRIVATE_NETWORKS": "true"})

    def job(callback: object, cfg) -> Job | Rejected:
        return intake(json.dumps({"id": "c", "url": "http://h/v.mp4",
                                  "callback": callback}).encode(), cfg)

    assert job("https://hooks.example/clip", public).callback == "https://hooks.example/clip"
    assert job("http://127.0.0.1:8080/hook", private).callback == "http://127.0.0.1:8080/hook"
    for bad in ("http://hooks.example/clip", "ftp://h/x", "https:///nohost", 7,
                "https://h/a b", "https://h:99999/x"):
        refused = job(bad, public)
        assert isinstance(refused, Rejected) and refused.error.reason == "bad_callback", bad
