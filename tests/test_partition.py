"""Stalls and partitions in a fleet: a live worker is never robbed, a job is done once.

"Hosts" are supervisors with distinct ``host_id``s on this machine (as in test_fleet); the
faults are real: a TCP proxy that black-holes one host's Redis traffic, ``CLIENT PAUSE`` on
the real redis-server, SIGSTOP, SIGKILL, and a second supervisor started with a host_id that
is taken (in this pid namespace, and in a pid namespace of its own, where our pids mean
nothing: as on another machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis

from supervisor.recovery import ContactGuard
from tests.conftest import ROOT, kill_tree, wait_for
from tests.tcpproxy import TcpProxy
from tests.test_fleet import _held_by_host, _write_conf

TTL = {"supervisor": {"heartbeat_interval": 0.5, "heartbeat_ttl": 2}}
CAN_UNSHARE = shutil.which("unshare") is not None and os.geteuid() == 0


def _host(env, host_id: str, *, redis_url: str | None = None, workers: int = 2,
          own_pid_namespace: bool = False, stderr: int = subprocess.DEVNULL,
          name: str | None = None, **sections: dict) -> subprocess.Popen:
    """A supervisor with its own host_id, work_dir, log (``<name>.log``) and config."""
    name = name or host_id
    sections.setdefault("supervisor", {}).update(
        {"host_id": host_id, "workers": workers,
         "logfile": os.path.join(env.tmp, f"{name}.log")})
    sections.setdefault("job", {})["work_dir"] = os.path.join(env.tmp, f"work-{name}")
    if redis_url:
        sections.setdefault("redis", {})["url"] = redis_url
    conf = _write_conf(env, name, **sections)
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"] if own_pid_namespace else []
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "supervisor", "run", "--config",
                             conf], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    env.procs.append(proc)
    return proc


def _log(env, name: str) -> str:
    try:
        with open(os.path.join(env.tmp, f"{name}.log")) as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def _jobs(env, prefix: str, n: int, slow: float) -> list[bytes]:
    return env.push(*[{"id": f"{prefix}{i}", "url": env.url("ten.mp4", slow=slow),
                       "start": i % 5, "duration": 1} for i in range(n)])


def _settled(env, host_id: str, n_workers: int) -> bool:
    """Every worker of the host is registered again and holds no job (its last outcome,
    recorded or fenced, is behind it)."""
    entries = [json.loads(v) for v in env.r.hvals(env.keys.workers)]
    mine = [e for e in entries if e.get("host") == host_id]
    return len(mine) == n_workers and all(e.get("job") is None for e in mine)


def _lists_holding(env) -> list[str]:
    return [key for key, items in env.processing_lists().items() if items]


def _assert_each_done_once(env, ids: list[str]) -> None:
    events = env.done_events()
    assert sorted(e["id"] for e in events) == sorted(ids), \
        f"done events {sorted(e['id'] for e in events)} for jobs {sorted(ids)}"
    assert env.dead_letters() == []
    assert all(not items for items in env.processing_lists().values())
    assert env.r.llen(env.keys.queue) == 0 and env.r.llen(env.keys.retry) == 0


def _stop_all(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(30) == 0


# --- the contact guard's rule, alone -----------------------------------------------------


def test_the_contact_guard_trusts_expired_heartbeats_only_after_a_ttl_of_unbroken_contact():
    guard = ContactGuard(ttl=2.0, interval=0.5)  # stall limit: (2 - 0.5) / 2 = 0.75 s
    # A supervisor that just started waits a full TTL of answered scans
    guard.contact(0.0, 0.01)
    assert not guard.trusted(1.0)
    guard.contact(1.5, 1.51)
    assert guard.trusted(2.02)
    # A Redis error: the clock starts again at the next answer
    guard.lost("Redis unavailable")
    assert not guard.trusted(2.5)
    guard.contact(3.0, 3.01)
    assert not guard.trusted(4.9) and guard.trusted(5.02)
    # A slow answer (the server paused us) counts as a break too
    guard.contact(5.5, 6.4)
    assert not guard.trusted(6.5)
    guard.contact(7.0, 7.01)
    assert not guard.trusted(8.5) and guard.trusted(9.02)
    # So does a gap longer than the TTL between answered scans
    guard.contact(12.0, 12.01)
    assert not guard.trusted(12.02) and guard.trusted(14.02)


# --- one host_id, one supervisor ---------------------------------------------------------


@pytest.mark.settings(TTL)
def test_a_second_supervisor_with_a_taken_host_id_refuses_to_start_and_robs_nobody(env):
    # Given host hx running two slow jobs
    ids = [f"d{i}" for i in range(2)]
    jobs = _jobs(env, "d", 2, slow=6)
    first = _host(env, "hx")
    holders = env.wait_in_flight(*jobs, timeout=15)
    hostname = socket.gethostname()
    line = (f"clip-supervisor: another supervisor (pid {first.pid} on {hostname}) is "
            "running with host_id hx; set [supervisor] host_id")

    # When a second supervisor starts with host_id hx on this machine (another pid file)
    second = _host(env, "hx", name="hx-again", stderr=subprocess.PIPE)
    # Then it exits 1 with one clear line, before forking or recovering anything
    _, err = second.communicate(timeout=20)
    assert second.returncode == 1
    assert err.decode().strip().splitlines() == [line]
    # The same as a daemon: its launcher prints the daemon's reason, and exits 1
    conf = _write_conf(env, "hx-daemon", supervisor={
        "host_id": "hx", "logfile": os.path.join(env.tmp, "hx-daemon.log"),
        "pidfile": os.path.join(env.tmp, "hx-daemon.pid")},
        job={"work_dir": os.path.join(env.tmp, "work-hx-daemon")})
    daemon = subprocess.run([sys.executable, "-m", "supervisor", "run", "--daemon",
                             "--config", conf], cwd=ROOT, capture_output=True, timeout=30)
    assert daemon.returncode == 1 and daemon.stderr.decode().strip() == line

    # And when one starts where our pids mean nothing (its own pid namespace, as another
    # machine), it sees the claim refreshed and refuses too, instead of taking hx's live
    # workers for dead
    if CAN_UNSHARE:
        third = _host(env, "hx", name="hx-elsewhere", own_pid_namespace=True,
                      stderr=subprocess.PIPE)
        _, err = third.communicate(timeout=20)
        assert third.returncode == 1
        assert err.decode().strip().splitlines() == [line]

    # Nothing of the first host's was touched: its workers keep their messages, run to the
    # end, and each job is done once, by them, with no attempt counted
    assert [env.holder_of(m) for m in jobs] == holders
    env.wait_finished(2, timeout=30)
    _assert_each_done_once(env, ids)
    assert {e["worker"].split(":")[1] for e in env.done_events()} == {str(p) for p in holders}
    assert env.r.hlen(env.keys.attempts) == 0
    for name in ("hx", "hx-again", "hx-elsewhere", "hx-daemon"):
        assert "requeued" not in _log(env, name)
    assert env.workers(first) and first.poll() is None
    _stop_all(first)


@pytest.mark.settings(TTL)
def test_a_supervisor_killed_with_its_workers_restarts_at_once_and_recovers_their_jobs(env):
    # Given host hx killed whole (SIGKILL, master and workers) with two jobs in flight
    ids = [f"k{i}" for i in range(2)]
    jobs = _jobs(env, "k", 2, slow=4)
    old = _host(env, "hx")
    env.wait_in_flight(*jobs, timeout=15)
    kill_tree(old.pid)
    old.wait(10)
    orphaned = _lists_holding(env)
    assert len(orphaned) == 2 and env.r.exists(env.keys.host("hx"))  # its claim: ~2 s more

    # When it is started again with the same host_id
    started = time.monotonic()
    new = _host(env, "hx", name="hx-again")
    # Then it takes over the claim of the dead one at once (same machine, pid gone) and
    # requeues what the killed workers held
    wait_for(lambda: not any(env.r.exists(k) for k in orphaned), 10, interval=0.05,
             what="the killed workers' messages to be recovered")
    assert time.monotonic() - started < 2 + 2.0  # well within heartbeat_ttl + margin
    claim = env.r.hgetall(env.keys.host("hx"))
    assert claim[b"pid"] == str(new.pid).encode()
    assert (f"took over the claim on host_id hx of a supervisor that no longer runs "
            f"(pid {old.pid} on {socket.gethostname()})") in _log(env, "hx-again")
    env.wait_finished(2, timeout=40)
    _assert_each_done_once(env, ids)
    _stop_all(new)
    assert not env.r.exists(env.keys.host("hx"))  # a clean stop gives the claim up


@pytest.mark.skipif(not CAN_UNSHARE, reason="needs unshare and root (a pid namespace)")
@pytest.mark.settings(TTL)
def test_a_claim_this_machine_cannot_check_is_waited_out_then_taken(env):
    # Given host hx, in a pid namespace of its own (another machine, as far as pids go),
    # killed whole with two jobs in flight
    ids = [f"w{i}" for i in range(2)]
    jobs = _jobs(env, "w", 2, slow=4)
    old = _host(env, "hx", own_pid_namespace=True)
    env.wait_in_flight(*jobs, timeout=15)
    kill_tree(old.pid)
    old.wait(10)
    orphaned = _lists_holding(env)
    assert len(orphaned) == 2

    # When it is started again here with the same host_id
    started = time.monotonic()
    new = _host(env, "hx", name="hx-again")
    # Then it waits for the old claim to expire (at most heartbeat_ttl + margin), starts,
    # and the killed workers' messages are recovered (their heartbeats expired: cross-host
    # recovery, after a heartbeat_ttl of contact)
    wait_for(lambda: not any(env.r.exists(k) for k in orphaned), 15, interval=0.05,
             what="the killed workers' messages to be recovered")
    took = time.monotonic() - started
    assert took < (2 + 1) + 2 + 3.0, f"recovered after {took:.1f} s"
    assert "waiting up to 3.0 s for its claim to expire" in _log(env, "hx-again")
    assert env.r.hget(env.keys.host("hx"), "pid") == str(new.pid).encode()
    env.wait_finished(2, timeout=40)
    _assert_each_done_once(env, ids)
    _stop_all(new)


# --- stalls: a partition, a paused Redis, a stopped worker -----------------------------


@pytest.mark.settings(TTL)
def test_a_host_black_holed_from_redis_past_the_ttl_has_each_job_done_once(env):
    # Given host A, whose Redis traffic goes through a proxy, running two slow jobs, and
    # host B next to it, its one worker busy with a job of its own
    jobs = _jobs(env, "p", 2, slow=3)
    with TcpProxy("127.0.0.1", env.redis.port) as proxy:
        a = _host(env, "ha", redis_url=proxy.url())
        env.wait_in_flight(*jobs, timeout=15)
        (other,) = env.push({"id": "b0", "url": env.url("ten.mp4", slow=6), "duration": 1})
        b = _host(env, "hb", workers=1)
        env.wait_in_flight(other, timeout=15)

        # When A is cut off (packets dropped, sockets open) until B, taking A's workers for
        # dead, has requeued their messages (then B dies: nobody but A's workers is left to
        # take the requeued copies)
        proxy.blackhole()
        wait_for(lambda: env.r.llen(env.keys.queue) == 2, 20, interval=0.05,
                 what="B to requeue A's messages")
        assert "heartbeat expired" in _log(env, "hb")
        kill_tree(b.pid)
        b.wait(10)
        # and A's workers have felt it too (their heartbeats timed out), the partition
        # heals: they finish, acknowledge late, and find the requeued copies next in line
        wait_for(lambda: _log(env, "ha").count("heartbeat: Redis unavailable") >= 2, 20,
                 interval=0.05, what="A's workers to notice")
        proxy.resume()
        env.wait_finished(3, timeout=60)
        wait_for(lambda: _settled(env, "ha", 2), 40, interval=0.1,
                 what="A's workers back and idle")

        # Then each job has one done event: A's late acknowledgements were fenced, the
        # copies found their clips stored (and B's orphan was recovered by A)
        _assert_each_done_once(env, ["p0", "p1", "b0"])
        assert "requeued while this worker ran it" in _log(env, "ha")
        _stop_all(a)


@pytest.mark.settings({"supervisor": {"heartbeat_interval": 0.5, "heartbeat_ttl": 2},
                       # Workers give up a stuck heartbeat quickly, so that some of them
                       # are between two tries when the pause ends (as in production,
                       # where the pause outlasts their timeout)
                       "redis": {"socket_timeout": 0.3, "block_timeout": 0.2}})
def test_a_redis_pause_longer_than_the_ttl_makes_no_host_rob_another(env):
    # Given two hosts running slow jobs (each outlasts the pause and a TTL after it)
    ids = [f"z{i}" for i in range(4)]
    jobs = _jobs(env, "z", 4, slow=11)
    a = _host(env, "ha")
    b = _host(env, "hb")
    holders = env.wait_in_flight(*jobs, timeout=15)
    assert len(_held_by_host(env, "ha")) == 2 and len(_held_by_host(env, "hb")) == 2
    # (and both supervisors would recover a dead worker of the other now)
    wait_for(lambda: all("Redis has answered for" in _log(env, h) for h in ("ha", "hb")),
             10, what="both supervisors to trust expired heartbeats")

    # When Redis pauses every client for three TTLs: every heartbeat expires meanwhile
    env.r.execute_command("CLIENT", "PAUSE", 6000, "ALL")
    paused = time.monotonic()
    waiter = env.redis.client(socket_timeout=30)
    assert waiter.ping()  # answered when the pause ends
    assert time.monotonic() - paused > 5

    # Then no supervisor takes the live workers for dead when it ends: each waits a TTL of
    # working contact, by which time every worker has beaten again
    env.wait_finished(4, timeout=40)
    for host in ("ha", "hb"):
        wait_for(lambda host=host: _settled(env, host, 2), 20, what=f"{host} idle")
    _assert_each_done_once(env, ids)
    by_id = {e["id"]: e["worker"].split(":")[1] for e in env.done_events()}
    assert [by_id[json.loads(m)["id"]] for m in jobs] == [str(p) for p in holders]
    for host in ("ha", "hb"):
        text = _log(env, host)
        assert "heartbeat expired" not in text and "requeued" not in text
        assert "no worker of another host is declared dead until Redis has answered" in text
    assert env.r.hlen(env.keys.attempts) == 0
    _stop_all(a, b)


@pytest.mark.settings(TTL)
def test_a_worker_stopped_past_the_ttl_then_continued_has_its_job_done_once(env):
    # Given a worker of host A running a job, and host B next to it, busy with a long job
    (job,) = _jobs(env, "s", 1, slow=3)
    a = _host(env, "ha", workers=1)
    (pid,) = env.wait_in_flight(job, timeout=15)
    (long_job,) = env.push({"id": "b0", "url": env.url("ten.mp4", slow=10), "duration": 1})
    b = _host(env, "hb", workers=1)
    env.wait_in_flight(long_job, timeout=15)

    # When that worker is frozen (SIGSTOP) until B has taken it for dead and requeued its
    # message
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: env.r.lrange(env.keys.queue, 0, -1) == [job], 20, interval=0.05,
                 what="B to requeue the frozen worker's message")
        assert "heartbeat expired" in _log(env, "hb")
    finally:
        # and then continues: it finishes, acknowledges late, and finds the copy next in line
        os.kill(pid, signal.SIGCONT)
    env.wait_finished(2, timeout=40)
    for host in ("ha", "hb"):
        wait_for(lambda host=host: _settled(env, host, 1), 40, interval=0.1,
                 what=f"{host}'s worker idle")

    # Then the job has one done event: the continued worker's own result was fenced
    _assert_each_done_once(env, ["s0", "b0"])
    assert re.search(r"job s0: its message was requeued while this worker ran it",
                     _log(env, "ha"))
    _stop_all(a, b)


def test_the_proxy_black_holes_and_cuts(redis_server):
    """The fault injector itself: a black hole hangs a client until its timeout, resume
    lets it through again, cut closes its connection."""
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        client = redis.Redis.from_url(proxy.url(), socket_timeout=0.3)
        assert client.ping()
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        proxy.resume()
        assert wait_for(lambda: _ping(client), 5, what="a ping through the healed proxy")
        proxy.cut()
        assert wait_for(lambda: _ping(client), 5, what="a ping on a new connection")
        assert proxy.accepted >= 2


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
