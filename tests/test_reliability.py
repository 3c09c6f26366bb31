"""Crashes, signals and bad input: nothing lost, nothing done twice, nothing stuck.

Real processes and real signals throughout: a "killed worker" is a worker process that got
SIGKILL from the test, and a "poison message" is one whose worker the test kills every time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.conftest import child_named, gone, kill_tree, wait_for
from worker import media
from worker.queue import sha1


def _job(env, job_id, slow=0.0, **extra):
    return {"id": job_id, "url": env.url("ten.mp4", slow), "start": 1, "duration": 2, **extra}


def _assert_nothing_in_flight(env):
    assert all(not items for items in env.processing_lists().values()), env.processing_lists()


def test_sigkilled_worker_job_is_requeued_within_a_second_and_finished_once(env):
    # Given a job that takes ~3 s to fetch, held by a worker
    (raw,) = env.push(_job(env, "victim", slow=3))
    proc = env.start()
    pid = wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    before = set(env.workers(proc))

    # When that worker is SIGKILLed in the middle of the job
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: env.r.hget(env.keys.attempts, sha1(raw)) == b"1", 2, interval=0.005,
             what="the crash to be counted and the message requeued")
    requeue_s = time.monotonic() - killed_at
    print(f"worker-death-to-requeue: {requeue_s * 1000:.0f} ms")

    # Then it is back within 1 s, finished by another worker, output once, slot respawned
    assert requeue_s < 1.0
    env.wait_finished(1, timeout=30)
    events = env.done_events()
    assert [e["id"] for e in events] == ["victim"]
    assert events[0]["worker"].split(":")[1] != str(pid)
    assert os.listdir(env.out) == ["victim.mp4"]
    _assert_nothing_in_flight(env)
    after = wait_for(lambda: env.workers(proc) if len(env.workers(proc)) == 2 else None)
    assert pid not in after and len(set(after) - before) == 1
    assert "killed by SIGKILL" in env.log_text()
    # The dead worker's folder is gone
    wait_for(lambda: all(str(pid) not in name for name in os.listdir(env.work)))
    assert env.stop(proc) == 0


def test_cache_files_left_half_written_by_dead_workers_are_removed(env):
    cache = os.path.join(env.work, "cache")
    os.makedirs(cache, mode=0o700)
    key = "0af4eebc2ec3b0b086a4189b610d289094ab3455"

    def plant(*names: str) -> None:
        for name in names:
            with open(os.path.join(cache, name), "w") as fh:
                fh.write("{")

    def left() -> list[str]:
        return sorted(n for n in os.listdir(cache) if n.startswith(".tmp-"))

    # Given a file left by a worker of an earlier run (its process is gone), and one of a
    # live process
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant(f".tmp-{dead.pid}-{key}.data", f".tmp-{os.getpid()}-{key}.json",
          f".tmp-99999999999999999999-{key}.json", f".tmp-\u00b2-{key}.json")
    # When the supervisor starts, then the first is removed, the other kept
    proc = env.start()
    pid, other = env.wait_workers(proc, 2)
    # (and names no pid can have, which any user could plant, are left to the sweep)
    wait_for(lambda: left() == sorted([f".tmp-{os.getpid()}-{key}.json",
                                       f".tmp-99999999999999999999-{key}.json",
                                       f".tmp-\u00b2-{key}.json"]), 10,
             what="the start to remove the file of a dead worker")
    for name in (f".tmp-99999999999999999999-{key}.json", f".tmp-\u00b2-{key}.json"):
        os.unlink(os.path.join(cache, name))
    # Given the cache files two workers are writing (a kill between open and rename leaves
    # them), and one of a process whose pid only begins alike
    plant(f".tmp-{pid}-{key}.json", f".tmp-{pid}-{key}.data", f".tmp-{other}-{key}.json",
          f".tmp-{pid}0-{key}.json")
    # When one of the workers is SIGKILLed
    os.kill(pid, signal.SIGKILL)
    # Then its files are gone as soon as the master has reaped it, and only its files
    kept = sorted([f".tmp-{os.getpid()}-{key}.json", f".tmp-{other}-{key}.json",
                   f".tmp-{pid}0-{key}.json"])
    wait_for(lambda: left() == kept, 5, what="the dead worker's half-written files to be "
             "removed, and only those")
    wait_for(lambda: "removed 2 file(s) dead workers left half-written" in env.log_text(), 5,
             what="the master's log line")
    assert env.stop(proc) == 0


def test_a_sigkilled_worker_takes_its_ffmpeg_with_it(env, heavy_video):
    # Given a worker whose ffmpeg is re-encoding a clip (a few seconds of work)
    (raw,) = env.push({"id": "enc", "url": env.url(heavy_video), "mode": "encode"})
    proc = env.start()
    pid = wait_for(lambda: env.holder_of(raw), what="a worker to take the job")

    child = wait_for(lambda: child_named(pid, "ffmpeg"), 20, what="the worker's ffmpeg")
    # When the worker is SIGKILLed, so that it cannot clean up
    os.kill(pid, signal.SIGKILL)
    # Then its ffmpeg dies too, and the job is done again by another
    wait_for(lambda: gone(child.pid), 5, what="the orphaned ffmpeg to die")
    env.wait_finished(1, timeout=60)
    assert [e["id"] for e in env.done_events()] == ["enc"]
    assert env.stop(proc) == 0


@pytest.mark.parametrize("launcher", ["die-with-parent", "setpriv", "preexec_fn"])
def test_a_program_started_for_a_job_dies_with_the_process_that_started_it(launcher):
    # ffmpeg would also die of SIGPIPE at its next progress line to a dead worker; the
    # parent-death signal does not wait for that (nor for a program that prints nothing).
    # Through die-with-parent (built at install), else setpriv (util-linux), else a
    # preexec_fn: each is tried here on its own (see media._death_prefix).
    prefix = {"die-with-parent": "[media._HELPER]",
              "setpriv": "[media._SETPRIV, '--pdeathsig', 'KILL', '--']",
              "preexec_fn": "[]"}[launcher]
    code = ("import subprocess, time\n"
            "from worker import media\n"
            f"media._prefix = {prefix}\n"
            "argv, preexec = media._launcher(['sleep', '60'])\n"
            "child = subprocess.Popen(argv, preexec_fn=preexec, start_new_session=True)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        wait_for(lambda: psutil.Process(child).name() == "sleep", 5, what="the program")
        parent.kill()
        wait_for(lambda: gone(child), 5, what="the program to die with its parent")
    finally:
        kill_tree(parent.pid)
        parent.wait()


def test_sigterm_to_supervisor_finishes_jobs_in_flight_and_leaves_the_rest(env):
    # Given two slow jobs in flight and five more waiting
    in_flight = env.push(_job(env, "a", slow=2), _job(env, "b", slow=2))
    proc = env.start()
    env.wait_in_flight(in_flight[0], in_flight[1])
    waiting = env.push(*[_job(env, f"w{i}") for i in range(5)])

    # When the supervisor gets SIGTERM
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)

    # Then the jobs in flight finished, nothing more was fetched, and it exited 0
    assert code == 0
    assert sorted(e["id"] for e in env.done_events()) == ["a", "b"]
    assert env.r.lrange(env.keys.queue, 0, -1) == list(reversed(waiting))
    _assert_nothing_in_flight(env)
    assert env.r.hlen(env.keys.workers) == 0
    assert sorted(os.listdir(env.out)) == ["a.mp4", "b.mp4"]


def test_sigterm_to_one_worker_finishes_its_job_and_is_replaced(env):
    (raw,) = env.push(_job(env, "finish-me", slow=2))
    proc = env.start()
    pid = wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    os.kill(pid, signal.SIGTERM)
    env.wait_finished(1, timeout=30)
    events = env.done_events()
    assert events[0]["id"] == "finish-me" and f":{pid}:" in events[0]["worker"]
    wait_for(lambda: len(env.workers(proc)) == 2 and pid not in env.workers(proc),
             what="the worker to be replaced")
    assert env.r.hget(env.keys.attempts, sha1(raw)) is None
    assert env.stop(proc) == 0


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGINT])
def test_quit_or_int_to_one_worker_aborts_and_requeues_its_job(env, sig):
    (raw,) = env.push(_job(env, "abort-me", slow=2))
    proc = env.start()
    pid = wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    os.kill(pid, sig)
    # The worker exits at once, without finishing the 2 s fetch...
    wait_for(lambda: gone(pid), 1.5, what="the worker to exit")
    # ...and the job is finished by another worker, exactly once, with no attempt counted.
    env.wait_finished(1, timeout=30)
    events = env.done_events()
    assert [e["id"] for e in events] == ["abort-me"]
    assert f":{pid}:" not in events[0]["worker"]
    assert "aborted, message given back" in env.log_text()
    assert env.r.hget(env.keys.job("abort-me"), "state") == b"done"
    _assert_nothing_in_flight(env)
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"max_attempts": 3}})
def test_poison_message_is_dead_lettered_after_max_attempts_and_others_flow(env):
    # Given a message whose worker dies every time it holds it, among 8 good jobs
    (poison,) = env.push(_job(env, "poison", slow=5))
    good = env.push(*[_job(env, f"good{i}") for i in range(8)])
    kills = []
    stop = threading.Event()

    def killer():
        # Kill a holder once it is surely running the job (the source takes 5 s to fetch),
        # not in the instant it takes the message only to dead-letter it.
        seen: dict[int, float] = {}
        while not stop.is_set():
            pid = env.holder_of(poison)
            if pid and time.monotonic() - seen.setdefault(pid, time.monotonic()) >= 0.3:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
                while env.holder_of(poison) == pid and not stop.is_set():
                    time.sleep(0.01)
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    proc = env.start()
    thread.start()
    try:
        env.wait_finished(len(good) + 1, timeout=60)
    finally:
        stop.set()
        thread.join()
    # Then it crashed max_attempts workers and was dead-lettered as poison; the rest are done
    assert len(set(kills)) == 3
    letters = env.dead_letters()
    assert [(d["id"], d["reason"], d["attempts"]) for d in letters] == [("poison", "poison", 3)]
    assert json.loads(letters[0]["message"])["id"] == "poison"
    assert sorted(e["id"] for e in env.done_events()) == sorted(f"good{i}" for i in range(8))
    assert env.r.hget(env.keys.attempts, sha1(poison)) is None
    _assert_nothing_in_flight(env)
    assert env.stop(proc) == 0


def test_malformed_input_is_dead_lettered_with_distinct_reasons(env):
    cases = {
        "invalid_json": b'{"url": "http://x/", ',
        "no_url": {"id": "no-url", "start": 1},
        "bad_range": {"id": "neg", "url": env.url("ten.mp4"), "start": -1},
        "past_end": {"id": "past", "url": env.url("ten.mp4"), "start": 30, "duration": 2},
        "not_video": {"id": "html", "url": env.url("page.html")},
        "not_found": {"id": "missing", "url": env.url("nope.mp4")},
        "scheme_not_allowed": {"id": "ftp", "url": "ftp://127.0.0.1/x.mp4"},
        "not_utf8": b"\xff\xfe\x00garbage",
        "bad_id": {"id": "../../etc", "url": env.url("ten.mp4")},
        "output_not_allowed": {"id": "escape", "url": env.url("ten.mp4"),
                               "output": "../escape.mp4"},
        "message_too_large": json.dumps({"url": env.url("ten.mp4"),
                                         "pad": "x" * (1024 * 1024)}),
    }
    env.push(*cases.values())
    env.push(*[_job(env, f"ok{i}") for i in range(3)])
    proc = env.start()
    pids = env.wait_workers(proc, 2)
    env.wait_finished(len(cases) + 3, timeout=60)
    letters = env.dead_letters()
    assert sorted(d["reason"] for d in letters) == sorted(cases)
    for letter in letters:
        assert letter["attempts"] in (0, 1) and letter["error"] and letter["time"]
        assert ("message" in letter) != ("message_b64" in letter)
    assert next(d for d in letters if d["reason"] == "not_utf8")["message_b64"]
    assert sorted(e["id"] for e in env.done_events()) == ["ok0", "ok1", "ok2"]
    assert env.workers(proc) == pids  # no worker crashed
    assert env.r.zcard(env.keys.delayed) == 0  # nothing permanent was retried
    assert "Traceback" not in env.log_text()
    assert env.stop(proc) == 0


def test_sigkilled_supervisor_workers_exit_and_next_supervisor_recovers(env):
    held = env.push(_job(env, "k1", slow=4), _job(env, "k2", slow=4))
    proc = env.start()
    env.wait_in_flight(held[0], held[1])
    workers = env.workers(proc)

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    # The orphaned workers notice, give their jobs back and exit within a few seconds,
    # killing their ffmpeg/downloads on the way out.
    wait_for(lambda: all(gone(p) for p in workers), 5,
             what="orphaned workers to exit")
    assert not [p for p in psutil.process_iter(["cmdline"])
                if env.work in " ".join(p.info["cmdline"] or [])]

    proc2 = env.start()
    env.wait_finished(2, timeout=40)
    assert sorted(e["id"] for e in env.done_events()) == ["k1", "k2"]
    assert sorted(os.listdir(env.out)) == ["k1.mp4", "k2.mp4"]
    _assert_nothing_in_flight(env)
    assert env.stop(proc2) == 0


def test_supervisor_recovers_processing_list_of_a_worker_killed_with_it(env):
    # Given a whole pool SIGKILLed at once (master and worker: no one could give anything back)
    (raw,) = env.push(_job(env, "orphan", slow=4))
    proc = env.start()
    wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    kill_tree(proc.pid)  # workers first, then the master
    proc.wait(5)
    assert env.holder_of(raw)  # still in the dead worker's processing list

    # When a new supervisor starts on the same host, it recovers it without waiting for a TTL
    proc2 = env.start()
    env.wait_finished(1, timeout=30)
    assert [e["id"] for e in env.done_events()] == ["orphan"]
    assert env.r.hget(env.keys.job("orphan"), "state") == b"done"
    _assert_nothing_in_flight(env)
    assert env.stop(proc2) == 0
    # and it removed the dead worker's temporary folder
    assert env.work_leftovers() == []


@pytest.mark.settings({"supervisor": {"workers": 1, "restart_backoff_max": 2}})
def test_worker_that_cannot_start_makes_the_supervisor_back_off(env):
    proc = env.start()
    (pid,) = env.wait_workers(proc, 1)
    # Make every new worker fail at boot: its work folder cannot be created
    os.rename(env.work, env.work + ".moved")
    with open(env.work, "w") as fh:
        fh.write("not a folder")
    os.kill(pid, signal.SIGKILL)
    time.sleep(4)
    spawns = env.log_text().count("spawned worker")
    # 0.5 + 1 + 2 + 2 s of backoff: a handful of tries, never a fork bomb
    assert 3 <= spawns <= 7, spawns
    assert "failed to start" in env.log_text()
    # When the cause is fixed, the slot comes back
    os.unlink(env.work)
    os.rename(env.work + ".moved", env.work)
    env.wait_workers(proc, 1, timeout=5)
    assert env.stop(proc) == 0


def test_ctrl_c_at_the_terminal_stops_gracefully(env):
    # A terminal sends INT to the whole foreground process group, workers included.
    (raw,) = env.push(_job(env, "finish-on-ctrl-c", slow=2))
    proc = env.start()
    wait_for(lambda: env.holder_of(raw), what="a worker to take the job")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 0
    assert [e["id"] for e in env.done_events()] == ["finish-on-ctrl-c"]
    assert "aborted" not in env.log_text()


def test_ffmpeg_is_started_through_die_with_parent_which_the_install_built():
    # setup.py builds it beside the worker package (the editable install of the tests, the
    # wheel, the Debian package); without it every clip would pay setpriv's ~1 ms
    media._prefix = None
    try:
        argv, preexec = media._launcher(["sleep", "1"])
    finally:
        media._prefix = None
    assert argv == [media._HELPER, shutil.which("sleep"), "1"] and preexec is None


def test_a_launcher_that_does_not_run_here_is_passed_over(monkeypatch, tmp_path):
    # a die-with-parent built for another machine, and a setpriv from before util-linux 2.33
    # (no --pdeathsig): each fails its trial run, and the next way is used
    foreign = tmp_path / "die-with-parent"
    foreign.write_bytes(b"\x7fELF not for this machine")
    foreign.chmod(0o755)
    monkeypatch.setattr(media, "_HELPER", str(foreign))
    monkeypatch.setattr(media, "_prefix", None)
    argv, preexec = media._launcher(["sleep", "1"])
    assert argv[:4] == [media._SETPRIV, "--pdeathsig", "KILL", "--"] and preexec is None
    monkeypatch.setattr(media, "_SETPRIV", shutil.which("false"))
    monkeypatch.setattr(media, "_prefix", None)
    argv, preexec = media._launcher(["sleep", "1"])
    assert argv == [shutil.which("sleep"), "1"] and preexec is media.die_with_parent


def test_die_with_parent_says_why_it_cannot_run_a_program(tmp_path):
    # the worker tells a missing ffmpeg (127, "failed to execute") from a broken one
    run = subprocess.run([media._HELPER, str(tmp_path / "nothing-here")], capture_output=True,
                         text=True, timeout=10)
    assert run.returncode == 127
    assert f"failed to execute {tmp_path / 'nothing-here'}" in run.stderr
    failed = media.failure(run.returncode, media.InputReport.parse(run.stderr.encode()),
                           run.stderr, ended=False, start=0.0)
    assert failed is not None and failed.reason == "ffmpeg_missing"
    usage = subprocess.run([media._HELPER], capture_output=True, text=True, timeout=10)
    assert usage.returncode == 126 and "usage" in usage.stderr
