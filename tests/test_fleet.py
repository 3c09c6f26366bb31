"""Many hosts, one queue: cross-host recovery, racing recoverers, Redis Cluster and Sentinel.

"Hosts" are supervisors with distinct ``host_id``s and work folders on this machine; Redis
Cluster and Sentinel are real redis-server processes on loopback ports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis
from redis.cluster import RedisCluster

from supervisor import recovery
from tests.conftest import ROOT, free_port, kill_tree, wait_for
from worker import config as config_mod
from worker.keys import Keys
from worker.queue import JobQueue, connect


def _write_conf(env, name: str, **sections: dict) -> str:
    settings = {s: dict(v) for s, v in env.settings.items()}
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    path = os.path.join(env.tmp, f"{name}.conf")
    with open(path, "w") as fh:
        for section, values in settings.items():
            fh.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def _start(env, conf: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", conf],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env.procs.append(proc)
    return proc


def _host(env, host_id: str, **extra: dict) -> subprocess.Popen:
    work = os.path.join(env.tmp, f"work-{host_id}")
    return _start(env, _write_conf(env, host_id, supervisor={
        "host_id": host_id, "logfile": os.path.join(env.tmp, f"{host_id}.log"),
        **extra.get("supervisor", {})}, job={"work_dir": work}))


def _held_by_host(env, host_id: str) -> list[bytes]:
    return [m for key, items in env.processing_lists().items()
            if key.split(":", 2)[2].startswith(f"{host_id}:") for m in items]


@pytest.mark.settings({"supervisor": {"heartbeat_interval": 0.5, "heartbeat_ttl": 2}})
def test_a_dead_host_s_messages_are_recovered_by_the_others(env):
    env.push(*[{"id": f"f{i:02d}", "url": env.url("ten.mp4", slow=0.5), "start": i % 5,
                "duration": 1} for i in range(60)])
    hosts = {h: _host(env, h) for h in ("h1", "h2", "h3")}
    # When h1 holds messages, it dies whole: supervisor and workers, no goodbye
    wait_for(lambda: len(_held_by_host(env, "h1")) == 2, 20, what="h1 busy")
    kill_tree(hosts["h1"].pid)  # workers first: no one gets to give anything back
    killed = time.monotonic()
    orphans = _held_by_host(env, "h1")
    assert orphans
    wait_for(lambda: not _held_by_host(env, "h1"), 10, interval=0.05,
             what="h1's messages to be recovered")
    recovered_after = time.monotonic() - killed
    print(f"\ncross-host recovery after {recovered_after:.2f} s (ttl 2 s + scan 0.5 s)")
    assert recovered_after < 2 + 0.5 + 1.0
    env.wait_finished(60, timeout=120)
    events = env.done_events()
    assert sorted(e["id"] for e in events) == [f"f{i:02d}" for i in range(60)]
    assert sorted(os.listdir(env.out)) == [f"f{i:02d}.mp4" for i in range(60)]
    assert env.dead_letters() == []
    # The recovered ones were finished by h2 or h3, each counted as one attempt
    for message in orphans:
        job_id = json.loads(message)["id"]
        (event,) = [e for e in events if e["id"] == job_id]
        assert event["worker"].startswith(("h2:", "h3:"))
    for host in ("h2", "h3"):
        hosts[host].send_signal(signal.SIGTERM)
        assert hosts[host].wait(30) == 0
    # The stats show every host's workers while they run (checked via the registry above)


def test_two_supervisors_racing_to_recover_requeue_each_message_once(redis_server, tmp_path):
    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URL": redis_server.url})
    keys = Keys("clips")
    r = redis_server.client()
    for i in range(50):
        wid = f"gone:{1000 + i}:1"
        r.rpush(keys.processing(wid), json.dumps({"id": f"m{i}", "url": "http://h/v"}))
        r.hset(keys.workers, wid, json.dumps({"host": "gone", "pid": 1000 + i}))
    queues = [JobQueue(connect(cfg), cfg) for _ in range(2)]
    barrier = threading.Barrier(2)
    counts = []

    def recover(queue: JobQueue) -> None:
        barrier.wait()
        counts.append(recovery.recover_expired(queue, live=set()))

    threads = [threading.Thread(target=recover, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 50
    queued = [json.loads(m)["id"] for m in r.lrange(keys.queue, 0, -1)]
    assert sorted(queued) == sorted(f"m{i}" for i in range(50))
    assert all(v == b"1" for v in r.hvals(keys.attempts)) and r.hlen(keys.attempts) == 50
    assert r.hlen(keys.workers) == 0


@pytest.mark.settings({"supervisor": {"heartbeat_interval": 0.3, "heartbeat_ttl": 1}})
def test_a_long_job_keeps_its_message_while_its_worker_lives(env):
    (raw,) = env.push({"id": "long", "url": env.url("ten.mp4", slow=4), "duration": 1})
    a = _host(env, "ha", supervisor={"workers": 1})
    wait_for(lambda: _held_by_host(env, "ha"), 10, what="ha to take the long job")
    b = _host(env, "hb", supervisor={"workers": 1})  # scans every 0.3 s for expired workers
    env.wait_finished(1, timeout=30)
    (event,) = env.done_events()
    assert event["id"] == "long" and event["worker"].startswith("ha:")
    assert env.r.hget(env.keys.job("long"), "attempts") in (None, b"0")
    with open(os.path.join(env.tmp, "hb.log")) as fh:
        assert "heartbeat expired" not in fh.read()
    for proc in (a, b):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


# --- Redis Cluster ------------------------------------------------------------------------


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


@pytest.fixture
def cluster(tmp_path):
    ports = [_cluster_port() for _ in range(3)]
    procs = [subprocess.Popen(
        ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{p}.conf", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL) for p in ports]
    try:
        for p in ports:
            wait_for(lambda p=p: _ping(p), 10, what=f"node {p}")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        wait_for(lambda: all(b"cluster_state:ok" in redis.Redis(port=p).execute_command(
            "CLUSTER", "INFO") for p in ports), 20, what="cluster_state:ok")
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


def test_end_to_end_on_a_three_master_cluster_with_two_queues_on_two_shards(env, cluster):
    url = f"redis+cluster://127.0.0.1:{cluster[0]}/0"
    client = RedisCluster(host="127.0.0.1", port=cluster[0])
    prefixes = ["clips", next(p for p in (f"q{i}" for i in range(100))
                              if client.get_node_from_key("{" + p + "}")
                              != client.get_node_from_key("{clips}"))]
    procs = []
    for prefix in prefixes:
        keys = Keys(prefix)
        for i in range(6):
            client.lpush(keys.queue, json.dumps({
                "id": f"{prefix}-{i}", "url": env.url("ten.mp4"), "start": i, "duration": 2,
                "mode": "encode" if i % 2 else "copy"}))
        procs.append(_start(env, _write_conf(env, prefix, redis={"url": url, "prefix": prefix},
                                             supervisor={"host_id": prefix})))
    for prefix in prefixes:
        keys = Keys(prefix)
        wait_for(lambda keys=keys: client.llen(keys.done) == 6, 60, interval=0.05,
                 what=f"6 jobs done on {prefix}")
        done = sorted(json.loads(e)["id"] for e in client.lrange(keys.done, 0, -1))
        assert done == [f"{prefix}-{i}" for i in range(6)]
        assert client.llen(keys.dead) == 0 and client.llen(keys.queue) == 0
    assert sorted(os.listdir(env.out)) == sorted(f"{p}-{i}.mp4" for p in prefixes
                                                 for i in range(6))
    stats = subprocess.run([sys.executable, "-m", "supervisor", "stats", "--json",
                            "--config", os.path.join(env.tmp, "clips.conf")], cwd=ROOT,
                           capture_output=True, text=True, timeout=30, check=True)
    assert {w["host"] for w in json.loads(stats.stdout)["workers"]} == {"clips"}
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


# --- Sentinel -----------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path):
    master, replica, sport = free_port(), free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    procs = {
        "master": subprocess.Popen(["redis-server", "--port", str(master), *base],
                                   stdout=subprocess.DEVNULL),
        "replica": subprocess.Popen(["redis-server", "--port", str(replica), "--replicaof",
                                     "127.0.0.1", str(master), *base],
                                    stdout=subprocess.DEVNULL),
    }
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor svc 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds svc 1000\n"
                    "sentinel failover-timeout svc 5000\n")
    procs["sentinel"] = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                         stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _ping(master) and _ping(replica) and _ping(sport), 10)
        wait_for(lambda: redis.Redis(port=replica).info("replication")
                 .get("master_link_status") == "up", 10, what="replication")
        # Sentinel learns of replicas from the master's INFO (every 10 s): until it has, a
        # dead master has no one to fail over to.
        wait_for(lambda: redis.Redis(port=sport).execute_command("SENTINEL", "REPLICAS", "svc"),
                 30, interval=0.2, what="the sentinel to know the replica")
        yield {"master": master, "replica": replica, "sentinel": sport, "procs": procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_jobs_keep_flowing_through_a_sentinel_failover(env, sentinel):
    url = f"redis+sentinel://127.0.0.1:{sentinel['sentinel']}/svc/0"
    master = redis.Redis(port=sentinel["master"])
    keys = Keys("clips")
    ids = [f"s{i:02d}" for i in range(20)]
    for job_id in ids:
        master.lpush(keys.queue, json.dumps({"id": job_id, "url": env.url("ten.mp4", slow=0.3),
                                             "duration": 1}))
    # Replication is asynchronous: make sure the queue itself reached the replica, so the
    # test measures our recovery, not Redis losing the producer's writes.
    assert master.wait(1, 5000) == 1
    proc = _start(env, _write_conf(env, "sentinel", redis={"url": url}))
    wait_for(lambda: master.llen(keys.done) >= 5, 30, what="5 jobs done before failover")
    sentinel["procs"]["master"].kill()
    replica = redis.Redis(port=sentinel["replica"])
    wait_for(lambda: replica.info("replication")["role"] == "master", 45,
             what="the replica to be promoted")
    wait_for(lambda: len({json.loads(e)["id"] for e in replica.lrange(keys.done, 0, -1)})
             + replica.llen(keys.dead) >= len(ids), 60, interval=0.1,
             what="every job to finish after the failover")
    done = [json.loads(e)["id"] for e in replica.lrange(keys.done, 0, -1)]
    assert sorted(set(done)) == ids and replica.llen(keys.dead) == 0
    # At-least-once: an ack the old master accepted but never replicated can be lost in the
    # failover; such a job runs again and writes the same output. Report the window's cost.
    print(f"\nsentinel failover: {len(done) - len(set(done))} job(s) acknowledged twice")
    assert sorted(os.listdir(env.out)) == [f"{i}.mp4" for i in ids]
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
