"""Running as a service: --daemon, the pid file, stop/status/reload, HUP, TTIN/TTOU, USR1.

Real processes and real signals: each daemon is started with ``clip-supervisor run
--daemon`` as an operator would, found through its pid file, and watched through the pid
file lock (a daemon's parent is PID 1, which may reap it late: a zombie still answers
``kill -0``, so that would lie). The
control commands (status, stop, reload) run through ``cli.main`` in the test's process: the
same code, without a Python start-up each; tests/test_init_script.py runs them as commands.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
from types import SimpleNamespace

import psutil

from supervisor import cli
from supervisor.pidfile import holder
from tests.conftest import ROOT, gone, wait_for


def _job(env, job_id, slow=0.0):
    return {"id": job_id, "url": env.url("ten.mp4", slow), "start": 1, "duration": 2}


def _start(env, *extra):
    """``run --daemon``; returns the master's pid, read from the locked pid file."""
    done = env.cli("run", "--daemon", *extra)
    assert done.stderr == ""
    pid = holder(env.pidfile)[1]  # held the moment the launcher returned: no waiting
    assert pid is not None and pid > 0
    return pid


def _ctl(env, *args):
    """A control command (status, stop, reload) run in this process: the console command's
    own code against the real daemon, without a Python start-up per call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*args, "--config", env.conf])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _as_proc(pid):
    return SimpleNamespace(pid=pid)  # what Env.workers and Env.wait_workers look at


def _lines(path):
    with open(path) as fh:
        return fh.read().splitlines()


# --- start, second start, status, stop --------------------------------------------------------


def test_daemon_detaches_and_holds_the_pid_file_until_stopped(daemon_env):
    env = daemon_env
    # When it is started as a daemon by a parent that passes it an extra open fd
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "supervisor", "run", "--daemon", "--config", env.conf]
    launched = subprocess.run(cmd, cwd=ROOT, pass_fds=(write_end,), capture_output=True,
                              text=True, timeout=30)
    os.close(write_end)

    # Then the launcher returned 0 once the lock was held, and no process of ours kept the
    # inherited fd (a shell reading that pipe would otherwise wait for the daemon's end)
    assert launched.returncode == 0 and launched.stderr == ""
    pid = holder(env.pidfile)[1]
    assert pid is not None and pid > 0
    assert select.select([read_end], [], [], 2)[0] and os.read(read_end, 1) == b""
    os.close(read_end)

    # And the master is a classic daemon: not our child, in a session of its own but not
    # its leader (second fork), at /, umask 022, stdin /dev/null, stdout and stderr on the
    # log file
    with open(env.pidfile) as fh:
        assert fh.read() == f"{pid}\n"
    master = psutil.Process(pid)
    assert master.ppid() != os.getpid()
    assert os.getsid(pid) != os.getsid(0) and os.getsid(pid) != pid
    assert master.cwd() == "/"
    with open(f"/proc/{pid}/status") as fh:
        assert "Umask:\t0022" in fh.read()
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == env.log
    workers = env.wait_workers(_as_proc(pid), 2)
    wait_for(lambda: "master" in " ".join(master.cmdline()), what="the master's title")

    # And status says so, with its workers and jobs in flight
    status = _ctl(env, "status")
    assert status.returncode == 0
    assert f"running (pid {pid}, 2 workers, 0 jobs in flight)" in status.stdout

    # When it is stopped
    stop = _ctl(env, "stop")

    # Then stop returned once the lock was free, the pid file is gone, and so is every process
    assert stop.returncode == 0 and f"stopped (pid {pid})" in stop.stdout
    assert holder(env.pidfile) == (False, None)
    wait_for(lambda: all(gone(p) for p in [pid, *workers]), 5, what="master and workers gone")
    assert "master stopped" in env.log_text()

    # And the commands agree that nothing runs: status 3, stop 0, reload 3
    assert _ctl(env, "status").returncode == 3
    again = _ctl(env, "stop")
    assert again.returncode == 0 and "not running" in again.stdout
    reload = _ctl(env, "reload")
    assert reload.returncode == 3 and "not running" in reload.stdout


def test_second_start_is_refused_with_the_running_pid(daemon_env):
    env = daemon_env
    # Given a running daemon
    pid = _start(env)

    # When another start is attempted
    second = env.cli("run", "--daemon", check=False)

    # Then it fails with the pid of the running one, which keeps its pid file
    assert second.returncode == 1
    assert second.stderr.strip() == f"clip-supervisor: already running (pid {pid})"
    assert holder(env.pidfile)[1] == pid
    assert _ctl(env, "stop").returncode == 0


def test_two_simultaneous_starts_make_exactly_one_daemon(daemon_env):
    env = daemon_env
    # When two starts race (both may pass the launcher's early check)
    cmd = [sys.executable, "-m", "supervisor", "run", "--daemon", "--config", env.conf]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(30), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()

    # Then one started, the other was refused naming the winner
    pid = holder(env.pidfile)[1]
    assert pid is not None and pid > 0
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert f"already running (pid {pid})" in loser
    assert env.log_text().count("master started") == 1
    assert _ctl(env, "stop").returncode == 0


def test_stale_pid_file_is_reported_and_taken_over(daemon_env):
    env = daemon_env
    # Given a pid file left by a master that died (its pid is gone, nobody holds the lock)
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(os.path.dirname(env.pidfile))
    with open(env.pidfile, "w") as fh:
        fh.write(f"{dead.pid}\n")

    # Then status says "dead but pid file exists" (LSB 1)
    status = _ctl(env, "status")
    assert status.returncode == 1 and "stale" in status.stdout

    # When a daemon starts, it takes the file over
    pid = _start(env)
    assert pid != dead.pid
    with open(env.pidfile) as fh:
        assert fh.read() == f"{pid}\n"
    assert _ctl(env, "stop").returncode == 0

    # And stop on a stale file removes it, after which status is 3
    with open(env.pidfile, "w") as fh:
        fh.write(f"{dead.pid}\n")
    stop = _ctl(env, "stop")
    assert stop.returncode == 0 and "removed stale pid file" in stop.stdout
    assert not os.path.exists(env.pidfile)
    assert _ctl(env, "status").returncode == 3


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, b"%d\\n" % os.getpid())
print("locked", flush=True)
time.sleep(60)
"""


def test_pid_file_locked_by_another_process_is_not_clobbered(daemon_env):
    env = daemon_env
    # Given an unrelated live process that holds the pid file's lock
    os.makedirs(os.path.dirname(env.pidfile))
    other = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, env.pidfile],
                             stdout=subprocess.PIPE, text=True)
    env.procs.append(other)
    assert other.stdout.readline() == "locked\n"
    other.stdout.close()

    # When a daemon is started
    start = env.cli("run", "--daemon", check=False)

    # Then it refuses, naming that process, and leaves its file and lock alone
    assert start.returncode == 1
    assert f"already running (pid {other.pid})" in start.stderr
    with open(env.pidfile) as fh:
        assert fh.read() == f"{other.pid}\n"
    assert holder(env.pidfile)[1] == other.pid
    assert other.poll() is None
    assert "master started" not in env.log_text()


# --- start results ---------------------------------------------------------------------------


def test_start_failures_exit_1_with_one_clear_line(daemon_env):
    env = daemon_env
    # Given a bad value in the config
    env.settings["supervisor"]["workers"] = "lots"
    bad = env.cli("run", "--daemon", check=False)
    # Then the start fails at once with a message naming the key, and no traceback
    assert bad.returncode == 1
    assert "[supervisor] workers" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not os.path.exists(env.pidfile)

    # Given a failure only the detached daemon meets (its work_dir cannot be created)
    env.settings["supervisor"]["workers"] = 1
    blocker = os.path.join(env.tmp, "blocker")
    open(blocker, "w").close()
    env.settings["job"]["work_dir"] = os.path.join(blocker, "work")
    late = env.cli("run", "--daemon", check=False)
    # Then the launcher still reports it, and the daemon gave up its pid file
    assert late.returncode == 1
    assert late.stderr.strip() == \
        f"clip-supervisor: cannot create work_dir {blocker}/work: Not a directory"
    assert holder(env.pidfile) == (False, None)
    assert "cannot start" in env.log_text()


def test_unreachable_redis_is_no_reason_not_to_start(daemon_env):
    env = daemon_env
    # Given a Redis that is down
    env.redis.stop()
    # When the daemon starts, it serves (and retries Redis)
    pid = _start(env)
    status = _ctl(env, "status")
    assert status.returncode == 0 and f"pid {pid}" in status.stdout
    assert "jobs in flight unknown" in status.stdout
    # And once Redis is back, it does its work
    env.redis.start()
    env.push(_job(env, "late"))
    env.wait_finished(1, timeout=20)
    assert [e["id"] for e in env.done_events()] == ["late"]
    assert _ctl(env, "stop").returncode == 0


def test_stop_with_a_job_in_flight_waits_and_reports_a_timeout(daemon_env):
    env = daemon_env
    env.settings["supervisor"]["workers"] = 1
    # Given a job in flight that needs ~2 s
    (raw,) = env.push(_job(env, "long", slow=2))
    pid = _start(env)
    wait_for(lambda: env.holder_of(raw), what="the job in flight")
    assert "1 job in flight" in _ctl(env, "status").stdout

    # When stop may wait only 0.3 s, it says the daemon is still running
    quick = _ctl(env, "stop", "--timeout", "0.3")
    assert quick.returncode == 1 and f"still running (pid {pid})" in quick.stderr
    assert holder(env.pidfile)[1] == pid

    # And a patient stop returns 0 after the job finished, once
    assert _ctl(env, "stop").returncode == 0
    assert [e["id"] for e in env.done_events()] == ["long"]


def test_daemon_started_with_standard_streams_closed_still_logs_and_works(daemon_env):
    env = daemon_env
    # When the daemon is launched with stdin, stdout and stderr closed (as init may do)
    cmd = [sys.executable, "-m", "supervisor", "run", "--daemon", "--config", env.conf]
    launched = subprocess.run(["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh", *cmd], cwd=ROOT,
                              timeout=30)

    # Then it started, its standard streams are /dev/null and the log, and it works
    assert launched.returncode == 0
    pid = holder(env.pidfile)[1]
    assert pid is not None and pid > 0
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == \
        ["/dev/null", env.log, env.log]
    env.push(_job(env, "closed"))
    env.wait_finished(1, timeout=20)
    assert [e["id"] for e in env.done_events()] == ["closed"]
    # the worker writes its line just after the ack that the done event is part of
    wait_for(lambda: "job closed done" in env.log_text(), 10, what="the job's log line")
    assert f"master[{pid}] master started" in env.log_text()
    assert _ctl(env, "stop").returncode == 0


# --- signals ---------------------------------------------------------------------------------


def test_reload_replaces_workers_after_their_jobs_and_applies_the_new_config(daemon_env):
    env = daemon_env
    # Given a daemon logging JSON, 2 workers each in the middle of a 2 s job, 2 more waiting
    pid = _start(env, "--log-format", "json")
    old = env.wait_workers(_as_proc(pid), 2)
    raws = env.push(_job(env, "h0", slow=2), _job(env, "h1", slow=2), _job(env, "h2"),
                    _job(env, "h3"))
    held = wait_for(lambda: [env.holder_of(r) for r in raws[:2]]
                    if all(env.holder_of(r) for r in raws[:2]) else None,
                    what="two jobs in flight")

    # When the file now says 3 workers, and the daemon is told to reload
    env.settings["supervisor"]["workers"] = 3
    env.conf  # noqa: B018 (the property rewrites the file)
    reload = _ctl(env, "reload")
    assert reload.returncode == 0 and f"reloading (pid {pid})" in reload.stdout

    # Then every old worker is replaced (after its job), and there are 3 of them
    new = wait_for(lambda: (w := env.workers(_as_proc(pid))) and len(w) == 3
                   and not set(w) & set(old) and w, 15, what="3 new workers")
    env.wait_workers(_as_proc(pid), 3)
    # And every job completed exactly once; the two in flight by the worker that held them
    env.wait_finished(4, timeout=30)
    events = {e["id"]: e for e in env.done_events()}
    assert sorted(events) == ["h0", "h1", "h2", "h3"]
    assert len(env.done_events()) == 4 and env.dead_letters() == []
    assert not any(int(v) for v in env.r.hvals(env.keys.attempts))  # no failed attempt
    for raw, holder_pid in zip(raws[:2], held, strict=True):
        job_id = json.loads(raw)["id"]
        assert events[job_id]["worker"].split(":")[1] == str(holder_pid)
    # And the new workers still log in JSON (they inherit the master's handler)
    def entries() -> list[dict]:
        return [json.loads(line) for line in _lines(env.log) if line.strip()]

    assert any(e["message"].startswith("HUP: configuration reloaded") for e in entries())
    # (a worker logs "ready" an instant after it registers: wait for the newest one's line)
    wait_for(lambda: {e["pid"] for e in entries() if e["role"].startswith("worker")}
             >= set(new), 10, what="a JSON log line from every new worker")
    assert _ctl(env, "stop").returncode == 0


def test_reload_with_a_broken_config_keeps_the_running_one(daemon_env):
    env = daemon_env
    # Given a running daemon
    pid = _start(env)
    old = env.wait_workers(_as_proc(pid), 2)

    # When its file gets a bad value and it gets HUP
    env.settings["job"]["timeout"] = "soon"
    env.conf  # noqa: B018 (the property rewrites the file)
    os.kill(pid, signal.SIGHUP)

    # Then it logs why and keeps running with the same workers
    wait_for(lambda: "HUP: keeping the running configuration" in env.log_text(),
             what="the reload error in the log")
    assert "[job] timeout" in env.log_text()
    assert env.workers(_as_proc(pid)) == old
    env.push(_job(env, "after"))
    env.wait_finished(1, timeout=20)
    assert [e["id"] for e in env.done_events()] == ["after"]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: holder(env.pidfile)[1] is None, 10, what="the daemon to stop")


def test_ttin_and_ttou_change_the_worker_count_and_a_removed_worker_finishes_first(env):
    # Given 2 workers, each in the middle of a 1.5 s job
    proc = env.start()
    old = env.wait_workers(proc, 2)
    raws = env.push(_job(env, "t1", slow=1.5), _job(env, "t2", slow=1.5))
    wait_for(lambda: all(env.holder_of(r) for r in raws), what="both jobs in flight")

    # When the master gets TTOU
    os.kill(proc.pid, signal.SIGTTOU)

    # Then one worker leaves, but only after its job is done
    survivors = wait_for(lambda: (w := env.workers(proc)) and len(w) == 1 and w, 15,
                         interval=0.01, what="one worker left")
    finished_then = {e["id"] for e in env.done_events()}
    assert len(finished_then) >= 1, "the removed worker left before finishing its job"
    assert set(survivors) < set(old)
    env.wait_finished(2, timeout=20)
    assert sorted(e["id"] for e in env.done_events()) == ["t1", "t2"]

    # And TTOU at 1 worker changes nothing
    os.kill(proc.pid, signal.SIGTTOU)
    wait_for(lambda: "TTOU ignored" in env.log_text(), what="TTOU to be ignored")
    assert env.workers(proc) == survivors

    # When it gets TTIN twice, it grows to 3
    os.kill(proc.pid, signal.SIGTTIN)
    env.wait_workers(proc, 2)
    os.kill(proc.pid, signal.SIGTTIN)
    assert set(survivors) < set(env.wait_workers(proc, 3))
    assert env.stop(proc) == 0


def test_usr1_reopens_the_log_in_master_and_workers(daemon_env):
    env = daemon_env
    # Given a daemon whose log file logrotate has just renamed
    pid = _start(env)
    workers = env.wait_workers(_as_proc(pid), 2)
    rotated = env.log + ".1"
    os.rename(env.log, rotated)

    # When the master gets USR1 (logrotate's postrotate)
    os.kill(pid, signal.SIGUSR1)

    # Then the master writes to a new file at the old name, stdout and stderr included
    wait_for(lambda: os.path.exists(env.log) and "USR1: log files reopened" in env.log_text(),
             what="the master to reopen its log")
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == env.log
    # And so do the workers: each runs one job (1 s each, so both are busy at once)
    env.push(_job(env, "u1", slow=1), _job(env, "u2", slow=1))
    env.wait_finished(2, timeout=20)
    doers = {e["worker"].split(":")[1] for e in env.done_events()}
    assert doers == {str(w) for w in workers}
    new_text = env.log_text()
    for job_id in ("u1", "u2"):
        assert f"job {job_id} done" in new_text
    assert all(f"[{w}]" in new_text for w in workers)
    old_text = "\n".join(_lines(rotated))
    assert "USR1" not in old_text and "job u1 done" not in old_text
    assert _ctl(env, "stop").returncode == 0

